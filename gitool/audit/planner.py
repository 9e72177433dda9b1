"""Which attacks an audit runs on an update, decided from the update's facts alone.

``--methods`` is a comma list of steps and method names:

- ``auto`` (the default): ``labels,features,analytic``;
- ``all``: ``labels,features,analytic,optimize``;
- ``labels``: the label method the registry picks for the update (``gitool labels
  --method auto``: the bias path or the lambda search for a single-sample gradient, RLU
  for batches and multi-step updates). RLU needs auxiliary data; without ``--aux`` an
  audit counts labels with a method that needs none (:data:`COUNTS_WITHOUT_AUX`) and says so.
  On a one-step batch gradient of at most K - 1 samples, when features or a
  reconstruction follow, ``per-sample`` runs too (under ``OUT/per-sample/``): its one
  label per sample is what those steps read;
- any name of ``LABEL_METHODS`` (``bias``, ``lambda``, ``rlu``, ...): that method, on the
  updates it accepts;
- ``features``: the last-layer input, wherever the labels hold one label per sample of
  a gradient;
- ``analytic``: ``fc`` for a fully-connected model, ``conv`` for a convolutional one, when
  the model is a plain stack of layers and the update is one local step;
- any name of ``RECON_METHODS`` (``fc``, ``conv``, ``optimize``): that method.

The first method of a step is the step's main result (``STEM.labels.safetensors``, which
later steps read); further methods of the same step write under ``OUT/METHOD/``. A
method that does not accept an update is recorded as not applicable, with the reason.
Nothing here reads a truth: the plan and every attack are fixed before scoring.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from gitool.errors import GitoolError, UsageError

STEPS = ("labels", "features", "reconstruct")
GROUPS = {"auto": ("labels", "features", "analytic"), "all": ("labels", "features", "analytic", "optimize")}
# Label counts without auxiliary data, by preference: iLRG reads a one-step batch exactly
# through the classifier bias; LLG needs nothing but the gradient.
COUNTS_WITHOUT_AUX = ("ilrg", "llg")


@dataclass(frozen=True)
class Selection:
    """The parsed ``--methods``: per step, the methods in order ("auto" and "analytic"
    are resolved per update)."""

    labels: tuple[str, ...] = ()
    features: bool = False
    reconstruct: tuple[str, ...] = ()

    @property
    def methods(self) -> tuple[str, ...]:
        return self.labels + (("features",) if self.features else ()) + self.reconstruct


def parse_methods(text: str) -> Selection:
    """``--methods`` as a Selection; unknown names are a usage error naming the choices."""
    from gitool.labels import LABEL_METHODS
    from gitool.reconstruct import RECON_METHODS

    labels: list[str] = []
    reconstruct: list[str] = []
    features = False
    tokens = [token.strip() for token in text.split(",") if token.strip()]
    if not tokens:
        raise UsageError("--methods is empty; give steps or methods, e.g. auto or labels,features")
    expanded: list[str] = []
    for token in tokens:
        expanded.extend(GROUPS.get(token, (token,)))
    for token in expanded:
        if token == "labels":
            token = "auto"
        if token == "auto" or token in LABEL_METHODS:
            if token not in labels:
                labels.append(token)
        elif token == "features":
            features = True
        elif token == "reconstruct" or token == "analytic":
            if "analytic" not in reconstruct:
                reconstruct.append("analytic")
        elif token in RECON_METHODS:
            if token not in reconstruct:
                reconstruct.append(token)
        else:
            choices = ["auto", "all", "labels", "features", "analytic", *LABEL_METHODS, *RECON_METHODS]
            raise UsageError(f"--methods: unknown step or method {token!r}; choose from {', '.join(choices)}")
    if (features or reconstruct) and not labels:
        # features and the analytic methods read the labels: attack them too
        labels.append("auto")
    return Selection(tuple(labels), features, tuple(reconstruct))


@dataclass
class Attack:
    """One attack planned for one update: the step, the registry method, the options it
    gets, and whether it is the step's main result (read by later steps)."""

    step: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    main: bool = True
    skip: str | None = None  # why it does not apply (recorded, not run)


