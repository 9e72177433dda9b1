"""One attack step on one update: the function a command, the demo and the audit all call.

Each step takes loaded objects (an `Update`, earlier `Result`s), runs one registry entry
and returns the new `Result` with its pointer back to the update, ready for
``save_result``; the caller decides where it goes. Scoring is a step of its own and only
ever reads the truth after the attack ran, so no result is chosen by looking at it.

    result, outcome = label_step(update, "auto", options)   # labels / counts
    features = feature_step(update, result, options)         # last-layer input
    recon, outcome = reconstruct_step(update, result, features, "fc", options)
    row = score_step(recon, truth)                           # PSNR, SSIM, ...
"""

from __future__ import annotations

import time
from typing import Any, Callable

LPIPS_SKIPPED = ("LPIPS skipped: it needs pretrained network weights, none are bundled and nothing can be "
                 "downloaded here (give local ones with --lpips-weights)")


def label_step(update, method: str = "auto", options: dict[str, Any] | None = None):
    """Soft labels or label counts of ``update`` by ``method`` ("auto": the registry's
    pick for the update). Returns (labels Result, LabelOutcome)."""
    from gitool.files import new_result
    from gitool.labels import LABEL_METHODS, label_method

    entry = label_method(update, method)
    outcome = entry(update, options, LABEL_METHODS)
    tensors = {key: value for key, value in (("labels", outcome.labels), ("counts", outcome.counts))
               if value is not None}
    result = new_result("labels", tensors, method=entry.name, update=update, options=outcome.options,
                        diagnostics=outcome.diagnostics, wall_time=outcome.seconds)
    return result, outcome


def feature_step(update, labels_result, options: dict[str, Any] | None = None):
    """The last-layer input of a single-sample gradient from its recovered label."""
    from gitool.files import new_result
    from gitool.labels_single import recover_features

    labels_result.check_source(update)
    options = dict(options or {})
    started = time.perf_counter()
    feature, diagnostics = recover_features(update, labels_result, options)
    seconds = time.perf_counter() - started
    recorded = {"device": options.get("device") or "cpu",
                "labels": str(labels_result.path) if labels_result.path else None}
    return new_result("features", {"features": feature}, method=diagnostics["method"], update=update,
                      options=recorded, diagnostics=diagnostics, wall_time=seconds)


def reconstruct_step(update, labels=None, features=None, method: str = "fc", options: dict[str, Any] | None = None,
                     progress: Callable[[int, int, dict], None] | None = None):
    """The client's images by ``method`` (a RECON_METHODS name). Returns (reconstruction
    Result, ReconOutcome)."""
    from gitool.files import new_result
    from gitool.reconstruct import reconstruct

    started = time.perf_counter()
    outcome = reconstruct(update, labels, features, method, options, progress)
    seconds = time.perf_counter() - started
    result = new_result("reconstruction", {"images": outcome.images}, method=method, update=update,
                        options=outcome.options, diagnostics=outcome.diagnostics, wall_time=seconds)
    return result, outcome


def check_truth_fits_update(truth, update=None) -> None:
    """A truth against its update (N, K, d, input shape): ``update`` when the caller holds
    it, else the one the truth's pointer names when it is at hand."""
    from gitool.files import check_fits_update, pointed_update

    if update is None:
        update = pointed_update(truth.meta.get("update"), truth.path)
    if update is not None:
        check_fits_update("truth", {n: getattr(truth, n) for n in truth.TENSORS}, update, truth.path)


def score_step(result, truth, lpips_net=None) -> dict[str, Any]:
    """The metrics of ``result`` against ``truth`` (gitool.metrics conventions), LPIPS for
    images when a network is given (None otherwise), and a ``warning`` when the two
    belong to different updates."""
    from gitool import metrics

    row: dict[str, Any] = dict(metrics.score(result, truth))
    mismatch = result.other_update_than(truth)
    if mismatch:
        row["warning"] = mismatch
    if result.kind == "reconstruction":
        row["lpips"] = None
        if lpips_net is not None:
            from gitool.lpips import lpips_distance

            recovered = result.require("images")[: len(row["matching"])]
            values = lpips_distance(lpips_net, recovered, truth.images[row["matching"]])
            row["lpips"] = float(values.mean())
            row["lpips_per_image"] = [float(v) for v in values]
    return row
