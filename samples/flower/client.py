"""One client of the sample federation: a plain Flower NumPyClient with a PyTorch loop.

It trains what the server sends on its private partition with the fit config's learning
rate, batch size, local epochs and weight decay (SGD, batch-mean cross-entropy, hard
labels, batches reshuffled every epoch), and returns its weights with ``num_examples``
and its ``partition_id`` as a metric (the recorder names its files by it).

Only so that the sample can score what leaked, it also writes what it really trained on
as a gitool truth file, ``TRUTH_DIR/round-RRR/client-I.truth.safetensors``: the images
and labels in the order of the local steps and the last-layer features at the moment
each sample was used. A real client keeps these to itself.

    python samples/flower/client.py --address 127.0.0.1:PORT --partition 0 --clients 3 --truth-dir OUT/truth
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from task import DATA, MODEL, get_weights, new_model, partition, set_weights  # noqa: E402

from gitool.files import Truth, save_truth  # noqa: E402
from gitool.models import forward_with_features  # noqa: E402


def local_training(net, images, labels, config, generator):
    """SGD over ``local_epochs`` epochs of shuffled batches; returns the samples' order of
    use (positions in the partition), their step and their last-layer features."""
    lr, batch, epochs = float(config["lr"]), int(config["batch_size"]), int(config["local_epochs"])
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, weight_decay=float(config.get("weight_decay", 0.0)))
    net.train()
    used, steps, features = [], [], []
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch):
            rows = order[start:start + batch]
            logits, feature = forward_with_features(net, images[rows])
            loss = F.cross_entropy(logits, labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            used.append(rows)
            steps.append(torch.full((len(rows),), step, dtype=torch.int64))
            features.append(feature.detach())
            step += 1
    return torch.cat(used), torch.cat(steps), torch.cat(features)


def truth_of_round(items, images, labels, used, steps, features, seed) -> Truth:
    """What the client trained on, in step order, as gitool's truth file holds it."""
    k = MODEL.num_classes
    classes = labels[used]
    n = len(used)
    return Truth(images=images[used], inputs=images[used],  # the sample feeds images in [0, 1] unnormalised
                 labels=F.one_hot(classes, k).to(images.dtype), targets=torch.stack([classes, classes], dim=1),
                 mix_coef=torch.zeros(n, dtype=torch.float64), label_smoothing=torch.zeros(n, dtype=torch.float64),
                 features=features, counts=torch.bincount(classes, minlength=k), step=steps,
                 meta={"indices": [int(items[i]) for i in used], "seed": seed, "data": DATA, "family": "hard",
                       "update_kind": "delta"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="the server, HOST:PORT (localhost)")
    parser.add_argument("--partition", type=int, required=True)
    parser.add_argument("--clients", type=int, required=True, help="how many clients share the data")
    parser.add_argument("--samples", type=int, default=32, help="private samples of this client")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the class mix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--truth-dir", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower sends no usage reports

    import flwr
    from flwr.client import NumPyClient

    items, source = partition(args.partition, args.clients, args.samples, args.alpha, args.seed)
    images = source.images(items.tolist())
    labels = torch.as_tensor(np.asarray(source.labels)[items], dtype=torch.int64)

    class Client(NumPyClient):
        def get_parameters(self, config):
            return get_weights(new_model())

        def fit(self, parameters, config):
            server_round = int(config["server_round"])
            net = new_model()
            set_weights(net, parameters)
            generator = torch.Generator().manual_seed(args.seed * 100_003 + args.partition * 1009 + server_round)
            used, steps, features = local_training(net, images, labels, config, generator)
            truth = truth_of_round(items, images, labels, used, steps, features, args.seed)
            folder = args.truth_dir / f"round-{server_round:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            save_truth(truth, folder / f"client-{args.partition}.truth.safetensors")
            return get_weights(net), len(labels), {"partition_id": args.partition}

        def evaluate(self, parameters, config):
            return 0.0, len(labels), {}

    flwr.client.start_client(server_address=args.address, client=Client().to_client(), insecure=True)


if __name__ == "__main__":
    main()
