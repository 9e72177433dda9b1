"""Per-sample labels of a one-step batch gradient: ``gitool labels --per-sample``
(``--method per-sample``), and the features that go with them (``gitool features``).

Adapter from an update to `gitool.attacks.per_sample`: the classifier's weights and its
mean gradient of the one step (a one-step delta is turned back into it), the batch size B
and the data's precision in, labels (B x K), softmax outputs (B x K) and a diagnostics
dict out. The label family prior follows the facts: ``hard`` or ``smoothing`` as the update
records it, ``smoothing`` (eps fitted, 0 for hard labels) when the family is unknown or
mixup (which the method cannot separate: it then refuses, naming the condition).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gitool.attacks import per_sample, soft_label
from gitool.errors import GitoolError
from gitool.labels import LabelOutcome
from gitool.specs import OneOf, Optional_, check_fields, fact

FEATURE_TOLERANCE = 1e-4  # relative gradient residual above which `features` warns


@dataclass(frozen=True)
class PerSampleOptions:
    """``family`` None: the family the update records (smoothing when unknown or mixup)."""

    family: str | None = fact(None, Optional_(OneOf(soft_label.FAMILIES)))
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_fields(self, "options")


def family_prior(update, options: PerSampleOptions) -> str:
    from gitool.facts import unknown_facts

    if options.family is not None:  # the single-sample families: auto and mixup fit eps (mixup is then refused)
        return options.family if options.family in per_sample.FAMILIES else "smoothing"
    if "loss_family" in unknown_facts(update) or update.loss.family not in per_sample.FAMILIES:
        return "smoothing"
    return update.loss.family


def _precision(update) -> float:
    from gitool.reconstruct_analytic import update_precision

    return update_precision(update)


def recover(update, options: PerSampleOptions) -> LabelOutcome:
    """B per-sample labels with their softmax outputs; rows in the order features will use."""
    from gitool.labels_batch import output_layer

    family = family_prior(update, options)
    layer = output_layer(update, options.device)
    batch = update.training.batch_size
    found = per_sample.recover_per_sample(layer.weight, layer.bias, layer.weight_grad, layer.bias_grad, batch,
                                          family=family, precision=_precision(update))
    counts = torch.bincount(torch.tensor(found.classes), minlength=layer.weight.shape[0]).to(torch.int64)
    diagnostics: dict[str, Any] = {
        "method": "per-sample", "family": family, "batch_size": batch, "classes": found.classes,
        "label_smoothing": found.label_smoothing, "repeated_classes": found.repeated, "rank": found.rank,
        "singular_values": found.singular_values, "residual": found.residual,
        "residual_limit": found.residual_limit, "iterations": found.iterations,
        "candidates_tried": found.candidates_tried, "refused_candidates": found.tried[:-1][:16],
    }
    eps = f", eps = {found.label_smoothing:.4g}" if family == "smoothing" else ""
    summary = [f"per-sample: {batch} {family} labels, classes {' '.join(map(str, found.classes))}{eps}",
               f"rank {found.rank}, joint residual {found.residual:.1e} (limit {found.residual_limit:.0e}), "
               f"{found.candidates_tried} label set(s) tried"
               + (f"; repeated classes {found.repeated}" if found.repeated else "")]
    return LabelOutcome(method="per-sample", labels=found.labels.cpu(), counts=counts, softmax=found.softmax.cpu(),
                        diagnostics=diagnostics, summary=summary,
                        options={"family": family, "device": options.device})


def recover_features(update, labels_result, options: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict]:
    """The B features X (B x d) from per-sample labels and softmax outputs: X = (Delta^T)^+ dL/dW."""
    from gitool.labels_batch import output_layer

    options = dict(options or {})
    device = str(options.get("device") or "cpu")
    if update.kind == "delta" and update.training.steps > 1:
        raise GitoolError(f"per-sample features need one local step; {update.path or 'this update'} has "
                          f"{update.training.steps}")
    labels = labels_result.require("labels").to(torch.float64)
    softmax = labels_result.require("softmax").to(torch.float64)
    layer = output_layer(update, device)
    batch, k = update.training.batch_size, layer.weight.shape[0]
    if labels.shape != (batch, k):
        raise GitoolError(f"{labels_result.path}: labels of shape {tuple(labels.shape)} do not fit this update "
                          f"(B = {batch}, K = {k})")
    features, residual = per_sample.features_from_labels(layer.weight_grad, labels.to(device), softmax.to(device))
    recomputed = torch.softmax(features @ layer.weight.T + (layer.bias if layer.bias is not None else 0), 1)
    softmax_residual = float((recomputed - softmax.to(device)).abs().max())
    diagnostics: dict[str, Any] = {"method": "per-sample", "residual": residual, "softmax_residual": softmax_residual,
                                   "tolerance": FEATURE_TOLERANCE, "norm": float(features.norm())}
    if max(residual, softmax_residual) > FEATURE_TOLERANCE:
        diagnostics["warning"] = (f"the features reproduce the gradient to {residual:.2e} and the softmax outputs to "
                                  f"{softmax_residual:.2e} (> {FEATURE_TOLERANCE:.0e}): the labels file does not fit "
                                  "this update")
    return features.detach().cpu(), diagnostics
