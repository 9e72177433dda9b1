"""The steps of an attack chain: what each command does, without parsing its options or
printing its results, so that the command line, the demo and the audit run one body
(sqlite-utils' "one body behind two commands").

Two levels:

- **one attack step on loaded objects** (an `Update`, earlier `Result`s): runs one registry
  entry and returns the new `Result` with its pointer back to the update; the caller
  decides where it goes. Scoring is a step of its own and only ever reads the truth after
  the attack ran, so no result is chosen by looking at it::

      result, outcome = label_step(update, "auto", options)   # labels / counts
      features = feature_step(update, result, options)         # last-layer input
      recon, outcome = reconstruct_step(update, result, features, "fc", options)
      row = score_step(recon, truth)                           # PSNR, SSIM, ...

- **one command on files**: ``labels``, ``features``, ``reconstruct_files``, ``score``,
  ``capture``, ``train``, ``import_files``, ``export`` take the option values by their names,
  check them (usage errors answer before torch is imported wherever no file is needed),
  read, run the step above per input, write, and return plain rows for a table or
  ``--json``. Over many inputs they report through a :class:`Progress` and collect
  failures instead of stopping at the first one.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from gitool import interrupts
from gitool.errors import GitoolError, UsageError, attack_errors
from gitool.paths import identity, refuse_overlap


# --------------------------------------------------------------------------- one step on loaded objects

LPIPS_SKIPPED = ("LPIPS skipped: it needs pretrained network weights, none are bundled and nothing can be "
                 "downloaded here (give local ones with --lpips-weights)")


def label_step(update, method: str = "auto", options: dict[str, Any] | None = None):
    """Soft labels or label counts of ``update`` by ``method`` ("auto": the registry's
    pick for the update). Returns (labels Result, LabelOutcome)."""
    from gitool.files import new_result
    from gitool.labels import LABEL_METHODS, label_method

    entry = label_method(update, method)
    outcome = entry(update, options, LABEL_METHODS)
    tensors = {key: value for key, value in (("labels", outcome.labels), ("counts", outcome.counts),
                                             ("softmax", outcome.softmax)) if value is not None}
    result = new_result("labels", tensors, method=entry.name, update=update, options=outcome.options,
                        diagnostics=outcome.diagnostics, wall_time=outcome.seconds)
    return result, outcome


def feature_step(update, labels_result, options: dict[str, Any] | None = None):
    """The last-layer input of a single-sample gradient from its recovered label, or the B
    inputs of a batch from per-sample labels (a labels file with softmax outputs)."""
    from gitool.files import new_result

    if labels_result.get("softmax") is not None:
        from gitool.labels_per_sample import recover_features
    else:
        from gitool.labels_single import recover_features

    labels_result.check_source(update)
    options = dict(options or {})
    started = time.perf_counter()
    with attack_errors():
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


# --------------------------------------------------------------------------- shared checks


def check_seed(seed: int, count: int = 1) -> None:
    """Seeds S .. S + count - 1 must fit the generators (numpy's and torch's take 0 .. 2**63 - 1 here)."""
    from gitool.specs import MAX_SEED

    if not 0 <= seed <= MAX_SEED - (count - 1):
        raise UsageError(f"--seed must be in [0, 2**63 - 1]{' less --repeat' if count > 1 else ''}, got {seed}")


def check_device(device: str) -> None:
    if device == "cpu":  # no need to start torch for the default
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")


def check_output(path: Path | None, what: str = "--output") -> None:
    if path is not None and path.parent and not path.parent.exists():
        raise UsageError(f"{what}: folder {path.parent} does not exist")


def check_out_dir(out_dir: Path | None) -> None:
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out-dir {out_dir} is a file")


def stem(path: Path) -> str:
    from gitool.files import stem_of

    return stem_of(path)


def init_path(init: str | None) -> Path | None:
    """``--init`` as an input file (a checkpoint), or None for uniform/default."""
    return Path(init) if init not in (None, "uniform", "default") else None


# --------------------------------------------------------------------------- many inputs


@dataclass
class Progress:
    """How a long step reports: ``start(description, total)`` once, ``advance(info)``
    after each input, ``update(completed, total, description)`` within one long input
    (iterations, epochs), ``failed(path, message)`` for each input that failed among many.
    The defaults do nothing, so library callers need not care."""

    start: Callable[[str, int | None], None] = lambda description, total: None
    advance: Callable[[dict], None] = lambda info: None
    update: Callable[[int, int | None, str], None] = lambda completed, total, description: None
    failed: Callable[[Path, str], None] = lambda path, message: None


@dataclass
class Batch:
    """What a step over many inputs did: one row per input that worked, one
    ``{"update": path, "error": message}`` per input that failed."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)

    def raise_failures(self, total: int, key: str = "update") -> None:
        if self.failures:
            first = self.failures[0]
            raise GitoolError(f"{len(self.failures)} of {total} {key}s failed (first: {first[key]}: "
                              f"{first['error']})")


