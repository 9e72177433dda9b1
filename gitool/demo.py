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
6. a third client sends the gradient of one step on a batch of four images (FCN-4 with
   biases); the server recovers each sample's label and feature (``labels --per-sample``,
   ``features``) and reconstructs all four images (fc);
7. a second client sends a FedAvg update of several local steps on a mini-batch; the
   server recovers how many samples of each class it used (RLU);
8. score: every result against the truth, PNG grids, and `summary.json`.

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
MINI_BATCH_CLIENT = "minibatch"  # one-step client with B = 4 for the per-sample step


def _save_capture(folder: Path, stem: str, spec, config, data: str) -> None:
    from gitool.capture import capture
    from gitool.data import open_source
    from gitool.files import save_capture

    source = open_source(data, spec.input_shape, num_classes=spec.num_classes)
    update, truth = capture(source, spec, config, provenance={"data": data})
    save_capture(update, truth, _path(folder, stem, "update"), _path(folder, stem, "truth"))


def _path(folder: Path, stem: str, kind: str) -> Path:
    return folder / f"{stem}.{kind}.safetensors"


def _score(state: dict, result_path: Path, stem: str, png: Path | None = None) -> dict:
    """Score a result file against its truth, as `gitool score` does."""
    from gitool.steps import score_result

    scores = score_result(result_path, _path(result_path.parent, stem, "truth"), png=png)
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
    _save_capture(folder, CLIENT, spec, config, "samples")
    return "fcn4 without biases, label smoothing eps = 0.2, one image of samples/, float64"


def labels(folder: Path, state: dict) -> str:
    from gitool.steps import label_update

    row = label_update(_path(folder, CLIENT, "update"), _path(folder, CLIENT, "labels"),
                       plot=folder / f"{CLIENT}.labels.png")
    scores = _score(state, Path(row["output"]), CLIENT)
    return (f"{row['method']}: lambda = {row['diagnostics'].get('lambda', float('nan')):.4g}, "
            f"max |y_hat - y| = {scores['max_abs_error']:.1e}, eps error {scores.get('eps_error', 0):.1e}")


def features(folder: Path, state: dict) -> str:
    from gitool.steps import features_update

    row = features_update(_path(folder, CLIENT, "update"), _path(folder, CLIENT, "labels"),
                          _path(folder, CLIENT, "features"))
    scores = _score(state, Path(row["output"]), CLIENT)
    return f"last-layer input: relative error {scores['relative_error']:.1e}, cosine {scores['cosine']:.6f}"


def _reconstruct(folder: Path, state: dict, method: str, options: dict[str, Any], name: str) -> dict:
    from gitool.steps import reconstruct_update

    target = folder / f"{name}.reconstruction.safetensors"
    reconstruct_update(_path(folder, CLIENT, "update"), target, method, options,
                       labels_path=_path(folder, CLIENT, "labels"), features_path=_path(folder, CLIENT, "features"))
    return _score(state, target, CLIENT, png=folder / f"{name}.png")


def reconstruct_fc(folder: Path, state: dict) -> str:
    scores = _reconstruct(folder, state, "fc", {}, f"{CLIENT}-fc")
    return f"analytic: PSNR {scores['psnr']:.1f} dB, SSIM {scores['ssim']:.4f}"


def reconstruct_optimize(folder: Path, state: dict) -> str:
    options = {"optimizer": "lbfgs", "distance": "l2", "tv": 0.0, "terms": "gf", "iterations": 20, "seed": 0}
    scores = _reconstruct(folder, state, "optimize", options, f"{CLIENT}-optimize")
    return f"gradient matching (L-BFGS, 20 iterations): PSNR {scores['psnr']:.1f} dB, SSIM {scores['ssim']:.4f}"


def mini_batch(folder: Path, state: dict) -> str:
    """B = 4, one step: per-sample labels, the four features, the four images (the CLI's steps)."""
    from gitool.capture import CaptureConfig, SampleChoice
    from gitool.files import InputSpec, TrainingSpec
    from gitool.models import ModelSpec
    from gitool.steps import features_update, label_update, reconstruct_update

    spec = ModelSpec(name="fcn4", num_classes=10, input_shape=(3, 32, 32), last_bias=True,
                     options={"widths": "1024,256,64", "hidden_bias": "true"})
    config = CaptureConfig(training=TrainingSpec(batch_size=4, steps=1, dtype="float64"),
                           input=InputSpec(shape=spec.input_shape), init="default",
                           choice=SampleChoice(classes=[0, 3, 5, 8]), seed=5)
    _save_capture(folder, MINI_BATCH_CLIENT, spec, config, "samples")
    update, labels, feats = (_path(folder, MINI_BATCH_CLIENT, kind) for kind in ("update", "labels", "features"))
    row = label_update(update, labels, "per-sample")
    label_scores = _score(state, labels, MINI_BATCH_CLIENT)
    features_update(update, labels, feats)
    target = folder / f"{MINI_BATCH_CLIENT}-fc.reconstruction.safetensors"
    reconstruct_update(update, target, "fc", {}, labels_path=labels, features_path=feats)
    scores = _score(state, target, MINI_BATCH_CLIENT, png=folder / f"{MINI_BATCH_CLIENT}-fc.png")
    return (f"B = 4, one step, fcn4 with biases: per-sample labels {label_scores['target_accuracy']:.2f} right "
            f"(rank {row['diagnostics']['rank']}), all four images PSNR >= {min(scores['psnr_per_image']):.0f} dB")


def batch_counts(folder: Path, state: dict) -> str:
    from gitool.capture import CaptureConfig, SampleChoice
    from gitool.steps import label_update
    from gitool.files import InputSpec, TrainingSpec
    from gitool.models import ModelSpec

    spec = ModelSpec(name="lenet", num_classes=10, input_shape=(3, 32, 32), activation="relu")
    config = CaptureConfig(training=TrainingSpec(batch_size=8, steps=5, lr=0.01),
                           input=InputSpec(shape=spec.input_shape), init="default",
                           choice=SampleChoice(dirichlet_alpha=0.5), seed=11)
    _save_capture(folder, BATCH_CLIENT, spec, config, "samples")
    row = label_update(_path(folder, BATCH_CLIENT, "update"), _path(folder, BATCH_CLIENT, "labels"), "auto",
                       {"aux": "synthetic", "aux_per_class": 10, "seed": 0})
    scores = _score(state, Path(row["output"]), BATCH_CLIENT)
    return (f"FedAvg B = 8, m = 5 on lenet, {row['method']} counts: cAcc {scores['cAcc']:.2f}, "
            f"iAcc {scores['iAcc']:.2f}")


STEPS: list[tuple[str, Callable[[Path, dict], str]]] = [
    ("capture", capture_single),
    ("labels", labels),
    ("features", features),
    ("reconstruct fc", reconstruct_fc),
    ("reconstruct optimize", reconstruct_optimize),
    ("mini-batch (per-sample)", mini_batch),
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
