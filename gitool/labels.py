"""Label recovery methods by name: ``gitool labels --method NAME``.

Each entry of :data:`LABEL_METHODS` is a :class:`gitool.methods.Method`: what it accepts,
the facts it needs, its options (a dataclass with defaults and constraints) and the
adapter that runs it. The math lives in pure tensor functions under ``gitool.attacks``;
the adapters (``gitool.labels_single``, ``gitool.labels_batch``) only turn an update
into their inputs. This module imports nothing heavy, so ``--help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gitool.methods import Method, method_help, resolve

SINGLE = "gitool.labels_single"
PER_SAMPLE = "gitool.labels_per_sample"
BATCH = "gitool.labels_batch"
ANY = ("single", "batch", "multistep")
N = ("batch_size", "steps")  # N = B x m fixes every count's total


@dataclass
class LabelOutcome:
    """What a label method recovered.

    ``labels`` is B x K (soft labels, one row per sample of a single-step gradient) and
    ``counts`` is K (integers summing to N = B x m); a method fills what it can.
    ``options`` records the options as used (recorded facts resolved), ``seconds`` the
    wall time; ``summary`` holds a few human lines for the terminal; ``curve`` optional
    data for ``--plot`` (keys: x, y, chosen_x, xlabel, ylabel, title, logx)."""

    method: str
    labels: Any = None
    counts: Any = None
    softmax: Any = None  # B x K softmax outputs p_n (per-sample method: fixes Delta for `features`)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)
    curve: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


LABEL_METHODS: dict[str, Method] = {m.name: m for m in (
    Method("bias", "labels", "exact soft label through the last-layer bias (Wang et al. 2024)", ("single",), N,
           f"{SINGLE}:SingleLabelOptions", f"{SINGLE}:recover_with_bias", reads="classifier"),
    Method("lambda", "labels", "soft label by the lambda search with a label-structure prior, no bias needed "
           "(Wang et al. 2024)", ("single",), N, f"{SINGLE}:SingleLabelOptions", f"{SINGLE}:recover_with_lambda",
           reads="classifier"),
    Method("idlg", "labels", "the one class whose weight-gradient row sum is negative (iDLG)", ANY, N,
           f"{BATCH}:CountOptions", f"{BATCH}:idlg", delta_facts=True, reads="classifier"),
    Method("yin", "labels", "the N classes with the most negative weight-gradient entry (GradInversion)", ANY, N,
           f"{BATCH}:CountOptions", f"{BATCH}:yin", delta_facts=True, reads="classifier"),
    Method("llg", "labels", "impact from the gradient itself (LLG)", ANY, N, f"{BATCH}:CountOptions",
           f"{BATCH}:llg", delta_facts=True, reads="classifier"),
    Method("llg+", "labels", "impact and offsets from auxiliary data (LLG+)", ANY, N, f"{BATCH}:AuxCountOptions",
           f"{BATCH}:llg_plus", delta_facts=True, needs_aux=True),
    Method("zlg", "labels", "expected softmax and feature sum from auxiliary data (ZLG)", ANY, N,
           f"{BATCH}:AuxCountOptions", f"{BATCH}:zlg", delta_facts=True, needs_aux=True),
    Method("ilrg", "labels", "class-average embeddings and a pseudo-inverse, needs the bias (iLRG)", ANY, N,
           f"{BATCH}:CountOptions", f"{BATCH}:ilrg", delta_facts=True, reads="classifier"),
    Method("rlu", "labels", "counts from the local update, multi-step drift simulated (RLU, Chen & Vikalo 2024)",
           ANY, N, f"{BATCH}:RLUOptions", f"{BATCH}:rlu", delta_facts=True, needs_aux=True),
    Method("rlu-published", "labels", "the published RLU code's estimator: off-class softmax of the mean auxiliary "
           "logits, bias update, rescaled to N (a baseline for rlu)", ANY, N, f"{BATCH}:AuxCountOptions",
           f"{BATCH}:rlu_published", delta_facts=True, needs_aux=True),
    Method("per-sample", "labels", "each sample's label, softmax output and feature of a one-step gradient "
           "(B <= K - 1, rank B; joint solve over the row space of dL/dW, docs/analytic.md)", ("single", "batch"),
           N, f"{PER_SAMPLE}:PerSampleOptions", f"{PER_SAMPLE}:recover", delta_facts=True, reads="classifier"),
)}

METHOD_HELP = method_help(LABEL_METHODS, "auto (bias for a single-sample gradient with a last-layer bias, lambda "
                          "without one, rlu for batches and multi-step updates) or one of: ")


def auto_method(update) -> str:
    """The method `--method auto` picks: the exact bias path for a single-sample gradient
    with a last-layer bias, the lambda search without one, RLU for batches and
    multi-step updates."""
    from gitool.facts import require_facts

    require_facts(update, list(N), for_method="--method auto")  # B = 1 must be a fact, not a default
    if update.is_single_gradient:
        return "bias" if update.last_layer().bias is not None else "lambda"
    return "rlu"


def label_method(update, method: str = "auto") -> Method:
    """The registry entry for ``method`` ("auto" picks from the update)."""
    return resolve(LABEL_METHODS, auto_method(update) if method == "auto" else method, "label method")


def recover_labels(update, method: str = "auto", options: dict[str, Any] | None = None) -> LabelOutcome:
    return label_method(update, method)(update, options, LABEL_METHODS)