def run_each(paths: list[Path], work: Callable[[Path], dict[str, Any]], progress: Progress | None,
             description: str, key: str = "update") -> Batch:
    """``work(path)`` for every path. With one path an error stops the step; with many it
    is recorded and the others go on (a folder of updates is one job)."""
    progress = progress or Progress()
    batch = Batch()
    progress.start(description, len(paths))
    for path in paths:
        try:
            with attack_errors():
                batch.rows.append(work(path))
        except GitoolError as exc:
            if len(paths) == 1:
                raise
            batch.failures.append({key: str(path), "error": str(exc)})
            progress.failed(path, str(exc))
        progress.advance({})
    return batch


def plan_outputs(inputs: list[Path], output: Path | None, out_dir: Path | None, kind: str, *,
                 other_inputs: Iterable[tuple[str, Path | None]] = (),
                 other_outputs: Iterable[tuple[str, Path | None]] = ()) -> dict[Path, Path]:
    """Where each input's output of ``kind`` goes: ``-o FILE`` for one input, or
    ``--out-dir DIR`` where each output keeps its input's stem. Refuses, before any work,
    an output that is one of the inputs; makes ``out_dir``."""
    from gitool.files import output_name

    if output is not None and out_dir is not None:
        raise UsageError("give -o/--output FILE for one update or --out-dir DIR for many, not both")
    if output is None and out_dir is None:
        raise UsageError("give -o/--output FILE (or --out-dir DIR for many updates)")
    if output is not None and len(inputs) > 1:
        raise UsageError(f"{len(inputs)} updates: use --out-dir DIR (outputs keep each input's stem)")
    check_output(output)
    check_out_dir(out_dir)
    targets = {path: output if output is not None else out_dir / output_name(path, kind) for path in inputs}
    refuse_overlap([("the update", path) for path in inputs] + list(other_inputs),
                   [("--output" if output is not None else "--out-dir file", t) for t in targets.values()]
                   + list(other_outputs))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    return targets


def companion(given: Path | None, update: Path, kind: str, option: str, many: bool) -> Path | None:
    """The ``kind`` result that goes with ``update``: the file given, or for many updates
    ``STEM.KIND.safetensors`` inside the folder given (``--labels DIR``)."""
    from gitool.files import output_name

    if given is None:
        return None
    if given.is_dir():
        return given / output_name(update, kind)
    if many:
        raise UsageError(f"{option} names one file; for many updates give a folder of STEM.{kind}.safetensors")
    return given


# --------------------------------------------------------------------------- labels


def label_options(method: str, options: dict[str, Any]) -> None:
    """Refuse an unknown method or an impossible option value before any file is read,
    whichever method ``auto`` will pick."""
    from gitool.labels import LABEL_METHODS

    if method != "auto" and method not in LABEL_METHODS:
        raise UsageError(f"--method must be auto or one of {', '.join(LABEL_METHODS)}, got {method!r}")
    for entry in ([LABEL_METHODS[method]] if method != "auto" else LABEL_METHODS.values()):
        entry.parse_options(options, require_aux=method != "auto")


