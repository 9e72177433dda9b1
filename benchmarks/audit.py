"""Throughput of `gitool audit` as a tool: whole processes, start-up included (issue 14 item 5).

Two federated runs are captured once, in this process (gitool's own `capture`, not one
process per client), into a cache folder:

- ``single/``: 10,000 single-sample LeNet updates (DLG's LeNet, 3x32x32, 10 classes, one
  gradient step, float32), each with its truth;
- ``fedavg/``: 1,000 FedAvg LeNet updates (B = 8, m = 5 local SGD steps, Dirichlet(0.5)
  class mix), each with its truth.

Then ``gitool audit`` runs in a fresh process on the first N single updates (soft labels
and features: ``--methods labels,features``) for each N of ``--sizes``, and on the FedAvg
updates (label counts by RLU with auxiliary data: ``--methods labels --aux synthetic``).
Each row gives the whole process's wall time (start-up, finding and checking the inputs,
the tasks, the report), the tasks' time alone and the report's (from ``--json``), the CPU
time of the audit and its workers (user + system: what the work costs whatever else runs),
and the load average around the run: on a shared
machine the figures are inflated by the other work, so re-measure quietly with

    OMP_NUM_THREADS=1 python benchmarks/audit.py                       # everything (~15 min quiet)
    python benchmarks/audit.py --sizes 100,1000 --fedavg 100           # a quick look

Targets: the 10,000 single updates in under 60 s with 2 workers on 2 cores, and the cost
per update flat from 100 to 10,000 updates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_run(folder: Path, count: int, batch_size: int, steps: int, dirichlet: float | None) -> None:
    """``count`` LeNet client rounds in ``folder`` (00000.update.safetensors + truth, ...),
    resuming a folder that already holds some."""
    from gitool.atomic import deferred_sync
    from gitool.capture import CaptureConfig, SampleChoice, capture
    from gitool.data import open_source
    from gitool.files import InputSpec, TrainingSpec, save_capture
    from gitool.models import ModelSpec

    folder.mkdir(parents=True, exist_ok=True)
    have = {p.name.split(".")[0] for p in folder.glob("*.truth.safetensors")}
    spec = ModelSpec(name="lenet", num_classes=10, input_shape=(3, 32, 32))
    source = open_source("synthetic", spec.input_shape, num_classes=10)
    started = time.perf_counter()
    with deferred_sync():
        for i in range(count):
            if f"{i:05d}" in have:
                continue
            config = CaptureConfig(input=InputSpec(shape=spec.input_shape), seed=i, init="default",
                                   training=TrainingSpec(batch_size=batch_size, steps=steps),
                                   choice=SampleChoice(dirichlet_alpha=dirichlet))
            update, truth = capture(source, spec, config, provenance={"data": "synthetic"})
            save_capture(update, truth, folder / f"{i:05d}.update.safetensors", folder / f"{i:05d}.truth.safetensors")
            if (i + 1) % 1000 == 0:
                print(f"  captured {i + 1}/{count} in {folder.name} ({time.perf_counter() - started:.0f} s)",
                      file=sys.stderr, flush=True)


def linked(folder: Path, count: int, into: Path) -> Path:
    """A folder of links to the first ``count`` updates of ``folder`` and their truths."""
    into.mkdir(parents=True)
    for i in range(count):
        for kind in ("update", "truth"):
            name = f"{i:05d}.{kind}.safetensors"
            os.symlink(folder / name, into / name)
    return into


def load() -> float:
    return os.getloadavg()[0]


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes and theirs (the audit
    and its workers): what the work costs whatever else runs on the machine."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def audit(inputs: Path, out: Path, workers: int, methods: str, extra: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    before = load()
    cpu_before = _children_cpu()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gitool", "audit", str(inputs), "--out-dir", str(out), "--methods",
                           methods, "--workers", str(workers), "--json", *extra], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    cpu = _children_cpu() - cpu_before
    if done.returncode != 0:
        raise SystemExit(f"gitool audit failed ({done.returncode}): {done.stderr[-2000:]}")
    document = json.loads(done.stdout)
    return {"wall": wall, "cpu": cpu, "audit": document["seconds"], "report": document["report_seconds"],
            "audited": document["audited"], "load": (before, load()), "overall": document["overall"]}


def row(name: str, count: int, workers: int, result: dict) -> str:
    wall, inner = result["wall"], result["audit"]
    overall = result["overall"]
    leak = (f"labels right {overall['label_accuracy']:.3f}" if overall.get("label_accuracy") is not None
            else f"iAcc {overall['iAcc']:.3f}" if overall.get("iAcc") is not None else "-")
    return (f"| {name} | {count} | {workers} | {wall:.1f} | {1e3 * wall / count:.2f} | {inner:.1f} | "
            f"{1e3 * inner / count:.2f} | {result['report']:.1f} | {result['cpu']:.1f} | "
            f"{1e3 * result['cpu'] / count:.2f} | {result['load'][0]:.1f} / {result['load'][1]:.1f} | {leak} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,10000", help="single-sample audits of these many updates")
    parser.add_argument("--fedavg", type=int, default=1000, help="FedAvg updates (0: none)")
    parser.add_argument("--workers", default="2", help="worker counts, comma-separated")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "gitool-audit-bench",
                        help="where the captured runs are kept between runs (about 1.6 GB)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    print(f"capturing (once) into {args.cache} ...", file=sys.stderr, flush=True)
    make_run(args.cache / "single", max(sizes), 1, 1, None)
    if args.fedavg:
        make_run(args.cache / "fedavg", args.fedavg, 8, 5, 0.5)
    print(f"gitool audit, whole process; {os.cpu_count()} cores; load average (1 min) before / after each run")
    print()
    print("| run | updates | workers | wall s | ms/update | tasks s | ms/update (tasks) | report s | CPU s | "
          "CPU ms/update | load | leakage |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for count in sizes:
            inputs = linked(args.cache / "single", count, tmp / f"single-{count}")
            for w in workers:
                out = tmp / f"out-{count}-{w}"
                result = audit(inputs, out, w, "labels,features", [])
                print(row("single-sample, labels + features", count, w, result), flush=True)
                shutil.rmtree(out)
        if args.fedavg:
            inputs = linked(args.cache / "fedavg", args.fedavg, tmp / "fedavg")
            for w in workers:
                out = tmp / f"fedavg-{w}"
                result = audit(inputs, out, w, "labels", ["--aux", "synthetic", "--aux-per-class", "10"])
                print(row("FedAvg B=8 m=5, RLU counts", args.fedavg, w, result), flush=True)
                shutil.rmtree(out)


if __name__ == "__main__":
    main()
