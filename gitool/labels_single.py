"""Single-sample label and feature recovery: adapters from an update to `gitool.attacks.soft_label`.

``bias``: the exact path through the last-layer bias; ``lambda``: the structure-prior
search of Wang et al. (2024) for a classifier without one (or ignoring it). Options:
:class:`SingleLabelOptions`. The label family prior follows the facts: the family the
update records is the default, ``--family`` overrides it, and the result records the
family used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gitool.attacks import soft_label
from gitool.errors import GitoolError, UsageError
from gitool.labels import LABEL_METHODS, LabelOutcome
from gitool.specs import MAX_SEED, Interval, OneOf, Optional_, check_fields, fact

SINGLE_METHODS = tuple(name for name, m in LABEL_METHODS.items() if m.accepts == ("single",))
BATCH_METHODS = tuple(name for name, m in LABEL_METHODS.items() if "batch" in m.accepts)


@dataclass(frozen=True)
class SingleLabelOptions:
    """Options of the single-sample methods. ``family`` None: the family the update
    records (``auto``, fit smoothing and mixup, when it is an unknown fact)."""

    family: str | None = fact(None, Optional_(OneOf(soft_label.FAMILIES)))
    search: str = fact("scan", OneOf(soft_label.SEARCHES))
    seed: int = fact(0, Interval(int, 0, MAX_SEED))
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_fields(self, "options")


def family_prior(update, options: SingleLabelOptions) -> str:
    """The prior used: the option, else the recorded family, else auto."""
    from gitool.facts import unknown_facts

    if options.family is not None:
        return options.family
    if "loss_family" in unknown_facts(update):
        return "auto"
    return update.loss.family


FEATURE_TOLERANCE = 1e-4  # relative gradient residual above which `features` warns
BIAS_TOLERANCE = 1e-6  # bias path: label structure spread up to this counts as a family fit


def require_single_gradient(update, who: str) -> None:
    if update.is_single_gradient:
        return
    what = (f"a {update.kind} of {update.training.steps} local steps" if update.kind == "delta"
            else f"a gradient of a batch of {update.training.batch_size}")
    raise UsageError(f"{who} needs a single-sample gradient (B = 1, one step); {update.path or 'this update'}"
                     f" is {what}, from which no single feature can be read (its labels: gitool labels --method "
                     f"{', '.join(BATCH_METHODS)}; the B features of a one-step batch: features --labels from "
                     "gitool labels --per-sample)")


def _layer_on(update, device: str):
    layer = update.last_layer()
    move = (lambda t: None if t is None else t.to(device))
    return move(layer.weight), move(layer.bias), move(layer.weight_grad), move(layer.bias_grad)


def _counts(label: torch.Tensor) -> torch.Tensor:
    return torch.bincount(label.argmax().view(1).cpu(), minlength=label.numel())


def _describe_bias_label(label: np.ndarray, family: str) -> tuple[dict[str, Any], str, list[str]]:
    """The bias path needs no prior: name the structure the recovered label has."""
    spread_smooth = soft_label.structure_spread(label, 1)
    spread_mix = soft_label.structure_spread(label, 2)
    warnings: list[str] = []
    if family == "auto":
        if spread_smooth <= BIAS_TOLERANCE:
            return soft_label.describe_label(label, "smoothing"), "the label's off-target entries are equal", warnings
        if spread_mix <= BIAS_TOLERANCE:
            return soft_label.describe_label(label, "mixup"), "all but two entries are equal", warnings
        description = soft_label.describe_label(label, "smoothing")
        description["family"] = "other"
        return description, (f"neither structure holds (spreads {spread_smooth:.2e} / {spread_mix:.2e}): "
                             "a soft label of another kind"), warnings
    prior = "mixup" if family == "mixup" else "smoothing"
    spread = spread_mix if prior == "mixup" else spread_smooth
    if spread > BIAS_TOLERANCE:
        warnings.append(f"--family {family}, but the recovered label does not have that structure "
                        f"(spread {spread:.2e})")
    description = soft_label.describe_label(label, prior)
    if family == "hard" and description["family"] != "hard":
        warnings.append(f"--family hard, but the label is smoothed (eps = {description['label_smoothing']:.4g})")
    return description, f"--family {family}", warnings


def _summary(description: dict[str, Any], extra: str) -> list[str]:
    family = description["family"]
    if family == "mixup":
        a, b = description["mixup_classes"]
        wa, wb = description["mixup_weights"]
        head = f"mixup of class {a} ({wa:.4f}) and class {b} ({wb:.4f}): coefficient {description['mixup_coef']:.4f}"
    elif family == "other":
        head = f"soft label, top class {description['target']} ({description['confidence']:.4f})"
    else:
        head = (f"{family} label, target class {description['target']} ({description['confidence']:.4f}), "
                f"eps = {description['label_smoothing']:.4g}")
    return [head, extra]


def _check_label(label: np.ndarray) -> list[str]:
    low, high, total = float(label.min()), float(label.max()), float(label.sum())
    if low < -soft_label.LABEL_TOLERANCE or high > 1 + soft_label.LABEL_TOLERANCE or abs(total - 1) > 1e-6:
        return [f"the recovered label is not a probability vector (entries in [{low:.3g}, {high:.3g}], sum "
                f"{total:.6g}): a noisy or multi-sample gradient?"]
    return []


def recover_with_bias(update, options: SingleLabelOptions) -> LabelOutcome:
    """Exact label from a single-sample gradient through the last-layer bias (no search)."""
    family, device = family_prior(update, options), options.device
    started = time.perf_counter()
    weight, bias, weight_grad, bias_grad = _layer_on(update, device)
    if bias is None:
        raise UsageError("--method bias needs a classifier with a bias; this model has none (use --method lambda)")
    label, _, residual = soft_label.recover_with_bias(weight, bias, weight_grad, bias_grad)
    label_np = label.detach().cpu().numpy()
    description, reason, warnings = _describe_bias_label(label_np, family)
    warnings += _check_label(label_np)
    seconds = time.perf_counter() - started
    diagnostics = {
        **description, "method": "bias", "lambda": None, "loss": None, "residual": residual,
        "converged": residual <= FEATURE_TOLERANCE and not _check_label(label_np),
        "reason": reason, "warnings": warnings,
    }
    summary = _summary(description, f"exact bias path: gradient residual {residual:.2e}, {1e3 * seconds:.1f} ms")
    return LabelOutcome(method="bias", labels=label.cpu().view(1, -1), counts=_counts(label), diagnostics=diagnostics,
                        summary=summary + [f"warning: {w}" for w in warnings],
                        options={"family": family, "search": options.search, "seed": options.seed, "device": device})


def recover_with_lambda(update, options: SingleLabelOptions) -> LabelOutcome:
    """Label and lambda by the structure-prior search (Wang et al. 2024; methods.md section 1)."""
    family, search, seed, device = family_prior(update, options), options.search, options.seed, options.device
    started = time.perf_counter()
    weight, bias, weight_grad, _ = _layer_on(update, device)
    recovery = soft_label.recover_soft_label(weight, weight_grad, bias, family=family, search=search, seed=seed,
                                             keep_grid=True)
    seconds = time.perf_counter() - started
    diagnostics = {
        **recovery.description, "method": "lambda", "search": search, "prior": recovery.prior,
        "lambda": recovery.lam, "row": recovery.row, "loss": recovery.loss, "residual": recovery.residual,
        "converged": recovery.converged, "ambiguous": recovery.ambiguous,
        "reason": recovery.reason, "warnings": recovery.warnings, "fits": recovery.fits,
    }
    summary = _summary(recovery.description,
                       f"lambda = {recovery.lam:.10g} ({search}, loss {recovery.loss:.2e}, gradient residual "
                       f"{recovery.residual:.2e}, {1e3 * seconds:.1f} ms); {recovery.reason}")
    curve = None
    if recovery.grid is not None:
        lambdas, loss = recovery.grid
        curve = {"x": lambdas, "y": loss, "chosen_x": recovery.lam, "chosen_y": recovery.loss, "xlabel": "lambda",
                 "ylabel": f"{recovery.prior} structure loss (scale-free)", "logx": True, "logy": True,
                 "title": f"lambda search: {recovery.prior} prior, lambda* = {recovery.lam:.6g}"}
    label = recovery.label.cpu()
    return LabelOutcome(method="lambda", labels=label.view(1, -1), counts=_counts(label), diagnostics=diagnostics,
                        summary=summary + [f"warning: {w}" for w in recovery.warnings], curve=curve,
                        options={"family": family, "search": search, "seed": seed, "device": device})


def recover_features(update, labels_result, options: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict]:
    """The last-layer input x (1 x d) of a single-sample gradient, given its recovered label,
    and the check that (x, y) reproduces the gradient."""
    options = dict(options or {})
    require_single_gradient(update, "feature recovery")
    device = str(options.get("device") or "cpu")
    started = time.perf_counter()
    labels = labels_result.require("labels").to(torch.float64)
    weight, bias, weight_grad, bias_grad = _layer_on(update, device)
    if labels.dim() != 2 or labels.shape[0] != 1 or labels.shape[1] != weight.shape[0]:
        raise GitoolError(f"{labels_result.path}: labels of shape {tuple(labels.shape)} do not fit one sample of "
                          f"K = {weight.shape[0]} classes")
    label = labels[0].to(device)
    lam = None
    if bias is not None and bias_grad is not None and float(bias_grad.abs().max()) > 0:
        method = "bias"
        feature = soft_label.bias_feature(weight_grad, bias_grad)
    else:
        method = "lambda"
        hint = labels_result.diagnostics.get("lambda") if isinstance(labels_result.diagnostics, dict) else None
        feature, lam = soft_label.feature_for_label(weight, weight_grad, label, bias,
                                                    float(hint) if isinstance(hint, (int, float)) else None)
    residual = soft_label.gradient_residual(weight, bias, weight_grad, feature, label)
    diagnostics: dict[str, Any] = {"method": method, "lambda": lam, "residual": residual,
                                   "tolerance": FEATURE_TOLERANCE, "seconds": time.perf_counter() - started,
                                   "norm": float(feature.norm())}
    if residual > FEATURE_TOLERANCE:
        diagnostics["warning"] = (f"(feature, label) reproduce the gradient only to a relative residual of "
                                  f"{residual:.2e} > {FEATURE_TOLERANCE:.0e}: the labels may be wrong or the gradient "
                                  "noisy")
    return feature.detach().cpu().view(1, -1), diagnostics