def label_update(path: Path, target: Path, method: str = "auto", options: dict[str, Any] | None = None,
                 plot: Path | None = None) -> dict[str, Any]:
    """Recover one update's labels (or counts) and write ``target``; a row for the table."""
    from gitool.files import load_update, save_result

    update = load_update(path, tensors="classifier")  # the method reads the rest if it needs it
    result, outcome = label_step(update, method, options or {})
    save_result(result, target)
    if plot is not None:
        if outcome.curve is None:
            raise UsageError(f"--plot: method {result.method!r} has no search curve to draw")
        from gitool.plotting import plot_curve

        plot_curve(outcome.curve, plot)
    row: dict[str, Any] = {"update": str(path), "output": str(target), "method": result.method,
                           "seconds": outcome.seconds, "diagnostics": outcome.diagnostics}
    if outcome.labels is not None:
        row["labels"] = outcome.labels
        if outcome.labels.shape[0] == 1:
            values = outcome.labels[0]
            top = values.topk(min(2, values.numel()))
            row["top"] = [(int(i), float(v)) for v, i in zip(top.values, top.indices)]
    if outcome.counts is not None:
        row["counts"] = outcome.counts
    row["summary"] = outcome.summary
    return row


def labels(*, updates: list[Path], output: Path | None, out_dir: Path | None, method: str, family: str | None,
           search: str | None, aux: str | None, aux_per_class: int | None, seed: int, plot: Path | None,
           model: list[str] | None, device: str, progress: Progress | None = None, drift: str | None = None,
           per_sample: bool = False, batch_draws: int | None = None) -> Batch:
    """``gitool labels``: every update's labels file (``per_sample``: --method per-sample)."""
    if per_sample:
        if method not in ("auto", "per-sample"):
            raise UsageError(f"--per-sample is --method per-sample; it cannot be combined with --method {method}")
        method = "per-sample"
    from gitool.files import expand_inputs
    from gitool.resolve import trust_models

    if output is not None and out_dir is not None:  # usage errors first: they need no torch
        raise UsageError("give -o/--output FILE for one update or --out-dir DIR for many, not both")
    if output is None and out_dir is None:
        raise UsageError("give -o/--output FILE (or --out-dir DIR for many updates)")
    options = {"family": family, "search": search, "seed": seed, "device": device, "aux": aux,
               "aux_per_class": aux_per_class, "drift": drift, "batch_draws": batch_draws}
    label_options(method, options)
    check_device(device)
    check_seed(seed)
    trust_models(model)
    paths = expand_inputs(updates, "update")
    if plot is not None and len(paths) > 1:
        raise UsageError("--plot draws one search: give one update")
    if plot is not None and search == "pso":
        raise UsageError("--plot draws the scan's loss curve over lambda; it needs --search scan")
    check_output(plot, "--plot")
    targets = plan_outputs(paths, output, out_dir, "labels", other_outputs=[("--plot", plot)])
    return run_each(paths, lambda path: label_update(path, targets[path], method, options, plot), progress,
                    "recovering labels")


# --------------------------------------------------------------------------- features


def features_update(path: Path, labels_path: Path, target: Path, device: str = "cpu") -> dict[str, Any]:
    """The last-layer feature(s) of one update from its labels; writes ``target``."""
    from gitool.files import load_result, load_update, save_result

    update = load_update(path, tensors="classifier")  # x needs the classifier's tensors alone
    result = feature_step(update, load_result(labels_path, ("labels",)), {"device": device})
    save_result(result, target)
    return {"update": str(path), "labels": str(labels_path), "output": str(target), "seconds": result.wall_time,
            "shape": list(result.tensors["features"].shape), "diagnostics": result.diagnostics}


def features(*, updates: list[Path], labels_path: Path, output: Path | None, out_dir: Path | None,
             model: list[str] | None, device: str, progress: Progress | None = None) -> Batch:
    """``gitool features``: every update's features file, from its labels file."""
    from gitool.files import expand_inputs
    from gitool.resolve import trust_models

    check_device(device)
    trust_models(model)
    paths = expand_inputs(updates, "update")
    labels_of = {path: companion(labels_path, path, "labels", "--labels", len(paths) > 1) for path in paths}
    targets = plan_outputs(paths, output, out_dir, "features",
                           other_inputs=[("--labels", p) for p in labels_of.values()])
    return run_each(paths, lambda path: features_update(path, labels_of[path], targets[path], device), progress,
                    "recovering features")


# --------------------------------------------------------------------------- reconstruct


def reconstruct_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The method's options, checked before any file is read (unknown method, bad values)."""
    from gitool.reconstruct import RECON_METHODS

    if method not in RECON_METHODS:
        raise UsageError(f"--method must be one of {', '.join(RECON_METHODS)}, got {method!r}")
    RECON_METHODS[method].parse_options(options)
    return options


