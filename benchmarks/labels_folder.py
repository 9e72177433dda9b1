"""Whole-process cost of `gitool labels DIR --out-dir OUT` per update, as a tool.

Makes N single-sample updates per model (gitool captures, written once into a cache
folder), then times the real command in a fresh process (torch start-up included) at
two folder sizes, so that the table shows both the cost per update of the whole job and
the marginal cost of one more update. Run on a quiet machine, one thread:

    OMP_NUM_THREADS=1 python benchmarks/labels_folder.py            # lenet 100, resnet18 20
    python benchmarks/labels_folder.py --models lenet --updates 100 --small 10

Targets (issue 16): <= 8 ms per update on LeNet and <= 20 ms on ResNet-18 over 100 updates.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {"lenet": "lenet", "resnet18": "resnet18"}


def make_updates(folder: Path, model: str, count: int) -> None:
    from gitool.capture import CaptureConfig, capture
    from gitool.data import open_source
    from gitool.files import InputSpec, save_capture
    from gitool.models import ModelSpec

    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.update.safetensors")))
    spec = ModelSpec(name=model, num_classes=10, input_shape=(3, 32, 32))
    source = open_source("synthetic", spec.input_shape, num_classes=10)
    for i in range(have, count):
        config = CaptureConfig(input=InputSpec(shape=spec.input_shape), init="default", seed=i,
                               training=__import__("gitool.files", fromlist=["TrainingSpec"]).TrainingSpec(
                                   model_mode="eval"))
        update, truth = capture(source, spec, config, provenance={"data": "synthetic"})
        save_capture(update, truth, folder / f"{i:04d}.update.safetensors", folder / f"{i:04d}.truth.safetensors")


def time_command(inputs: list[Path]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one fresh `gitool labels` process; CPU is its user +
    system time, the figure that holds on a shared machine."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        for path in inputs:
            os.symlink(path, folder / path.name)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gitool", "labels", str(folder), "--out-dir", str(Path(tmp) / "out"),
                        "--json"], check=True, stdout=subprocess.DEVNULL, env=env, cwd=ROOT)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="lenet,resnet18")
    parser.add_argument("--updates", type=int, default=None, help="updates per model (default lenet 100, resnet18 20)")
    parser.add_argument("--small", type=int, default=5, help="the small folder, for the marginal cost")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "results" / "labels_folder_cache")
    parser.add_argument("--repeats", type=int, default=2, help="best of R runs per size")
    args = parser.parse_args()
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| model | updates | whole job (s) | ms per update | marginal ms per update | start-up + 1st (s) "
          "| CPU ms per update | marginal CPU ms per update |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in args.models.split(","):
        count = args.updates or (100 if model == "lenet" else 20)
        folder = args.cache / model
        make_updates(folder, MODELS[model], count)
        paths = sorted(folder.glob("*.update.safetensors"))[:count]
        big, big_cpu = min(time_command(paths) for _ in range(args.repeats))
        small, small_cpu = min(time_command(paths[: args.small]) for _ in range(args.repeats))
        marginal = (big - small) / (count - args.small)
        marginal_cpu = (big_cpu - small_cpu) / (count - args.small)
        print(f"| {model} | {count} | {big:.2f} | {1e3 * big / count:.1f} | {1e3 * marginal:.1f} | "
              f"{small - args.small * marginal:.2f} | {1e3 * big_cpu / count:.1f} | {1e3 * marginal_cpu:.1f} |",
              flush=True)
    if os.environ.get("GITOOL_BENCH_CLEAN"):
        shutil.rmtree(args.cache)


if __name__ == "__main__":
    main()
