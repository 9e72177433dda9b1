"""One audit task: one update file in, its result files out, and a JSON-ready record.

The task reads the update (the classifier's tensors first; a method that needs the rest
reads it), plans its attacks from the update's facts (`gitool.audit.planner`), runs each
through the same step functions as the single commands (`gitool.steps`), writes every
result atomically, and only then reads the truth beside the update, if any, to score
them. A result already on disk is reused when it is valid: readable, made from this very
update (its sha256 pointer), by the planned method with the planned options, from inputs
that did not change in this run. A task is therefore safe to run twice, or again after
its worker died: that is what makes the audit resumable and the cluster's retries free.

Every failure stays inside the record of its attack ("refused", "failed", "error"), so one
bad update never stops an audit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gitool.audit.layout import AuditInput, client_and_round
from gitool.audit.planner import Attack, Selection, plan
from gitool.errors import GitoolError, UsageError, attack_errors

# Result diagnostics kept in a record as the attack's own evidence (numbers, flags, short texts).
EVIDENCE_KEYS = {
    "labels": ("family", "target", "confidence", "label_smoothing", "mixup_coef", "mixup_classes", "residual",
               "loss", "converged", "ambiguous", "refinement_rounds", "aux_size", "num_samples"),
    "features": ("residual", "norm", "tolerance"),
    "reconstruction": ("classifier_residual", "flagged_layers", "loss", "chosen_restart", "labels"),
}
# Options that change where a result is computed, not what it is: a result made with
# another value is still valid.
NOT_RESULT_OPTIONS = frozenset({"device", "labels", "save_dir", "save_every", "report_every"})


@dataclass(frozen=True)
class AuditSettings:
    """What every task of one audit shares (plain data: it travels to worker processes
    and cluster nodes)."""

    out_dir: str
    selection: Selection = field(default_factory=Selection)
    options: dict[str, Any] = field(default_factory=dict)  # method options: aux, seed, device, ...
    lpips_weights: str | None = None
    trusted: tuple[str, ...] = ()  # user model factories named on the command line
    resume: bool = True
    threads: int = 1


@dataclass(frozen=True)
class AuditTask:
    item: AuditInput
    settings: AuditSettings


def run_task(task: AuditTask) -> dict[str, Any]:
    """Audit one update; never raises for a problem of the update or an attack."""
    from gitool.atomic import deferred_sync

    _prepare_process(task.settings)
    started = time.perf_counter()
    try:
        with deferred_sync(sync_at_end=False):  # the audit syncs once at its end
            record = _audit(task.item, task.settings)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # a bug outside any one attack: this update's record says so
        from gitool.atomic import Terminated
        from gitool.audit.layout import client_and_round

        if isinstance(exc, Terminated):
            raise
        client, round_ = client_and_round(task.item.name, None)
        record = {"update": str(task.item.path), "name": task.item.name, "status": "error", "client": client,
                  "round": round_, "error": f"{type(exc).__name__}: {exc}"[:500], "attacks": []}
    record["seconds"] = time.perf_counter() - started
    return record


_PREPARED: dict[str, Any] = {}


def _prepare_process(settings: AuditSettings) -> None:
    """Once per process: thread count and the user factories the user trusted."""
    key = (settings.threads, settings.trusted)
    if _PREPARED.get("key") == key:
        return
    import torch

    from gitool.models import trust_factory

    torch.set_num_threads(max(1, settings.threads))
    for name in settings.trusted:
        trust_factory(name)
    _PREPARED["key"] = key


def _audit(item: AuditInput, settings: AuditSettings) -> dict[str, Any]:
    from gitool.files import load_update

    record: dict[str, Any] = {"update": str(item.path), "name": item.name, "status": "ok", "attacks": []}
    try:
        update = load_update(item.path, tensors="classifier")
    except GitoolError as exc:  # unreadable, hostile or from a model not trusted: audited as such
        client, round_ = client_and_round(item.name, None)
        record.update(status="unreadable", error=str(exc), client=client, round=round_)
        return record
    record.update(_facts(item, update))
    out_dir = Path(settings.out_dir)
    try:
        attacks = plan(update, settings.selection, settings.options)
    except GitoolError as exc:
        record.update(status="unplannable", error=str(exc))
        return record
    main: dict[str, Any] = {}  # step -> the result later steps read: the main one, or per-sample labels
    fresh: set[str] = set()  # steps whose read result was computed in this run
    results = []
    for attack in attacks:
        output = item.output(out_dir, attack.step, None if attack.main else attack.method)
        entry, result = _run_attack(attack, update, output, main, fresh, settings)
        record["attacks"].append(entry)
        results.append((entry, result))
        if result is not None and (attack.main or _one_label_per_sample(result, update)
                                   and not _one_label_per_sample(main.get(attack.step), update)):
            main[attack.step] = result
            if entry["status"] == "done":
                fresh.add(attack.step)
    _score(item, update, results, record, settings)
    return record


def _facts(item: AuditInput, update) -> dict[str, Any]:
    """What the update says about itself: model, shape, label family, defence."""
    from gitool.facts import unknown_facts
    from gitool.methods import shape_of

    unknown = set(unknown_facts(update))
    client, round_ = client_and_round(item.name, update.provenance)
    defence = None if "defence" in unknown else {
        "dp_clip": update.defence.dp_clip, "dp_noise": update.defence.dp_noise, "prune": update.defence.prune}
    return {
        "client": client, "round": round_, "sha256": update.sha256, "model": update.model.name,
        "kind": update.kind, "shape": shape_of(update), "num_samples": update.num_samples,
        "batch_size": update.training.batch_size, "steps": update.training.steps,
        "num_classes": update.model.num_classes, "dtype": update.training.dtype,
        "family": None if "loss_family" in unknown else update.loss.family,
        "defence": defence, "unknown_facts": sorted(unknown),
    }


# --------------------------------------------------------------------------- one attack


def _run_attack(attack: Attack, update, output: Path, main: dict, fresh: set, settings: AuditSettings):
    entry: dict[str, Any] = {"step": attack.step, "method": attack.method, "main": attack.main,
                             "output": None, "status": None, "reason": None, "seconds": 0.0}
    if attack.skip is not None:
        entry.update(status="n/a", reason=attack.skip)
        return entry, None
    inputs, missing = _inputs_of(attack, update, main)
    if missing:
        entry.update(status="n/a", reason=missing)
        return entry, None
    depends_fresh = any(step in fresh for step in ("labels", "features") if step in inputs)
    if settings.resume and not depends_fresh:
        result = _reusable(output, attack, update)
        if result is not None:
            entry.update(status="reused", output=str(output), evidence=_evidence(result))
            return entry, result
    started = time.perf_counter()
    try:
        with attack_errors():  # the math's own errors as gitool's: refused (input) or failed
            result = _compute(attack, update, inputs)
        output.parent.mkdir(parents=True, exist_ok=True)
        from gitool.files import save_result

        save_result(result, output)
    except UsageError as exc:  # the method refuses this update (a fact it needs, a shape it cannot read)
        entry.update(status="refused", reason=str(exc), seconds=time.perf_counter() - started)
        return entry, None
    except GitoolError as exc:  # the attack ran and could not solve
        entry.update(status="failed", reason=str(exc), seconds=time.perf_counter() - started)
        return entry, None
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # a bug: kept in the record, the audit goes on
        from gitool.atomic import Terminated

        if isinstance(exc, Terminated):
            raise
        entry.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500],
                     seconds=time.perf_counter() - started)
        return entry, None
    entry.update(status="done", output=str(output), seconds=time.perf_counter() - started,
                 evidence=_evidence(result))
    return entry, result


def _one_label_per_sample(result, update) -> bool:
    """A labels result with one row per sample (not class counts)."""
    return result is not None and result.kind == "labels" and result.get("labels") is not None \
        and result.get("labels").shape[0] == update.num_samples


def _inputs_of(attack: Attack, update, main: dict) -> tuple[dict[str, Any], str | None]:
    """The earlier results this attack reads, or why it cannot run."""
    labels = main.get("labels")
    if attack.step == "labels":
        return {}, None
    per_sample = _one_label_per_sample(labels, update)
    if attack.step == "features":
        if labels is None:
            return {}, "needs the labels, which were not recovered"
        if not per_sample:
            return {}, "needs one label per sample; the labels hold class counts"
        return {"labels": labels}, None
    inputs = {name: main[name] for name in ("labels", "features") if name in main}
    if attack.method in ("fc", "conv") and not per_sample:
        return {}, ("needs one label per sample; " + ("the labels hold class counts" if labels is not None
                                                      else "the labels were not recovered"))
    return inputs, None


def _compute(attack: Attack, update, inputs: dict[str, Any]):
    from gitool import steps

    if attack.step == "labels":
        result, _ = steps.label_step(update, attack.method, attack.options)
        return result
    if attack.step == "features":
        return steps.feature_step(update, inputs["labels"], attack.options)
    result, _ = steps.reconstruct_step(update, inputs.get("labels"), inputs.get("features"), attack.method,
                                       attack.options)
    return result


def _reusable(output: Path, attack: Attack, update):
    """The result at ``output`` if a rerun may keep it, else None."""
    from gitool.audit.layout import RESULT_OF_STEP
    from gitool.files import load_result

    if not output.is_file():
        return None
    try:
        result = load_result(output, (RESULT_OF_STEP[attack.step],))
    except GitoolError:
        return None  # corrupt, half-synced after a power cut, or another kind: recompute
    if result.source.get("sha256") != update.sha256:
        return None
    if attack.step != "features" and result.method != attack.method:
        return None
    for key, value in attack.options.items():
        if key in NOT_RESULT_OPTIONS or value is None or key not in result.options:
            continue
        if result.options[key] != value:
            return None
    return result


def _evidence(result) -> dict[str, Any]:
    """The attack's own evidence from its diagnostics, and its verdict on itself
    (``consistent``: True when its checks pass, False when they fail, None when it has none)."""
    diagnostics = result.diagnostics or {}
    evidence = {key: _plain(diagnostics[key]) for key in EVIDENCE_KEYS[result.kind] if key in diagnostics}
    warnings = diagnostics.get("warnings") or ([diagnostics["warning"]] if diagnostics.get("warning") else [])
    if warnings:
        evidence["warnings"] = [str(w)[:300] for w in warnings[:3]]
    consistent = None
    if result.kind == "labels":
        labels, counts = result.get("labels"), result.get("counts")
        if labels is not None and labels.shape[0] <= 16:
            evidence["classes"] = [int(c) for c in labels.argmax(dim=1)]
        if counts is not None and int(counts.sum()) > 1:
            evidence["counts"] = [int(c) for c in counts]
        if "converged" in diagnostics:
            consistent = bool(diagnostics.get("converged")) and not diagnostics.get("ambiguous")
    elif result.kind == "features":
        consistent = "warning" not in diagnostics
    elif result.kind == "reconstruction":
        layers = diagnostics.get("layers") or []
        residuals = [layer.get("gradient_residual") for layer in layers
                     if isinstance(layer.get("gradient_residual"), (int, float))]
        if residuals:
            evidence["max_layer_residual"] = max(residuals)
        if layers:
            consistent = not diagnostics.get("flagged_layers")
    evidence["consistent"] = consistent
    return evidence


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value][:32]
    if isinstance(value, str):
        return value[:200]
    return value


# --------------------------------------------------------------------------- scoring, after every attack


def _score(item: AuditInput, update, results: list, record: dict[str, Any], settings: AuditSettings) -> None:
    """Read the truth beside the update (if any) and score every result against it."""
    from gitool.files import load_truth
    from gitool.metrics import HEADLINE
    from gitool.steps import check_truth_fits_update, score_step

    truth_path = item.truth()
    record["truth"] = None
    if not truth_path.is_file():
        return
    try:
        truth = load_truth(truth_path)
        pointer = (truth.meta.get("update") or {}).get("sha256")
        if pointer and pointer != update.sha256:
            record["truth_note"] = f"{truth_path} is the truth of another update; nothing was scored"
            return
        check_truth_fits_update(truth, update)
    except GitoolError as exc:
        record["truth_note"] = f"truth not used: {exc}"
        return
    record["truth"] = str(truth_path)
    record["true_classes"] = [int(c) for c in truth.targets[:16, 0]]
    if truth.counts.sum() > 1:
        record["true_counts"] = [int(c) for c in truth.counts]
    lpips_net = _lpips(settings.lpips_weights)
    if lpips_net is not None and min(truth.images.shape[-2:]) < LPIPS_MIN_SIZE:
        record["truth_note"] = f"LPIPS skipped: AlexNet needs images of at least {LPIPS_MIN_SIZE} x {LPIPS_MIN_SIZE} pixels"
        lpips_net = None
    for entry, result in results:
        if result is None:
            continue
        try:
            row = score_step(result, truth, lpips_net)
        except GitoolError as exc:
            entry["score_note"] = str(exc)
            continue
        scores = {key: _plain(row[key]) for key in HEADLINE[result.kind] if key in row}
        if result.kind == "reconstruction":
            scores["matching"] = row["matching"][:16]
            scores["psnr_per_image"] = [_plain(v) for v in row["psnr_per_image"][:16]]
        entry["scores"] = scores


_LPIPS: dict[str, Any] = {}
LPIPS_MIN_SIZE = 31  # AlexNet's receptive field (gitool.lpips refuses smaller images)


def _lpips(path: str | None):
    """The LPIPS network of ``path``, loaded once per process."""
    if path is None:
        return None
    if path not in _LPIPS:
        from gitool.lpips import load_lpips

        _LPIPS.clear()
        _LPIPS[path] = load_lpips(path)
    return _LPIPS[path]
