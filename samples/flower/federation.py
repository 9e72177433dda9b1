"""Run the sample Flower federation on localhost: one server and N client processes.

    python samples/flower/federation.py OUT_DIR [--clients 3] [--rounds 2] [--epochs 1] [--timeout 120]

Picks a free port on 127.0.0.1, starts ``server.py`` (FedAvg wrapped by gitool's
recorder), waits until it listens, starts the clients (``client.py``), and waits for all
of them. Writes ``OUT_DIR/updates/round-RRR/client-I.update.safetensors`` (the server's
recording), ``OUT_DIR/truth/round-RRR/client-I.truth.safetensors`` (what each client
really trained on) and each process's log under ``OUT_DIR/logs/``. Every process runs in
its own process group and is killed when the federation ends, fails, exceeds
``--timeout`` seconds or the launcher is interrupted. Exit code 0 only when every
process exited cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM each process group still running, then SIGKILL what is left after 5 s."""
    for process in processes:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()


def run(out: Path, clients: int, rounds: int, timeout: float, samples: int, seed: int, epochs: int = 1) -> int:
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    processes: list[subprocess.Popen] = []
    names: dict[int, str] = {}

    def start(name: str, script: str, *arguments: str) -> subprocess.Popen:
        with open(logs / f"{name}.log", "wb") as log:
            process = subprocess.Popen([sys.executable, str(HERE / script), *arguments], stdout=log,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True)
        processes.append(process)
        names[process.pid] = name
        return process

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    deadline = started + timeout
    try:
        server = start("server", "server.py", "--address", address, "--clients", str(clients), "--rounds",
                       str(rounds), "--epochs", str(epochs), "--seed", str(seed), "--out", str(out / "updates"))
        while not listening(port):
            if server.poll() is not None:
                print(f"the server stopped before listening; see {logs / 'server.log'}", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print(f"the server did not listen on {address} within {timeout:.0f} s", file=sys.stderr)
                return 1
            time.sleep(0.1)
        for client in range(clients):
            start(f"client-{client}", "client.py", "--address", address, "--partition", str(client), "--clients",
                  str(clients), "--samples", str(samples), "--seed", str(seed), "--truth-dir", str(out / "truth"))
        failed = []
        for process in processes:
            try:
                code = process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"the federation ran past --timeout {timeout:.0f} s; stopped", file=sys.stderr)
                return 1
            if code != 0:
                failed.append(f"{names[process.pid]} (exit {code}, see {logs / names[process.pid]}.log)")
        if failed:
            print("failed: " + ", ".join(failed), file=sys.stderr)
            return 1
        print(f"federation: {clients} clients, {rounds} rounds on {address} in {time.monotonic() - started:.1f} s; "
              f"updates in {out / 'updates'}, truths in {out / 'truth'}", flush=True)
        return 0
    except KeyboardInterrupt:
        print("interrupted; stopping the federation", file=sys.stderr)
        return 130
    finally:
        stop(processes)
        signal.signal(signal.SIGTERM, previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--samples", type=int, default=32, help="private samples per client")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round (batch size 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before everything is stopped")
    args = parser.parse_args()
    sys.exit(run(args.out, args.clients, args.rounds, args.timeout, args.samples, args.seed, args.epochs))


if __name__ == "__main__":
    main()
