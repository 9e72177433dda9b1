"""Benchmark of the analytic reconstructions (`--method fc` / `--method conv`).

Prints a markdown table: model, input, data, PSNR / SSIM of the reconstruction against the
truth, the reconstruction time (labels and features given; capture not timed) and the
CPU time of the reconstruction (user + system, all threads: on a shared machine wall time
is inflated, CPU time much less), and the peak resident memory of the process that ran the
row, capture included (each row runs in its own subprocess so ru_maxrss is that row's peak).

The labels (and, for bias-free classifiers, the features) are ORACLE inputs taken from
the capture's truth: this measures the reconstruction step in isolation. Where the
classifier has a bias, the feature comes from the update (bias ratio), not the truth.

    python benchmarks/reconstruct_analytic.py            # every row
    python benchmarks/reconstruct_analytic.py --quick    # skip the 224x224 row
    python benchmarks/reconstruct_analytic.py --threads 2
    python benchmarks/reconstruct_analytic.py --dtypes float32 --label-smoothing 0.2
    python benchmarks/reconstruct_analytic.py --cases 1 --repeat 5   # R-CONV's LeNet, fastest of 5
    python benchmarks/reconstruct_analytic.py --cases 1 --data samples --repeat 7 --against /tmp/old

``--against DIR`` times every row also with another checkout of gitool (for example main
before a change, ``git archive main | tar -x -C /tmp/old``), alternating the two ``--rounds``
times on a shared machine, and prints both sides' median time, CPU time and PSNR with the
1-minute load average. Issue 15's target for case 1 (R-CONV's LeNet, LeakyReLU, float64):
at most 0.1 s per image on 2 cores (``--threads 2``, quiet machine).

Each row runs in float64 and float32 (``--dtypes``): float32 is what real clients send. The
"residual / limit" column is the largest layer residual over the limit that the update's
precision explains (diagnostics.layers[].residual_limit); "flagged" names the layers above
it (the reconstruction then carries a warning line).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name, model, input shape, activation, last bias, model options, method, solver options
CASES = [
    ("FCN-4 (no bias, paper)", "fcn4", (3, 64, 64), "relu", False,
     {"widths": "4096,1024,256", "hidden_bias": "false"}, "fc", {}),
    ("rconv-lenet LeakyReLU", "rconv-lenet", (3, 32, 32), "leakyrelu", True, {}, "conv", {}),
    ("rconv-lenet all-ReLU 77,22,3,3", "rconv-lenet", (3, 32, 32), "relu", True,
     {"channels": "77,22,3,3"}, "conv", {}),
    ("CNN6 (R-GAP)", "cnn6", (3, 32, 32), "leakyrelu", True, {}, "conv", {}),
    ("conv 6,12 s1 at 224 (iterative)", "rconv-lenet", (3, 224, 224), "leakyrelu", True,
     {"channels": "6,12", "strides": "1,1"}, "conv", {"solver": "iterative"}),
]
DATA = ("synthetic", "digits", "samples")


def run_row(case_index: int, data: str, threads: int, dtype: str = "float64", smoothing: float = 0.0,
            repeat: int = 1) -> dict:
    """Capture one sample in ``dtype``, reconstruct it, score it (runs in a subprocess)."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from gitool.capture import CaptureConfig, capture
    from gitool.data import open_source
    from gitool.files import InputSpec, LossSpec, TrainingSpec, new_result
    from gitool.metrics import psnr, ssim
    from gitool.models import ModelSpec
    from gitool.reconstruct import reconstruct  # noqa

    name, model, shape, activation, last_bias, options, method, solve = CASES[case_index]
    spec = ModelSpec(model, num_classes=10, input_shape=shape, activation=activation, last_bias=last_bias,
                     options=options)
    loss = LossSpec(family="smoothing", label_smoothing=smoothing) if smoothing else LossSpec()
    config = CaptureConfig(input=InputSpec(shape=shape), training=TrainingSpec(dtype=dtype), loss=loss, seed=1)
    update, truth = capture(open_source(data, shape, num_classes=10), spec, config)
    labels = new_result("labels", {"labels": truth.labels}, method="oracle", update=update)
    features = None if last_bias else new_result("features", {"features": truth.features}, method="oracle",
                                                 update=update)
    timings = []
    for _ in range(max(1, repeat)):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        outcome = reconstruct(update, labels, features, method, solve)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        timings.append((seconds, after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime))
    # The fastest of the repeats: on a shared machine the others measure the neighbours.
    seconds, cpu_seconds = min(timings)
    images, target = outcome.images.to(torch.float64), truth.images.to(torch.float64)
    layers = outcome.diagnostics["layers"]
    return {
        "case": name, "data": data, "input": "x".join(map(str, shape)), "dtype": dtype,
        "residual_ratio": max(layer["gradient_residual"] / layer["residual_limit"] for layer in layers),
        "flagged": outcome.diagnostics.get("flagged_layers", []),
        "repaired": [layer["layer"] for layer in layers if "pattern" in layer],
        "psnr": float(psnr(images, target).min()), "ssim": float(ssim(images, target).min()),
        "max_error": float((images - target).abs().max()), "seconds": seconds, "cpu_seconds": cpu_seconds,
        "rows": "/".join("F" if layer.get("constraints") == "both" else "G" for layer in reversed(layers)),
        "iterations": sum(layer.get("iterations", 0) for layer in layers),
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the 224x224 row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=",".join(DATA))
    parser.add_argument("--dtypes", default="float64,float32", help="capture precisions, comma-separated")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--repeat", type=int, default=1, help="time N reconstructions per row, report the fastest")
    parser.add_argument("--cases", default=None, help="comma-separated case numbers (default: all)")
    parser.add_argument("--against", type=Path, default=None,
                        help="another gitool checkout to time each row with as well (old vs new)")
    parser.add_argument("--rounds", type=int, default=3, help="with --against: alternations per row (median)")
    parser.add_argument("--row", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row is not None:
        case_index, data, dtype = args.row.split(":")
        print(json.dumps(run_row(int(case_index), data, args.threads, dtype, args.label_smoothing,
                                 args.repeat)))
        return
    if args.against is not None:
        compare(args)
        return
    print(f"load average {os.getloadavg()[0]:.1f} at the start, {args.threads} threads")
    print("| model | input | data | dtype | PSNR dB (min) | SSIM | max abs err | residual / limit | flagged "
          "| rows (G/F per layer, input first) | CG iters | time s | CPU s | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case_index, data, dtype in _chosen_rows(args):
        case = CASES[case_index]
        completed = subprocess.run([sys.executable, __file__, "--row", f"{case_index}:{data}:{dtype}",
                                    "--threads", str(args.threads), "--label-smoothing",
                                    str(args.label_smoothing), "--repeat", str(args.repeat)],
                                   capture_output=True, text=True, cwd=ROOT)
        if completed.returncode != 0:
            message = (completed.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"| {case[0]} | {'x'.join(map(str, case[2]))} | {data} | {dtype} | failed: {message} "
                  "||||||||||")
            continue
        row = json.loads(completed.stdout.strip().splitlines()[-1])
        flags = ", ".join(row["flagged"]) or "-"
        if row["repaired"]:
            flags += f" (pattern re-solved: {', '.join(row['repaired'])})"
        print(f"| {row['case']} | {row['input']} | {row['data']} | {row['dtype']} | {row['psnr']:.1f} | "
              f"{row['ssim']:.6f} | {row['max_error']:.1e} | {row['residual_ratio']:.1e} | {flags} | "
              f"{row['rows']} | {row['iterations'] or '-'} | {row['seconds']:.2f} | {row['cpu_seconds']:.2f} | "
              f"{row['peak_mib']:.0f} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


def _chosen_rows(args):
    chosen = None if args.cases is None else {int(v) for v in args.cases.split(",")}
    for case_index, case in enumerate(CASES):
        if (args.quick and case[2][1] >= 224) or (chosen is not None and case_index not in chosen):
            continue
        for data in args.data.split(","):
            for dtype in args.dtypes.split(","):
                yield case_index, data, dtype


def _run_in(root: Path, row: str, args) -> dict:
    """One row in the checkout at ``root`` (its own copy of this script, so its own gitool)."""
    script = root / "benchmarks" / "reconstruct_analytic.py"
    completed = subprocess.run([sys.executable, str(script), "--row", row, "--threads", str(args.threads),
                                "--label-smoothing", str(args.label_smoothing), "--repeat", str(args.repeat)],
                               capture_output=True, text=True, cwd=root)
    if completed.returncode != 0:
        raise SystemExit(f"{root}: row {row} failed: {(completed.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def compare(args) -> None:
    """Each row in this checkout and in --against, alternating, medians of --rounds."""
    other = args.against.resolve()
    print(f"this: {ROOT}; against: {other}; {args.threads} threads; fastest of {args.repeat} per round, "
          f"median of {args.rounds} rounds")
    print("| model | data | dtype | PSNR dB | PSNR dB (against) | time s | time s (against) | CPU s "
          "| CPU s (against) | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case_index, data, dtype in _chosen_rows(args):
        row = f"{case_index}:{data}:{dtype}"
        runs = {ROOT: [], other: []}
        loads = []
        for round_index in range(args.rounds):
            for root in ((ROOT, other) if round_index % 2 == 0 else (other, ROOT)):
                loads.append(os.getloadavg()[0])
                runs[root].append(_run_in(root, row, args))
        mine, theirs = runs[ROOT], runs[other]

        def median(rows, key):
            return statistics.median(r[key] for r in rows)

        print(f"| {mine[0]['case']} | {data} | {dtype} | {median(mine, 'psnr'):.1f} | {median(theirs, 'psnr'):.1f} | "
              f"{median(mine, 'seconds'):.3f} | {median(theirs, 'seconds'):.3f} | {median(mine, 'cpu_seconds'):.3f} | "
              f"{median(theirs, 'cpu_seconds'):.3f} | {min(loads):.1f}-{max(loads):.1f} |", flush=True)


if __name__ == "__main__":
    main()
