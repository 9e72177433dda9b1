"""The sample federation's server: Flower's FedAvg, recorded by gitool.

The strategy is plain FedAvg; the fit config tells every client its learning rate,
batch size, local epochs, optimizer and weight decay. The two lines that make it an
audited server wrap the strategy in :class:`gitool.integrations.flower.RecordingStrategy`,
which writes each client's update of each round to ``OUT/round-RRR/client-I.update.safetensors``.

    python samples/flower/server.py --address 127.0.0.1:PORT --clients 3 --rounds 2 --out OUT/updates
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from task import MODEL, get_weights, new_model  # noqa: E402

from gitool.models import init_parameters  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="where to listen, HOST:PORT (localhost)")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial global model")
    parser.add_argument("--round-timeout", type=float, default=120.0, help="seconds a round may take")
    parser.add_argument("--out", type=Path, required=True, help="folder of the recorded updates")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower sends no usage reports

    import flwr
    from flwr.common import ndarrays_to_parameters
    from flwr.server.strategy import FedAvg

    from gitool.integrations.flower import RecordingStrategy

    net = new_model()  # untrained: PyTorch's initialisation, seeded
    init_parameters(net, "default", torch.Generator().manual_seed(args.seed))

    def fit_config(server_round: int) -> dict:
        return {"server_round": server_round, "lr": args.lr, "batch_size": args.batch_size,
                "local_epochs": args.epochs, "optimizer": "sgd", "weight_decay": 0.0}

    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=args.clients,
                      min_available_clients=args.clients, on_fit_config_fn=fit_config,
                      initial_parameters=ndarrays_to_parameters(get_weights(net)))
    # gitool: record every client's update of every round, named by the client's partition_id
    strategy = RecordingStrategy(strategy, out_dir=args.out, model=MODEL, client_name="partition_id")

    flwr.server.start_server(server_address=args.address, strategy=strategy,
                             config=flwr.server.ServerConfig(num_rounds=args.rounds,
                                                             round_timeout=args.round_timeout))
    print(f"gitool: recorded {len(strategy.written)} updates in {args.out}", flush=True)
    for server_round, client, reason in strategy.skipped:
        print(f"gitool: round {server_round}, client {client} not recorded: {reason}", file=sys.stderr)
    expected = args.rounds * args.clients
    if len(strategy.written) != expected:
        sys.exit(f"gitool: {len(strategy.written)} of {expected} updates recorded")


if __name__ == "__main__":
    main()