def reconstruct_update(path: Path, target: Path, method: str, options: dict[str, Any], *,
                       labels_path: Path | None = None, features_path: Path | None = None, png: Path | None = None,
                       explain: Callable[[list[dict]], None] | None = None,
                       progress: Callable[[int, int, dict], None] | None = None) -> dict[str, Any]:
    """Reconstruct one update's inputs and write ``target`` (and ``png``)."""
    from gitool.files import load_result, load_update, save_result

    update = load_update(path)
    labels_result = load_result(labels_path, ["labels"]) if labels_path is not None else None
    features_result = load_result(features_path, ["features"]) if features_path is not None else None
    if explain is not None and method in ("fc", "conv"):
        from gitool import reconstruct_analytic

        explain(reconstruct_analytic.explain(update, method))
    options = dict(options)
    if method == "optimize" and options.get("save_every") and options.get("save_dir") is None:
        options["save_dir"] = str(target.parent / f"{stem(target)}.optimize-steps")
    # Gradient matching stops on SIGINT / SIGTERM and keeps its best iterate: written like any
    # result, then the signal is raised again (exit 130 / 143).
    with interrupts.deferred() if method == "optimize" else contextlib.nullcontext():
        result, outcome = reconstruct_step(update, labels_result, features_result, method, options, progress)
        save_result(result, target)
        if png is not None:
            from gitool.plotting import save_image_grid

            save_image_grid(outcome.images, png, captions=[f"#{i}" for i in range(outcome.images.shape[0])])
    if method == "optimize":
        interrupts.reraise()
    return {"update": str(path), "output": str(target), "png": str(png) if png else None, "method": method,
            "seconds": result.wall_time, "images": list(outcome.images.shape), "diagnostics": outcome.diagnostics,
            "summary": outcome.summary}


def reconstruct_files(*, updates: list[Path], output: Path | None, out_dir: Path | None, labels_path: Path | None,
                      features_path: Path | None, method: str, png: Path | None, options: dict[str, Any],
                      seed: int, model: list[str] | None, device: str,
                      explain: Callable[[list[dict]], None] | None = None,
                      on_iteration: Callable[[int, int, dict], None] | None = None,
                      progress: Progress | None = None) -> Batch:
    """``gitool reconstruct``: every update's reconstruction file."""
    from gitool.files import expand_inputs
    from gitool.resolve import trust_models

    reconstruct_options(method, {**options, "seed": seed, "device": device})  # before any torch import
    check_device(device)
    check_seed(seed)
    trust_models(model)
    paths = expand_inputs(updates, "update")
    many = len(paths) > 1
    if png is not None and many:
        raise UsageError("--png draws one reconstruction: give one update (or use gitool score --png per file)")
    check_output(png, "--png")
    labels_of = {path: companion(labels_path, path, "labels", "--labels", many) for path in paths}
    features_of = {path: companion(features_path, path, "features", "--features", many) for path in paths}
    targets = plan_outputs(paths, output, out_dir, "reconstruction",
                           other_inputs=[("--labels", p) for p in labels_of.values()]
                           + [("--features", p) for p in features_of.values()],
                           other_outputs=[("--png", png)])
    options = {**options, "seed": seed, "device": device}
    return run_each(paths, lambda path: reconstruct_update(
        path, targets[path], method, options, labels_path=labels_of[path], features_path=features_of[path],
        png=png, explain=explain, progress=on_iteration), progress, f"reconstruct ({method})")


# --------------------------------------------------------------------------- score


def score_result(path: Path, truth_path: Path, lpips_net=None, png: Path | None = None) -> dict[str, Any]:
    """One result against its truth: the metrics of methods.md section 4, a warning when
    the two come from different updates, LPIPS with local weights, a PNG grid on request."""
    from gitool.files import load_result, load_truth

    result = load_result(path)
    truth = load_truth(truth_path)
    check_truth_fits_update(truth)
    row = {"file": str(path), "kind": result.kind, "method": result.method, "truth": str(truth_path),
           **score_step(result, truth, lpips_net)}
    if png is not None:
        if result.kind != "reconstruction":
            raise UsageError(f"--png draws reconstructions; {path} is a {result.kind} file")
        from gitool.plotting import save_score_grid

        save_score_grid(result.require("images"), truth.images, row, png, title=Path(row["file"]).name)
    return row


