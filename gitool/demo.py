"""`gitool demo`: the whole attack chain on the bundled samples, step by step.

The chain is the one `samples/attack_chain.sh` runs through the command line:

1. capture: a client trains one step on one private image of `samples/` with label
   smoothing, on a fully-connected net without any bias (the case the soft-label paper
   opened up), in float64;
2. labels: the server recovers the soft label by the lambda search (no bias to use);
3. features: the last-layer input from the label;
4. reconstruct (fc): the image, analytically, layer by layer;
5. reconstruct (optimize): the same image by gradient matching with the recovered label
   and feature held fixed, a short run;
6. a second client sends a FedAvg update of several local steps on a mini-batch; the
   server recovers how many samples of each class it used (RLU);
7. score: every result against the truth, PNG grids, and `summary.json`.

Each step is a function of the demo folder and the state so far that writes its files
and returns a headline; ``STEPS`` lists them in order.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from gitool.files import atomic_write_bytes

CLIENT = "client"  # single-image client: client.update.safetensors, client.truth..., ...
BATCH_CLIENT = "batch"  # FedAvg client for the label-count step


def _save_capture(folder: Path, stem: str, spec, config, data: str):
    from gitool.capture import capture
    from gitool.data import open_source
    from gitool.files import save_capture

    source = open_source(data, spec.input_shape, num_classes=spec.num_classes)
    update, truth = capture(source, spec, config, provenance={"data": data})
    save_capture(update, truth, folder / f"{stem}.update.safetensors", folder / f"{stem}.truth.safetensors")
    return update


def _score(state: dict, result_path: Path, stem: str, png: Path | None = None) -> dict:
    """Score a result file against its truth (the demo plays `gitool score` here)."""
    from gitool import metrics
    from gitool.files import load_result, load_truth
    from gitool.plotting import save_score_grid

    folder = result_path.parent
    result = load_result(result_path)
    truth = load_truth(folder / f"{stem}.truth.safetensors")
    scores = metrics.score(result, truth)
    if png is not None:
        save_score_grid(result.require("images"), truth.images, scores, png, title=result_path.name)
    state["scores"][result_path.name] = scores
    return scores


def capture_single(folder: Path, state: dict) -> str:
    from gitool.capture import CaptureConfig
    from gitool.files import InputSpec, LossSpec, TrainingSpec
    from gitool.models import ModelSpec

    spec = ModelSpec(name="fcn4", num_classes=10, input_shape=(3, 32, 32), last_bias=False,
                     options={"widths": "1024,256,64", "hidden_bias": "false"})
    config = CaptureConfig(loss=LossSpec(family="smoothing", label_smoothing=0.2),
                           training=TrainingSpec(batch_size=1, steps=1, dtype="float64"),
                           input=InputSpec(shape=spec.input_shape), init="uniform", seed=3)
    state["update"] = _save_capture(folder, CLIENT, spec, config, "samples")
    return "fcn4 without biases, label smoothing eps = 0.2, one image of samples/, float64"


def labels(folder: Path, state: dict) -> str:
    from gitool.files import save_result
    from gitool.plotting import plot_curve
    from gitool.steps import label_step

    update = state["update"]
    result, outcome = label_step(update, "auto", {})
    path = save_result(result, folder / f"{CLIENT}.labels.safetensors")
    if outcome.curve:
        plot_curve(outcome.curve, folder / f"{CLIENT}.labels.png")
    state["labels"] = result
    scores = _score(state, path, CLIENT)
    return (f"{outcome.method}: lambda = {outcome.diagnostics.get('lambda', float('nan')):.4g}, "
            f"max |y_hat - y| = {scores['max_abs_error']:.1e}, eps error {scores.get('eps_error', 0):.1e}")


def features(folder: Path, state: dict) -> str:
    from gitool.files import save_result
    from gitool.steps import feature_step

    result = feature_step(state["update"], state["labels"])
    path = save_result(result, folder / f"{CLIENT}.features.safetensors")
    state["features"] = result
    scores = _score(state, path, CLIENT)
    return f"last-layer input: relative error {scores['relative_error']:.1e}, cosine {scores['cosine']:.6f}"


def _reconstruct(folder: Path, state: dict, method: str, options: dict[str, Any], name: str) -> dict:
    from gitool.files import save_result
    from gitool.steps import reconstruct_step

    result, _ = reconstruct_step(state["update"], state["labels"], state["features"], method, options)
    path = save_result(result, folder / f"{name}.reconstruction.safetensors")
    return _score(state, path, CLIENT, png=folder / f"{name}.png")


def reconstruct_fc(folder: Path, state: dict) -> str:
    scores = _reconstruct(folder, state, "fc", {}, f"{CLIENT}-fc")
    return f"analytic: PSNR {scores['psnr']:.1f} dB, SSIM {scores['ssim']:.4f}"


def reconstruct_optimize(folder: Path, state: dict) -> str:
    options = {"optimizer": "lbfgs", "distance": "l2", "tv": 0.0, "terms": "gf", "iterations": 20, "seed": 0}
    scores = _reconstruct(folder, state, "optimize", options, f"{CLIENT}-optimize")
    return f"gradient matching (L-BFGS, 20 iterations): PSNR {scores['psnr']:.1f} dB, SSIM {scores['ssim']:.4f}"


def batch_counts(folder: Path, state: dict) -> str:
    from gitool.capture import CaptureConfig, SampleChoice
    from gitool.files import InputSpec, TrainingSpec, save_result
    from gitool.models import ModelSpec
    from gitool.steps import label_step

    spec = ModelSpec(name="lenet", num_classes=10, input_shape=(3, 32, 32), activation="relu")
    config = CaptureConfig(training=TrainingSpec(batch_size=8, steps=5, lr=0.01),
                           input=InputSpec(shape=spec.input_shape), init="default",
                           choice=SampleChoice(dirichlet_alpha=0.5), seed=11)
    update = _save_capture(folder, BATCH_CLIENT, spec, config, "samples")
    result, outcome = label_step(update, "auto", {"aux": "synthetic", "aux_per_class": 10, "seed": 0})
    path = save_result(result, folder / f"{BATCH_CLIENT}.labels.safetensors")
    scores = _score(state, path, BATCH_CLIENT)
    return (f"FedAvg B = 8, m = 5 on lenet, {outcome.method} counts: cAcc {scores['cAcc']:.2f}, "
            f"iAcc {scores['iAcc']:.2f}")


STEPS: list[tuple[str, Callable[[Path, dict], str]]] = [
    ("capture", capture_single),
    ("labels", labels),
    ("features", features),
    ("reconstruct fc", reconstruct_fc),
    ("reconstruct optimize", reconstruct_optimize),
    ("label counts (RLU)", batch_counts),
]


def run_demo(folder: Path, on_step: Callable[[str, int, int], None] | None = None) -> dict:
    """Run every step into ``folder``; return and write ``summary.json``."""
    from gitool.errors import UsageError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file; the demo needs a folder")
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    state: dict[str, Any] = {"scores": {}}
    steps = []
    for i, (name, step) in enumerate(STEPS):
        if on_step:
            on_step(name, i, len(STEPS))
        t0 = time.perf_counter()
        headline = step(folder, state)
        steps.append({"name": name, "headline": headline, "seconds": time.perf_counter() - t0})
    if on_step:
        on_step("done", len(STEPS), len(STEPS))
    summary = {"folder": str(folder), "seconds": time.perf_counter() - started, "steps": steps,
               "scores": state["scores"], "files": sorted(p.name for p in folder.iterdir())}
    atomic_write_bytes(folder / "summary.json", json.dumps(summary, indent=2, default=str).encode())
    return summary
