"""Update files: what a client sends (a one-step gradient or an m-step delta) with the
global weights and every fact the server knows (docs/FORMAT.md, "update").

Loading checks the header (every fact against its constraint, tensor names, shapes and
dtypes against the model the header names, built on torch's meta device) before any
tensor is read, and can read the classifier's tensors alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gitool.errors import GitoolError
from gitool.files.container import (RawFile, _build_spec, _require_finite, _section, _write, file_identity,
                                    file_sha256, read_raw, sha256_checking_finite)
from gitool.specs import DefenceSpec, InputSpec, LossSpec, TrainingSpec


@dataclass
class LastLayer:
    """The classifier z = W x + b with its gradient (or update): W is K x d. Tensors are
    float64 because the analytic attacks are exact only in double precision."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    weight_grad: torch.Tensor
    bias_grad: torch.Tensor | None
    weight_name: str
    bias_name: str | None


@dataclass
class Update:
    """What the client sends: the gradient of one step (``kind == "gradient"``) or the
    model difference after m local steps (``kind == "delta"``), with everything the
    honest-but-curious server knows: the global weights, model, input, loss family,
    training hyperparameters and defences."""

    model: Any  # gitool.models.ModelSpec
    input: InputSpec
    loss: LossSpec
    training: TrainingSpec
    defence: DefenceSpec
    kind: str
    global_state: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]  # gradient or delta, one per trainable parameter
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha256: str | None = None
    # (weight, bias) parameter names of the classifier, found once: finding them builds the model.
    _classifier_names: tuple[str, str | None] | None = field(default=None, init=False, repr=False, compare=False)
    # The tensors a partial load left on disk, and the file's identity then (see read_all).
    _unread: list[str] = field(default_factory=list, init=False, repr=False, compare=False)
    _identity: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_samples(self) -> int:
        return self.training.num_samples

    @property
    def is_single_gradient(self) -> bool:
        return self.kind == "gradient" and self.training.num_samples == 1

    def build_model(self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"):
        """The global model, in ``dtype`` on ``device``, in the client's mode. The module
        is built once per model spec in a process (gitool.models.cached_model); each call
        loads this update's weights into it and hands back a copy, so callers may change
        their model freely and two updates' models never share weights."""
        import copy

        from gitool.models import cached_model

        self.read_all()
        model = cached_model(self.model, dtype, "cpu")
        load_state(model, self.global_state, what=f"update {self.path or ''}".strip())
        model = copy.deepcopy(model).to(device=device)  # callers may change it; the cached one stays clean
        model.train(self.training.model_mode == "train")
        return model

    def read_all(self) -> None:
        """Read the tensors a partial load (``load_update(..., tensors="classifier")``) left on disk."""
        if not self._unread or self.path is None:
            return
        if file_identity(self.path) != self._identity:
            raise GitoolError(f"{self.path} changed while it was being read")
        from gitool.codec import TensorFile

        prefix = VALUE_PREFIX[self.kind]
        tensors = {GLOBAL_PREFIX + n: t for n, t in self.global_state.items()}
        tensors.update({prefix + n: t for n, t in self.values.items()})
        with TensorFile(self.path, "a gitool file") as handle:  # checked finite when the load hashed it
            tensors.update({name: handle.read(name) for name in self._unread})
            order = list(handle.entries)  # the order a full load gives
        self.global_state = {n[len(GLOBAL_PREFIX):]: tensors[n] for n in order if n.startswith(GLOBAL_PREFIX)}
        self.values = {n[len(prefix):]: tensors[n] for n in order if n.startswith(prefix)}
        self._unread = []

    def last_layer(self, model=None) -> LastLayer:
        """The classifier's weights and their gradient/update, in float64."""
        from gitool.models import last_linear

        if model is not None:
            layer = last_linear(model)
            names = {id(p): n for n, p in model.named_parameters()}
            self._classifier_names = (names[id(layer.weight)],
                                      names.get(id(layer.bias)) if layer.bias is not None else None)
        elif self._classifier_names is None:
            from gitool.models import classifier_names

            self._classifier_names = classifier_names(self.model)
        weight_name, bias_name = self._classifier_names

        def f64(name):
            return None if name is None else self.values[name].detach().to(torch.float64)

        def state(name):
            return None if name is None else self.global_state[name].detach().to(torch.float64)

        return LastLayer(
            weight=state(weight_name),
            bias=state(bias_name),
            weight_grad=f64(weight_name),
            bias_grad=f64(bias_name),
            weight_name=weight_name,
            bias_name=bias_name,
        )


def load_state(model, state: dict[str, torch.Tensor], what: str = "weights") -> None:
    """Load ``state`` into ``model`` strictly; name every missing, extra or misshaped entry."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{n} {tuple(state[n].shape)} vs model {tuple(expected[n].shape)}"
        for n in set(expected) & set(state)
        if tuple(state[n].shape) != tuple(expected[n].shape)
    )
    problems = []
    if missing:
        problems.append("missing " + ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
    if extra:
        problems.append("unexpected " + ", ".join(extra[:6]) + (" ..." if len(extra) > 6 else ""))
    if misshaped:
        problems.append("shape mismatch " + "; ".join(misshaped[:6]) + (" ..." if len(misshaped) > 6 else ""))
    if problems:
        raise GitoolError(f"{what} do not fit the model: " + " | ".join(problems))
    model.load_state_dict({n: state[n].to(expected[n].dtype) for n in expected}, strict=True)


GLOBAL_PREFIX = "global."
VALUE_PREFIX = {"gradient": "grad.", "delta": "delta."}


def update_tensors_and_meta(update: Update) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """What :func:`save_update` writes: the tensors by file name and the metadata."""
    from gitool.models import expected_tensors

    if update.kind not in VALUE_PREFIX:
        raise GitoolError(f"unknown update kind {update.kind!r}")
    # The values must belong to the model's parameters, or nobody can use the file.
    _, params = expected_tensors(update.model)
    unknown = sorted(set(update.values) - set(params))
    if unknown:
        raise GitoolError("update values for parameters the model lacks: " + ", ".join(unknown[:6]))
    tensors = {GLOBAL_PREFIX + n: t for n, t in update.global_state.items()}
    tensors.update({VALUE_PREFIX[update.kind] + n: t for n, t in update.values.items()})
    meta = {
        "update_kind": update.kind,
        "model": update.model.to_dict(),
        "input": asdict(update.input),
        "loss": asdict(update.loss),
        "training": asdict(update.training),
        "defence": asdict(update.defence),
        "provenance": update.provenance,
    }
    return tensors, meta


def save_update(update: Update, path: str | Path) -> Path:
    tensors, meta = update_tensors_and_meta(update)
    written = _write(path, "update", tensors, meta)
    update.path, update.sha256 = written, file_sha256(written)
    return written


FLOAT_OF_DTYPE = {"float32": "F32", "float64": "F64"}


def load_update(path: str | Path, tensors: str = "all") -> Update:
    """Read and validate an update: kind, version, metadata (every fact against its
    constraint), and the tensor names, shapes and dtypes against the model the metadata
    describes, all before any tensor is read; then finiteness of what was read.

    ``tensors="classifier"`` reads only the classifier's weights and their gradient or
    delta (what the soft-label and most count methods need); ``Update.read_all`` (which
    ``build_model`` calls) reads the rest when a method needs it."""
    from gitool.models import ModelSpec, check_trusted, classifier_names, expected_tensors

    parsed: dict[str, Any] = {}

    def expect(raw: RawFile):
        kind = raw.meta.get("update_kind")
        if kind not in VALUE_PREFIX:
            raise GitoolError(f"{raw.path}: unknown update_kind {str(kind)[:40]!r} (expected gradient or delta)")
        strange = sorted(set(raw.meta) - UPDATE_META_KEYS)
        if strange:
            raise GitoolError(f"{raw.path}: unknown metadata key(s) {', '.join(k[:40] for k in strange[:6])}")
        try:
            spec = ModelSpec.from_dict(_section(raw, "model"))
        except GitoolError as exc:
            raise GitoolError(f"{raw.path}: {exc}") from None
        check_trusted(spec, str(raw.path))
        provenance = raw.meta.get("provenance", {})
        if not isinstance(provenance, dict):
            raise GitoolError(f"{raw.path}: metadata provenance must be a JSON object")
        unknown = provenance.get("unknown_facts", [])
        if not isinstance(unknown, list) or not all(isinstance(n, str) for n in unknown):
            raise GitoolError(f"{raw.path}: metadata provenance.unknown_facts must be a list of names")
        from gitool.facts import FACTS

        strange = sorted(n for n in unknown if n not in FACTS)
        if strange:
            raise GitoolError(f"{raw.path}: metadata provenance.unknown_facts names no fact "
                              f"{', '.join(repr(n[:40]) for n in strange[:4])}; facts: {', '.join(FACTS)}")
        parsed.update(kind=kind, spec=spec, provenance=provenance,
                      input=_build_spec(InputSpec, raw, "input"), loss=_build_spec(LossSpec, raw, "loss"),
                      training=_build_spec(TrainingSpec, raw, "training"),
                      defence=_build_spec(DefenceSpec, raw, "defence"))
        if tuple(parsed["input"].shape) != tuple(spec.input_shape):
            raise GitoolError(f"{raw.path}: input shape {parsed['input'].shape} differs from the model's "
                              f"{spec.input_shape}")
        try:
            state, params = expected_tensors(spec)
        except GitoolError as exc:
            raise GitoolError(f"{raw.path}: {exc}") from None
        prefix = VALUE_PREFIX[kind]
        stray = [n for n in raw.entries if not (n.startswith(GLOBAL_PREFIX) or n.startswith(prefix))]
        if stray:
            raise GitoolError(f"{raw.path}: unexpected tensors {', '.join(n[:60] for n in stray[:6])}")
        float_dtype = FLOAT_OF_DTYPE[parsed["training"].dtype]
        problems = []
        for prefix_, wanted, what in ((GLOBAL_PREFIX, state, "global weights"), (prefix, params, kind)):
            have = {n[len(prefix_):]: e for n, e in raw.entries.items() if n.startswith(prefix_)}
            missing = sorted(set(wanted) - set(have))
            extra = sorted(set(have) - set(wanted))
            if missing:
                problems.append(f"no {what} for {', '.join(missing[:6])}")
            if extra:
                problems.append(f"{what} for parameters the model lacks: {', '.join(n[:60] for n in extra[:6])}")
            for name in sorted(set(have) & set(wanted)):
                entry, (shape, floating) = have[name], wanted[name]
                if entry.shape != shape:
                    problems.append(f"{prefix_}{name} {entry.shape} vs model {shape}")
                elif floating and entry.dtype != float_dtype:
                    problems.append(f"{prefix_}{name} is {entry.dtype}, the update says {parsed['training'].dtype}")
                elif not floating and entry.dtype != "I64":
                    problems.append(f"{prefix_}{name} is {entry.dtype}, the model's buffer is int64")
        if problems:
            raise GitoolError(f"{raw.path}: the tensors do not fit the model {spec.name[:80]}: "
                              + "; ".join(problems[:6]))
        if tensors == "classifier":
            try:
                names = [n for n in classifier_names(spec) if n is not None]
            except GitoolError as exc:
                raise GitoolError(f"{raw.path}: {exc}") from None
            return [p + n for p in (GLOBAL_PREFIX, prefix) for n in names]
        return None

    if tensors not in ("all", "classifier"):
        raise ValueError(f"tensors must be 'all' or 'classifier', not {tensors!r}")
    raw = read_raw(path, ("update",), expect=expect)
    identity = file_identity(raw.path)
    _require_finite(raw, raw.tensors)
    unread = [n for n in raw.entries if n not in raw.tensors]
    # The rest stays on disk, but a NaN anywhere still refuses the file: checked in the
    # same pass that hashes it.
    digest = sha256_checking_finite(raw.path, raw.entries, unread) if unread else file_sha256(raw.path)
    prefix = VALUE_PREFIX[parsed["kind"]]
    global_state = {n[len(GLOBAL_PREFIX):]: t for n, t in raw.tensors.items() if n.startswith(GLOBAL_PREFIX)}
    values = {n[len(prefix):]: t for n, t in raw.tensors.items() if n.startswith(prefix)}
    update = Update(
        model=parsed["spec"],
        input=parsed["input"],
        loss=parsed["loss"],
        training=parsed["training"],
        defence=parsed["defence"],
        kind=parsed["kind"],
        global_state=global_state,
        values=values,
        provenance=parsed["provenance"],
        path=raw.path,
        sha256=digest,
    )
    update._unread, update._identity = unread, identity
    return update


UPDATE_META_KEYS = {"update_kind", "model", "input", "loss", "training", "defence", "provenance"}