def score(*, results: list[Path], truth: Path | None, truth_dir: Path | None, png: Path | None,
          lpips_weights: Path | None, warn: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """``gitool score``: every result against its truth, with a summary per kind."""
    from gitool import metrics
    from gitool.files import RESULT_KINDS, stem_of

    if truth is None and truth_dir is None:
        raise UsageError("give --truth FILE (or --truth-dir DIR for many files)")
    paths: list[Path] = []
    for item in results:
        if item.is_dir():
            found = sorted(p for kind in RESULT_KINDS for p in item.glob(f"*.{kind}.safetensors"))
            if not found:
                raise GitoolError(f"{item}: no labels, features or reconstruction files in this folder")
            paths.extend(found)
        else:
            paths.append(item)
    if truth is not None and len(paths) > 1:
        raise UsageError("--truth takes one result file; use --truth-dir DIR for many")
    if png is not None and len(paths) != 1:
        raise UsageError("--png draws one reconstruction: give exactly one file")
    check_output(png, "--png")
    truth_paths = [truth if truth is not None else truth_dir / f"{stem_of(path)}.truth.safetensors" for path in paths]
    refuse_overlap([("the result", path) for path in paths] + [("the truth", t) for t in truth_paths]
                   + [("--lpips-weights", lpips_weights)], [("--png", png)])
    lpips_net = None
    if lpips_weights is not None:
        from gitool.lpips import load_lpips

        lpips_net = load_lpips(lpips_weights)
    rows = []
    for path, truth_path in zip(paths, truth_paths):
        row = score_result(path, truth_path, lpips_net, png)
        if "warning" in row:
            warn(row["warning"])
        rows.append(row)
    kinds = sorted({r["kind"] for r in rows})
    summary = {kind: metrics.aggregate([r for r in rows if r["kind"] == kind], kind) for kind in kinds}
    notes = [LPIPS_SKIPPED] if "reconstruction" in kinds and lpips_net is None else []
    return {"files": rows, "summary": summary, "notes": notes}


def refuse_mismatch(rows: list[dict], allowed: bool) -> None:
    """Scores of a result against another update's truth are garbage that looks fine:
    they are printed, and the command fails unless the user said it is intended."""
    mismatched = [row for row in rows if "warning" in row]
    if mismatched and not allowed:
        raise GitoolError(f"{len(mismatched)} result(s) were scored against the truth of another update (first: "
                          f"{mismatched[0]['file']}); their numbers mean nothing. Pass --allow-mismatch if the "
                          "pairing is intended (a re-imported export)")


# --------------------------------------------------------------------------- capture


def label_family(label_smoothing: str | None, mixup: float | None, mixup_coef: float | None,
                 hard_labels: bool | None = None) -> dict[str, Any] | None:
    """The loss section the label options describe (None: no option given).
    ``hard_labels`` is None where the command has no ``--hard-labels`` (capture)."""
    from gitool.resolve import parse_float_range

    if sum([bool(hard_labels), label_smoothing is not None, mixup is not None or mixup_coef is not None]) > 1:
        raise UsageError("choose label smoothing or mixup, not both" if hard_labels is None else
                         "choose one label family: --hard-labels, --label-smoothing or --mixup/--mixup-coef")
    if mixup is not None and mixup_coef is not None:
        raise UsageError("choose --mixup ALPHA or --mixup-coef C, not both")
    if hard_labels:
        return {"family": "hard"}
    if label_smoothing is not None:
        lo, hi = parse_float_range(label_smoothing, "--label-smoothing")
        return ({"family": "smoothing", "label_smoothing": lo} if lo == hi
                else {"family": "smoothing", "label_smoothing_range": (lo, hi)})
    if mixup is not None or mixup_coef is not None:
        return {"family": "mixup", "mixup_alpha": mixup, "mixup_coef": mixup_coef}
    return None


def capture_pairs(output: Path | None, truth: Path | None, out_dir: Path | None, repeat: int) -> list[tuple[Path, Path]]:
    """The (update, truth) file pairs ``capture`` writes."""
    if repeat < 1:
        raise UsageError("--repeat must be at least 1")
    if repeat > 1 and out_dir is None:
        raise UsageError("--repeat N needs --out-dir DIR")
    if out_dir is None and output is None:
        raise UsageError("give -o/--output FILE (or --out-dir DIR)")
    if out_dir is not None and (output is not None or truth is not None):
        raise UsageError("--out-dir names its files itself; drop -o/--truth")
    if out_dir is not None:
        check_out_dir(out_dir)
        return [(out_dir / f"{i:04d}.update.safetensors", out_dir / f"{i:04d}.truth.safetensors")
                for i in range(repeat)]
    check_output(output)
    truth = truth or output.parent / f"{stem(output)}.truth.safetensors"
    check_output(truth, "--truth")
    if identity(truth) == identity(output):  # the truth would silently replace the update
        raise UsageError(f"the update and the truth would both be {output}; name the update "
                         "STEM.update.safetensors or give another --truth")
    return [(output, truth)]


def capture(*, output: Path | None, truth: Path | None, repeat: int, out_dir: Path | None, model: str | None,
            num_classes: int | None, image_size: str | None, activation: str | None, bias: bool | None,
            init: str | None, model_opt: list[str] | None, data: str, normalize: str | None, batch_size: int,
            steps: int, lr: float, optimizer: str, momentum: float, prox_mu: float, weight_decay: float,
            label_smoothing: str | None, mixup: float | None, mixup_coef: float | None, dp_clip: float | None,
            dp_noise: float | None, prune: float | None, indices: str | None, classes: str | None,
            dirichlet: float | None, mode: str, dtype: str, send: str | None, seed: int, device: str,
            model_output: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """``gitool capture``: simulate ``repeat`` client rounds and write each update with its truth."""
    check_device(device)
    check_seed(seed, repeat)
    pairs = capture_pairs(output, truth, out_dir, repeat)
    loss = label_family(label_smoothing, mixup, mixup_coef) or {"family": "hard"}
    if optimizer == "fedprox" and prox_mu == 0:
        raise UsageError("--optimizer fedprox needs --prox-mu > 0")
    from gitool.capture import CaptureConfig, SampleChoice, capture as run_capture
    from gitool.data import open_source
    from gitool.files import save_capture
    from gitool.models import build_model
    from gitool.resolve import parse_int_list, resolve_model
    from gitool.specs import DefenceSpec, InputSpec, LossSpec, TrainingSpec, option_errors

    spec, init_state, checkpoint_meta, init = resolve_model(model, num_classes, image_size, activation, bias,
                                                            model_opt, init, output=model_output)
    build_model(spec)  # validate the model before touching data
    mean, std = input_normalization(normalize, spec.input_shape[0], checkpoint_meta)
    with option_errors():
        config = CaptureConfig(
            loss=LossSpec(**loss),
            training=TrainingSpec(batch_size=batch_size, steps=steps, lr=lr, optimizer=optimizer,
                                  momentum=momentum if optimizer == "momentum" else 0.0,
                                  prox_mu=prox_mu if optimizer == "fedprox" else 0.0,
                                  weight_decay=weight_decay, model_mode=mode, dtype=dtype),
            defence=DefenceSpec(dp_clip=dp_clip, dp_noise=dp_noise, prune=prune),
            input=InputSpec(shape=tuple(spec.input_shape), mean=mean, std=std),
            choice=SampleChoice(indices=parse_int_list(indices, "--indices"),
                                classes=parse_int_list(classes, "--classes"), dirichlet_alpha=dirichlet),
            send=send, init=init, device=device)
    source = open_source(data, tuple(spec.input_shape), num_classes=spec.num_classes, seed=0)
    refuse_overlap([("--init", init_path(init))],
                   [(what, path) for pair in pairs for what, path in zip(("the update", "the truth"), pair)])
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    progress = progress or Progress()
    progress.start("capturing", repeat if repeat > 1 else None)
    written = []
    started = time.perf_counter()
    for i, (update_path, truth_path) in enumerate(pairs):
        update, truth_obj = run_capture(source, spec, replace(config, seed=seed + i), init_state=init_state,
                                        provenance={"data": data})
        save_capture(update, truth_obj, update_path, truth_path)
        written.append({"update": str(update_path), "truth": str(truth_path), "seed": seed + i, "kind": update.kind})
        progress.advance({})
    return {"written": written, "seconds": time.perf_counter() - started, "model": spec.name,
            "num_classes": spec.num_classes, "family": loss["family"]}


def input_normalization(normalize: str | None, channels: int, checkpoint_meta: dict) -> tuple[tuple, tuple]:
    """``--normalize``, else the normalisation the ``--init`` checkpoint was trained with
    (attack the model as it was trained), else none."""
    from gitool.resolve import parse_normalization

    if normalize is None and "normalize" in checkpoint_meta:
        return tuple(checkpoint_meta["normalize"]["mean"]), tuple(checkpoint_meta["normalize"]["std"])
    return parse_normalization(normalize or "none", channels)


# --------------------------------------------------------------------------- train


def train(*, output: Path, model: str | None, num_classes: int | None, image_size: str | None,
          activation: str | None, bias: bool | None, init: str | None, model_opt: list[str] | None, data: str,
          normalize: str, epochs: int, lr: float, batch_size: int, seed: int, device: str,
          model_output: str | None = None,
          on_epoch: Callable[[str, int, int, float], None] = lambda name, epoch, total, loss: None) -> dict:
    """``gitool train``: train a zoo model on a data source and write a checkpoint."""
    import torch

    from gitool.data import open_source
    from gitool.files import Checkpoint, load_state, save_checkpoint
    from gitool.models import build_model, init_parameters
    from gitool.resolve import parse_normalization, resolve_model
    from gitool.specs import InputSpec
    from gitool.train import check_settings, train_model

    check_device(device)
    check_seed(seed)
    check_output(output)
    refuse_overlap([("--init", init_path(init))], [("--output", output)])
    check_settings(epochs=epochs, lr=lr, batch_size=batch_size)
    spec, init_state, _, _ = resolve_model(model, num_classes, image_size, activation, bias, model_opt, init,
                                           output=model_output)
    mean, std = parse_normalization(normalize, spec.input_shape[0])
    torch.manual_seed(seed)
    net = build_model(spec)
    if init_state is not None:
        load_state(net, init_state, what="checkpoint weights")
    else:
        init_parameters(net, init, torch.Generator().manual_seed(seed))
    source = open_source(data, tuple(spec.input_shape), num_classes=spec.num_classes, seed=0)
    started = time.perf_counter()
    on_epoch(spec.name, 0, epochs, float("nan"))
    report = train_model(net, source, InputSpec(shape=tuple(spec.input_shape), mean=mean, std=std), epochs=epochs,
                         lr=lr, batch_size=batch_size, seed=seed, device=device,
                         progress=lambda epoch, loss: on_epoch(spec.name, epoch, epochs, loss))
    meta = {"data": data, "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
            "normalize": {"mean": mean, "std": std}, "train_accuracy": report.train_accuracy,
            "heldout_accuracy": report.heldout_accuracy, "final_loss": report.final_loss}
    save_checkpoint(Checkpoint(model=spec, state=dict(net.to("cpu").state_dict()), meta=meta), output)
    return {"output": str(output), "seconds": time.perf_counter() - started, "model": spec.name, **meta}


# --------------------------------------------------------------------------- import and export


def import_facts(*, spec_channels: int, batch_size: int | None, steps: int | None, lr: float | None,
                 optimizer: str | None, momentum: float | None, prox_mu: float | None, weight_decay: float | None,
                 mode: str | None, hard_labels: bool, label_smoothing: str | None, mixup: float | None,
                 mixup_coef: float | None, normalize: str | None, no_defence: bool, dp_clip: float | None,
                 dp_noise: float | None, prune: float | None) -> dict[str, Any]:
    """The facts the options of ``gitool import`` state, by section (what nobody gave is absent)."""
    from gitool.resolve import parse_normalization

    given: dict[str, Any] = {}
    training = {name: value for name, value in (("batch_size", batch_size), ("steps", steps), ("lr", lr),
                                                ("optimizer", optimizer), ("momentum", momentum),
                                                ("prox_mu", prox_mu), ("weight_decay", weight_decay),
                                                ("model_mode", mode)) if value is not None}
    if optimizer is not None:  # an optimiser given here replaces the file's coefficients too
        training = {"momentum": 0.0, "prox_mu": 0.0, **training}
    if training:
        given["training"] = training
    loss = label_family(label_smoothing, mixup, mixup_coef, hard_labels)
    if loss is not None:
        given["loss"] = loss
    if normalize is not None:
        mean, std = parse_normalization(normalize, spec_channels)
        given["input"] = {"mean": mean, "std": std}
    defence = {name: value for name, value in (("dp_clip", dp_clip), ("dp_noise", dp_noise), ("prune", prune))
               if value is not None}
    if no_defence and defence:
        raise UsageError("--no-defence contradicts --dp-clip/--dp-noise/--prune")
    if no_defence or defence:
        given["defence"] = defence
    return given


def import_files(*, output: Path, before: Path, after: Path | None, delta: Path | None, grad: Path | None,
                 facts: Path | None, model: str | None, num_classes: int | None, image_size: str | None,
                 activation: str | None, bias: bool | None, model_opt: list[str] | None,
                 model_output: str | None = None, **fact_options: Any) -> Any:
    """``gitool import``: weights saved by another stack (and the facts the user states)
    into an update file; a fact nobody gave is recorded as unknown."""
    from gitool.files import save_update
    from gitool.interop import import_update, merge_facts, read_facts_file, spec_in_weights
    from gitool.resolve import resolve_model

    check_output(output)
    refuse_overlap([("--before", before), ("--after", after), ("--delta", delta), ("--grad", grad),
                    ("--facts", facts)], [("--output", output)])
    file_facts = read_facts_file(facts) if facts is not None else {}
    base = file_facts.get("model")
    base_has_shape = "input_shape" in file_facts.get("model_fields", ())
    if base is None and model is None:
        base = spec_in_weights(before)
        base_has_shape = base is not None
    if base is None and model is None:
        raise UsageError("give --model (the architecture the weights belong to), or a facts file with a model")
    file_shape = file_facts.get("input", {}).get("shape")
    shape_text = image_size or ("x".join(map(str, file_shape)) if file_shape else None)
    spec, _, _, _ = resolve_model(model, num_classes, shape_text, activation, bias, model_opt, "default", base=base,
                                  output=model_output)
    shape_known = shape_text is not None or (base_has_shape and model in (None, base.name))
    given = import_facts(spec_channels=spec.input_shape[0], **fact_options)
    update = import_update(spec, before, after=after, delta=delta, gradient=grad,
                           facts=merge_facts(file_facts, given), input_shape_known=shape_known, facts_path=facts)
    save_update(update, output)
    return update


def truth(*, update_file: Path, private: Path, output: Path, model: list[str] | None, device: str) -> dict[str, Any]:
    """``gitool truth``: the truth file of an update from the client's own private batch,
    with how closely replaying the client's local training on it gives back the update."""
    from gitool.files import load_update, save_truth
    from gitool.private_batch import describe_replay, replay_tolerance, truth_from_private_batch
    from gitool.resolve import trust_models

    check_device(device)
    trust_models(model)
    check_output(output)
    refuse_overlap([("the update", update_file), ("--private", private)], [("--output", output)])
    update = load_update(update_file)
    made, error = truth_from_private_batch(update, private, device=device)
    save_truth(made, output)
    return {"output": str(output), "samples": int(made.labels.shape[0]), "replay_error": error,
            "replays": error <= replay_tolerance(update), "summary": describe_replay(update, error),
            "model": update.model.name}


def inspect(*, file: Path, model: list[str] | None) -> dict[str, Any]:
    """``gitool inspect``: the file's header, tensor statistics and what the commands would say;
    ``model`` names the user factories the file may name (to check it against its model)."""
    from gitool.inspect import inspect_file
    from gitool.resolve import trust_models

    trust_models(model)
    return inspect_file(file)


def export(*, update_file: Path, output: Path, fmt: str | None, model: list[str] | None) -> dict[str, Path]:
    """``gitool export``: an update out for other tools (torch bundle or npz lists) with its facts."""
    from gitool.files import load_update
    from gitool.interop import export_update
    from gitool.resolve import trust_models

    trust_models(model)
    check_output(output)
    refuse_overlap([("the update", update_file)], [("--output", output)])  # also when -o only names a stem
    return export_update(load_update(update_file), output, fmt,
                         check=lambda paths: refuse_overlap([("the update", update_file)],
                                                            [(f"the {part} file", p) for part, p in paths.items()]))