def plan(update, selection: Selection, options: dict[str, Any]) -> list[Attack]:
    """The attacks for ``update``, in order. ``options`` holds the audit's method options
    (aux, seed, device, time budget, ...); each method takes the ones it declares."""
    attacks: list[Attack] = []
    for method in selection.labels:
        attacks.append(_label_attack(update, method, options))
    if _wants_per_sample(update, selection):
        # A one-step batch: its counts stay the main labels; each sample's label and
        # feature (per-sample) is what features and the analytic methods read.
        attacks.append(Attack("labels", "per-sample", dict(options)))
    _mark_main(attacks)
    if selection.features:
        attacks.append(Attack("features", "features", dict(options), skip=_features_skip(update)))
    recon = [_recon_attack(update, method, options) for method in selection.reconstruct]
    _mark_main(recon)
    return attacks + recon


def _mark_main(attacks: list[Attack]) -> None:
    """The first attack of a step that applies is its main result; the rest go under OUT/METHOD/."""
    seen = False
    for attack in attacks:
        attack.main = not seen and attack.skip is None
        seen = seen or attack.main


def _label_attack(update, method: str, options: dict[str, Any]) -> Attack:
    from gitool.labels import LABEL_METHODS, label_method
    from gitool.methods import describe_shape, shape_of

    if method == "auto":
        try:
            entry = label_method(update, "auto")
        except UsageError as exc:  # a fact auto needs (batch size, steps) is unknown
            return Attack("labels", "auto", dict(options), skip=str(exc))
        if entry.needs_aux and not options.get("aux"):
            name = _counts_without_aux(update)
            return Attack("labels", name, dict(options),
                          skip=None if name else "label counts need --aux SOURCE for this update")
        return Attack("labels", entry.name, dict(options))
    entry = LABEL_METHODS[method]
    if shape_of(update) not in entry.accepts:
        return Attack("labels", method, dict(options),
                      skip=f"{method} attacks {' or '.join(entry.accepts_words())}; this is {describe_shape(update)}")
    return Attack("labels", method, dict(options))


def _wants_per_sample(update, selection: Selection) -> bool:
    """``auto`` labels on a one-step batch gradient of at most K - 1 samples (the most the
    per-sample solve can separate), when features or a reconstruction will read them."""
    from gitool.methods import shape_of

    return ("auto" in selection.labels and "per-sample" not in selection.labels
            and (selection.features or bool(selection.reconstruct))
            and shape_of(update) == "batch" and update.kind == "gradient"
            and update.num_samples <= update.model.num_classes - 1)


def _counts_without_aux(update) -> str | None:
    """The first of COUNTS_WITHOUT_AUX that can read the update (iLRG: one step and a bias)."""
    has_bias = update.last_layer().bias is not None
    for name in COUNTS_WITHOUT_AUX:
        if name == "ilrg" and (not has_bias or update.kind != "gradient"):
            continue
        return name
    return None


def _features_skip(update) -> str | None:
    if update.kind != "gradient":
        return "the last-layer input needs a gradient; this update is a delta of local training"
    return None


def _recon_attack(update, method: str, options: dict[str, Any]) -> Attack:
    from gitool.methods import shape_of

    if method in ("analytic", "fc", "conv"):
        if shape_of(update) == "multistep":
            return Attack("reconstruct", method, dict(options),
                          skip=f"analytic reconstruction needs one local step; this update has "
                               f"{update.training.steps} (optimize simulates them)")
        chosen, reason = analytic_method(json.dumps(update.model.to_dict(), sort_keys=True),
                                         tuple(update.input.shape))
        if method == "analytic":
            return Attack("reconstruct", chosen or "analytic", dict(options), skip=reason)
        if reason is None and chosen == "conv" and method == "fc":
            reason = "the model has convolutions: fc does not apply (conv does)"
        return Attack("reconstruct", method, dict(options), skip=reason)
    return Attack("reconstruct", method, dict(options))


@lru_cache(maxsize=64)
def analytic_method(spec_json: str, input_shape: tuple[int, ...]) -> tuple[str | None, str | None]:
    """("fc" or "conv", None) when the analytic inversion can read the model as a chain of
    layers (`gitool.model_graph`), else (None, why not). Decided once per model in a
    process, on the model's computation alone."""
    import torch
    from torch import nn

    from gitool.model_graph import read_chain
    from gitool.models import ModelSpec, cached_model

    spec = ModelSpec.from_dict(json.loads(spec_json))
    model = cached_model(spec, torch.float64, "cpu")
    try:
        chain = read_chain(model, input_shape, spec.output)
    except GitoolError as exc:
        return None, f"analytic reconstruction does not apply: {exc}"
    has_conv = any(isinstance(layer.module, nn.Conv2d) for layer in chain.hidden)
    return ("conv" if has_conv else "fc"), None
