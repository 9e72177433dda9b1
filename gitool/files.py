"""gitool's files: one safetensors file per artefact, metadata as JSON in its header.

This is the only module that reads or writes headers. Every other module asks it for
typed objects (`Update`, `Truth`, `Result`, `Checkpoint`) and hands typed objects back.

A file is a plain safetensors file. Its header's ``__metadata__`` (string -> string)
holds three keys:

- ``gitool.kind``: what the file is: update, truth, labels, features, reconstruction,
  checkpoint;
- ``gitool.version``: the format version (an integer as text), so that a newer file
  is refused clearly instead of misread;
- ``gitool.meta``: one JSON document with everything that is not a tensor.

Reading a file never executes code: safetensors holds raw tensors only, and JSON is
data. Writes are atomic: the bytes go to a temporary file beside the target, which
then replaces the target in one rename, so a failed run never leaves a half-written
output nor destroys an existing one. docs/FORMAT.md documents every kind.
"""

from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from gitool import __version__
from gitool.errors import GitoolError

FORMAT_VERSION = 1
KINDS = ("update", "truth", "labels", "features", "reconstruction", "checkpoint")
RESULT_KINDS = ("labels", "features", "reconstruction")
SUFFIX = ".safetensors"

# Which tensors each result kind must hold (at least one of each tuple).
RESULT_TENSORS = {
    "labels": ("labels", "counts"),
    "features": ("features",),
    "reconstruction": ("images",),
}


# --------------------------------------------------------------------------- specs
# The specs live in gitool.specs (each fact with its constraint); they are re-exported
# here because every reader of a file meets them.
from gitool.specs import DefenceSpec, InputSpec, LossSpec, SpecError, TrainingSpec  # noqa: E402


# --------------------------------------------------------------------------- objects


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
    # True when only the classifier's tensors were read (see read_all).
    _partial: bool = field(default=False, init=False, repr=False, compare=False)

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
        if self._partial and self.path is not None:
            full = load_update(self.path)
            if full.sha256 != self.sha256:
                raise GitoolError(f"{self.path} changed while it was being read")
            self.global_state, self.values, self._partial = full.global_state, full.values, False

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


@dataclass
class Truth:
    """What the client really used (only ``score`` may read it). N = B x m rows.

    ``targets`` is N x 2: the two classes of a mixup sample (y = (1 - c) e_a + c e_b with
    c = ``mix_coef``); for hard and smoothed labels both columns hold the one class.
    ``label_smoothing`` is each sample's eps. ``counts`` (K) histograms the dominant
    class of every sample. ``step`` says which local step used the sample.
    """

    images: torch.Tensor
    inputs: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    mix_coef: torch.Tensor
    label_smoothing: torch.Tensor
    features: torch.Tensor
    counts: torch.Tensor
    step: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha256: str | None = None

    TENSORS = (
        "images",
        "inputs",
        "labels",
        "targets",
        "mix_coef",
        "label_smoothing",
        "features",
        "counts",
        "step",
    )


@dataclass
class Result:
    """What an attack step recovered: ``labels`` (B x K) and/or ``counts`` (K),
    ``features`` (B x d) or ``images`` (B x C x H x W in [0, 1]), with the method, its
    options, diagnostics, wall time, and a pointer to the update it came from."""

    kind: str
    tensors: dict[str, torch.Tensor]
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0
    source: dict[str, Any] = field(default_factory=dict)  # {"path", "sha256"} of the update
    path: Path | None = None
    sha256: str | None = None

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def require(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise GitoolError(f"{self.path or 'the ' + self.kind + ' file'} holds no '{name}' tensor")
        return self.tensors[name]

    def check_source(self, update: Update) -> None:
        """Refuse a result that was computed from another update than ``update``."""
        theirs = self.source.get("sha256")
        if theirs and update.sha256 and theirs != update.sha256:
            raise GitoolError(
                f"{self.path} was made from another update ({self.source.get('path')}), not {update.path}"
            )

    def other_update_than(self, truth: "Truth") -> str | None:
        """A warning when this result and ``truth`` point to different updates (a
        mismatched pair scores garbage); None when they agree or either cannot say
        (imported updates, truths written before the pointer existed)."""
        ours, theirs = self.source.get("sha256"), (truth.meta.get("update") or {}).get("sha256")
        if ours and theirs and ours != theirs:
            return (f"{self.path} was made from {self.source.get('path')}, but {truth.path} is the truth of "
                    f"{truth.meta['update'].get('path')} (sha256 {ours[:12]} against {theirs[:12]})")
        return None


@dataclass
class Checkpoint:
    """Model weights with the spec that builds the model (written by ``gitool train``)."""

    model: Any  # ModelSpec
    state: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


# --------------------------------------------------------------------------- low level


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and one rename."""
    from gitool.atomic import write_atomic

    write_atomic(path, data)


# Diagnostics keys that hold wall-clock times: shown on screen and in --json, never
# written into a file, so that the same inputs and seed give the same bytes.
TIMING_KEYS = frozenset({"seconds", "runtime_s", "wall_time", "time_s", "elapsed"})


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, (list, tuple)):
        return [_without_timings(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no optional spaces: one text per value."""
    return json.dumps(_jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def encode_file(kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """The canonical bytes of a gitool file."""
    from gitool.codec import encode

    header = {
        "gitool.kind": kind,
        "gitool.version": str(FORMAT_VERSION),
        "gitool.producer": f"gitool {__version__}",
        "gitool.meta": canonical_json(meta),
    }
    return encode(tensors, header)


def _write(path: str | Path, kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    atomic_write_bytes(path, encode_file(kind, tensors, meta))
    return Path(path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    return value


# dtypes a gitool file may hold: floats in the two precisions the attacks know, and
# int64 for classes, counts, steps and integer buffers (docs/FORMAT.md).
GITOOL_DTYPES = ("F32", "F64", "I64")


@dataclass
class RawFile:
    """A gitool file's header and (the requested) tensors, validated only for being a
    gitool file: ``entries`` describes every tensor the header lists, ``tensors`` holds
    those read."""

    path: Path
    kind: str
    version: int
    producer: str
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    entries: dict[str, Any] = field(default_factory=dict)


def existing_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path, or one clear line when it is missing, a folder or not a
    regular file (``what`` names the expected file in that message)."""
    from gitool.codec import open_regular

    path = Path(path)
    open_regular(path, what).close()
    return path


def read_raw(path: str | Path, kinds: Iterable[str] | None = None, *, load_tensors: bool = True,
             expect=None) -> RawFile:
    """Open any gitool file; check it is one, of a version we read and (if ``kinds``
    is given) of an expected kind. Raises GitoolError with one clear line otherwise.

    ``expect(raw)``, when given, checks the header (``raw.entries``, ``raw.meta``) before
    any tensor is read, and returns the names to read (None: all)."""
    from gitool.codec import TensorFile

    with TensorFile(path, "a gitool file") as handle:
        raw = _header(handle, kinds)
        names = expect(raw) if expect is not None else None
        if load_tensors:
            names = list(raw.entries) if names is None else names
            raw.tensors = {name: handle.read(name) for name in names}
    return raw


def _header(handle, kinds: Iterable[str] | None) -> RawFile:
    from gitool.codec import loads_json

    path, header = handle.path, handle.metadata
    kind = header.get("gitool.kind")
    if kind is None:
        raise GitoolError(f"{path}: a safetensors file without gitool metadata (not written by gitool)")
    if kind not in KINDS:
        raise GitoolError(f"{path}: unknown gitool.kind {kind[:40]!r}")
    text = header.get("gitool.version", "")
    if not (text.isascii() and text.isdigit() and len(text) < 6):
        raise GitoolError(f"{path}: unreadable gitool.version {text[:20]!r}")
    version = int(text)
    if version > FORMAT_VERSION:
        raise GitoolError(
            f"{path}: format version {version} is newer than this gitool reads ({FORMAT_VERSION}); upgrade gitool"
        )
    if version < 1:
        raise GitoolError(f"{path}: unknown format version {version}")
    meta = loads_json(header.get("gitool.meta", "{}"), f"{path}: gitool.meta")
    if not isinstance(meta, dict):
        raise GitoolError(f"{path}: gitool.meta is not a JSON object")
    kinds = tuple(kinds) if kinds is not None else None
    if kinds is not None and kind not in kinds:
        wanted = " or ".join(kinds)
        raise GitoolError(f"{path} is {_a(kind)} {kind} file; this needs {_a(kinds[0])} {wanted} file")
    for entry in handle.entries.values():
        if entry.dtype not in GITOOL_DTYPES:
            raise GitoolError(f"{path}: tensor '{entry.name[:80]}' is {entry.dtype}; gitool files hold float32, "
                              "float64 or int64 only")
    return RawFile(path, kind, version, str(header.get("gitool.producer", ""))[:80], meta, {},
                   dict(handle.entries))


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


def _require_finite(raw: RawFile, names: Iterable[str]) -> None:
    for name in names:
        tensor = raw.tensors[name]
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise GitoolError(f"{raw.path}: tensor '{name}' holds NaN or infinite values")


def _require_finite_on_disk(path: Path, names: list[str]) -> None:
    """Finiteness of tensors not kept in memory, checked piece by piece."""
    from gitool.codec import TensorFile

    with TensorFile(path, "a gitool file") as handle:
        for name in names:
            for piece in handle.chunks(name):
                if piece.is_floating_point() and not torch.isfinite(piece).all():
                    raise GitoolError(f"{path}: tensor '{name}' holds NaN or infinite values")


def _require_tensors(raw: RawFile, names: Iterable[str]) -> None:
    missing = [n for n in names if n not in raw.entries]
    if missing:
        raise GitoolError(f"{raw.path}: missing tensor(s) {', '.join(missing)} for a {raw.kind} file")


def _section(raw: RawFile, key: str) -> dict[str, Any]:
    value = raw.meta.get(key)
    if not isinstance(value, dict):
        raise GitoolError(f"{raw.path}: metadata lacks the '{key}' section")
    return value


def _build_spec(cls, raw: RawFile, key: str):
    values = dict(_section(raw, key))
    hints = typing.get_type_hints(cls)
    strange = sorted(set(values) - set(hints))
    if strange:
        listed = ", ".join(name[:40] for name in strange[:6])
        raise GitoolError(f"{raw.path}: metadata section '{key}' has unknown field(s) {listed}")
    values = {name: coerce_field(value, hints[name], f"{raw.path}: metadata {key}.{name}")
              for name, value in values.items()}
    try:
        return cls(**values)
    except SpecError as exc:
        raise GitoolError(f"{raw.path}: metadata {exc.key} {exc.message}") from None
    except TypeError as exc:
        raise GitoolError(f"{raw.path}: metadata section '{key}' is malformed ({_short(exc)})") from None


def coerce_field(value: Any, hint: Any, where: str, error: type[GitoolError] = GitoolError) -> Any:
    """``value`` (read from JSON or TOML) checked against a spec field's type: int, float,
    str, bool, tuples (from lists) and ``X | None``; ``error`` names ``where`` otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if args and type(None) in args and origin is not tuple:  # X | None
        if value is None:
            return None
        return coerce_field(value, next(a for a in args if a is not type(None)), where, error)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise error(f"{where}: expected a list, got {value!r}")
        if not (len(args) == 2 and args[1] is Ellipsis) and len(value) != len(args):
            raise error(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(coerce_field(v, args[0], where, error) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise error(f"{where}: expected true or false, got {_short_value(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"{where}: expected an integer, got {_short_value(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{where}: expected a number, got {_short_value(value)}")
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float
            raise error(f"{where}: {str(value)[:20]}... is too large for a number") from None
    if hint is str:
        if not isinstance(value, str):
            raise error(f"{where}: expected a string, got {_short_value(value)}")
        return value
    raise TypeError(f"no coercion for {hint!r}")  # a spec field type this function does not know


def _short_value(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else f"{str(value)[:20]}..."
    return text if len(text) <= 80 else text[:77] + "..."


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


# --------------------------------------------------------------------------- updates

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
    _require_finite(raw, raw.tensors)
    if tensors == "classifier":  # the rest stays on disk, but a NaN anywhere still refuses the file
        _require_finite_on_disk(raw.path, [n for n in raw.entries if n not in raw.tensors])
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
        sha256=file_sha256(raw.path),
    )
    update._partial = tensors == "classifier"
    return update


UPDATE_META_KEYS = {"update_kind", "model", "input", "loss", "training", "defence", "provenance"}


# --------------------------------------------------------------------------- truth


def save_truth(truth: Truth, path: str | Path) -> Path:
    tensors = {name: getattr(truth, name) for name in Truth.TENSORS}
    written = _write(path, "truth", tensors, truth.meta)
    truth.path, truth.sha256 = written, file_sha256(written)
    return written


def save_capture(update: Update, truth: Truth, update_path: str | Path, truth_path: str | Path) -> None:
    """Write a client round: the update, then its truth with a pointer (path, sha256) to it.

    The pair is written by :func:`gitool.atomic.write_pair`, so a run killed at any
    moment never leaves a truth that points at another update than the one beside it."""
    from gitool.atomic import write_pair

    tensors, meta = update_tensors_and_meta(update)
    update_bytes = encode_file("update", tensors, meta)
    update_sha = hashlib.sha256(update_bytes).hexdigest()
    truth.meta["update"] = {"path": str(update_path), "sha256": update_sha}
    truth_bytes = encode_file("truth", {name: getattr(truth, name) for name in Truth.TENSORS}, truth.meta)
    write_pair(update_path, update_bytes, truth_path, truth_bytes)
    update.path, update.sha256 = Path(update_path), update_sha
    truth.path, truth.sha256 = Path(truth_path), hashlib.sha256(truth_bytes).hexdigest()


# Each truth tensor: its dimensions (letters shared between tensors must agree) and
# whether it holds floats (else int64).
TRUTH_LAYOUT = {
    "images": ("NCHW", True), "inputs": ("NCHW", True), "labels": ("NK", True), "targets": ("N2", False),
    "mix_coef": ("N", True), "label_smoothing": ("N", True), "features": ("Nd", True), "counts": ("K", False),
    "step": ("N", False),
}


# Truth metadata fields and their JSON types ("ints": a list of integers).
TRUTH_META = {"indices": "ints", "seed": int, "data": str, "family": str, "update_kind": str,
              "replay_error": (int, float)}


def _is(value: Any, kind: Any) -> bool:
    if kind == "ints":
        return isinstance(value, list) and all(type(v) is int for v in value)
    return isinstance(value, kind) and not isinstance(value, bool)


def load_truth(path: str | Path) -> Truth:
    """Read and validate a truth: exactly its tensors, with shapes that agree (N rows,
    K classes, ...) and dtypes checked from the header before reading; classes in range."""

    def expect(raw: RawFile):
        _require_tensors(raw, Truth.TENSORS)
        extra = sorted(set(raw.entries) - set(Truth.TENSORS))
        if extra:
            raise GitoolError(f"{raw.path}: unexpected tensors {', '.join(n[:60] for n in extra[:6])}")
        sizes: dict[str, int] = {"2": 2}
        for name, (dims, floating) in TRUTH_LAYOUT.items():
            entry = raw.entries[name]
            if len(entry.shape) != len(dims):
                raise GitoolError(f"{raw.path}: tensor '{name}' has shape {entry.shape}, expected {len(dims)} "
                                  f"dimensions ({' x '.join(dims)})")
            for letter, size in zip(dims, entry.shape):
                if sizes.setdefault(letter, size) != size:
                    raise GitoolError(f"{raw.path}: tensor '{name}' has {size} along {letter}, other tensors "
                                      f"{sizes[letter]}")
            if floating != (entry.dtype in ("F32", "F64")):
                raise GitoolError(f"{raw.path}: tensor '{name}' is {entry.dtype}, expected "
                                  f"{'float32 or float64' if floating else 'int64'}")
        for key, kind in TRUTH_META.items():
            value = raw.meta.get(key)
            if value is not None and not _is(value, kind):
                raise GitoolError(f"{raw.path}: metadata {key} has the wrong type ({type(value).__name__})")
        for key in ("update", "private"):
            pointer = raw.meta.get(key)
            if pointer is not None and not (isinstance(pointer, dict)
                                            and all(isinstance(pointer.get(k), str) for k in ("path", "sha256"))):
                raise GitoolError(f"{raw.path}: metadata {key} must be an object with a path and a sha256")
        return None

    raw = read_raw(path, ("truth",), expect=expect)
    _require_finite(raw, Truth.TENSORS)
    classes = raw.tensors["labels"].shape[1]
    targets = raw.tensors["targets"]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= classes):
        raise GitoolError(f"{raw.path}: tensor 'targets' holds classes outside 0..{classes - 1}")
    for name in ("counts", "step"):
        if raw.tensors[name].numel() and int(raw.tensors[name].min()) < 0:
            raise GitoolError(f"{raw.path}: tensor '{name}' holds negative values")
    return Truth(**{name: raw.tensors[name] for name in Truth.TENSORS}, meta=raw.meta, path=raw.path,
                 sha256=file_sha256(raw.path))


# --------------------------------------------------------------------------- results


def new_result(kind: str, tensors: dict[str, torch.Tensor], *, method: str, update: Update | None,
               options: dict[str, Any] | None = None, diagnostics: dict[str, Any] | None = None,
               wall_time: float = 0.0) -> Result:
    """A result object with its pointer back to the update it was computed from."""
    source = {}
    if update is not None and update.path is not None:
        source = {"path": str(update.path), "sha256": update.sha256}
    return Result(kind=kind, tensors=tensors, method=method, options=options or {},
                  diagnostics=diagnostics or {}, wall_time=wall_time, source=source)


def save_result(result: Result, path: str | Path) -> Path:
    """Write a result. Wall-clock times stay out of the file (see :data:`TIMING_KEYS`):
    the same update, options and seed give the same bytes."""
    if result.kind not in RESULT_TENSORS:
        raise GitoolError(f"unknown result kind {result.kind!r}")
    if not any(name in result.tensors for name in RESULT_TENSORS[result.kind]):
        raise GitoolError(f"a {result.kind} result needs one of: {', '.join(RESULT_TENSORS[result.kind])}")
    meta = {
        "method": result.method,
        "options": _without_timings(result.options),
        "diagnostics": _without_timings(result.diagnostics),
        "source": result.source,
    }
    written = _write(path, result.kind, result.tensors, meta)
    result.path, result.sha256 = written, file_sha256(written)
    return written


# Each result tensor: its number of dimensions and whether it holds floats (else int64),
# and the range its values must lie in (soft labels are probabilities, images in [0, 1];
# a small slack admits round-off of the analytic methods).
RESULT_LAYOUT = {"labels": (2, True), "counts": (1, False), "features": (2, True), "images": (4, True)}
RESULT_RANGES = {"labels": (-1e-6, 1 + 1e-6), "counts": (0, float("inf")), "images": (-1e-6, 1 + 1e-6)}

RESULT_META = {"method": str, "options": dict, "diagnostics": dict, "source": dict, "wall_time": (int, float)}


def load_result(path: str | Path, kinds: Iterable[str] = RESULT_KINDS) -> Result:
    def expect(raw: RawFile):
        if not any(name in raw.entries for name in RESULT_TENSORS[raw.kind]):
            raise GitoolError(f"{raw.path}: a {raw.kind} file needs one of: {', '.join(RESULT_TENSORS[raw.kind])}")
        extra = sorted(set(raw.entries) - set(RESULT_TENSORS[raw.kind]))
        if extra:
            raise GitoolError(f"{raw.path}: unexpected tensors {', '.join(n[:60] for n in extra[:6])}")
        for name, entry in raw.entries.items():
            dims, floating = RESULT_LAYOUT[name]
            if len(entry.shape) != dims or (floating != (entry.dtype in ("F32", "F64"))):
                raise GitoolError(f"{raw.path}: tensor '{name}' is {entry.dtype} {entry.shape}; expected {dims} "
                                  f"dimensions of {'floats' if floating else 'int64'}")
            if name != "counts" and entry.shape[0] < 1:
                raise GitoolError(f"{raw.path}: tensor '{name}' has no rows")
        if "labels" in raw.entries and "counts" in raw.entries \
                and raw.entries["labels"].shape[1] != raw.entries["counts"].shape[0]:
            raise GitoolError(f"{raw.path}: labels of {raw.entries['labels'].shape[1]} classes but counts of "
                              f"{raw.entries['counts'].shape[0]}")
        for key, kind in RESULT_META.items():
            value = raw.meta.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise GitoolError(f"{raw.path}: metadata {key} has the wrong type ({type(value).__name__})")
        source = raw.meta.get("source") or {}
        if not all(isinstance(source.get(k, ""), str) for k in ("path", "sha256")):
            raise GitoolError(f"{raw.path}: metadata source must hold a path and a sha256 as text")
        return None

    raw = read_raw(path, kinds, expect=expect)
    _require_finite(raw, raw.tensors)
    for name, (low, high) in RESULT_RANGES.items():
        tensor = raw.tensors.get(name)
        if tensor is not None and tensor.numel() and (float(tensor.min()) < low or float(tensor.max()) > high):
            raise GitoolError(f"{raw.path}: tensor '{name}' holds values outside [{low:g}, {high:g}]")
    return Result(
        kind=raw.kind,
        tensors=raw.tensors,
        method=str(raw.meta.get("method", "")),
        options=raw.meta.get("options") or {},
        diagnostics=raw.meta.get("diagnostics") or {},
        wall_time=float(raw.meta.get("wall_time") or 0.0),
        source=raw.meta.get("source") or {},
        path=raw.path,
        sha256=file_sha256(raw.path),
    )


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> Path:
    meta = {"model": checkpoint.model.to_dict(), **checkpoint.meta}
    written = _write(path, "checkpoint", checkpoint.state, meta)
    checkpoint.path = written
    return written


def load_checkpoint(path: str | Path, budget: int | None = None) -> Checkpoint:
    """Weights from a gitool checkpoint, a plain safetensors state dict, or a torch
    ``.pt``/``.pth`` state dict loaded with ``weights_only=True`` (never unpickling
    arbitrary objects). A plain state dict carries no model spec (``model`` is None).

    ``budget`` (bytes), when given, refuses a file whose tensors would take more, before
    any is read."""
    from gitool.codec import TensorFile
    from gitool.models import ModelSpec, check_trusted, expected_tensors

    path = existing_file(path, "a checkpoint")
    if path.suffix in (".pt", ".pth", ".bin"):
        return Checkpoint(model=None, state=read_torch_state(path, budget=budget), path=path)

    def within_budget(raw_or_handle) -> None:
        total = sum(entry.nbytes for entry in raw_or_handle.entries.values())
        if budget is not None and total > budget:
            raise GitoolError(f"{path}: its tensors take {total} bytes, more than the model's weights could need "
                              f"({budget}); refused unread")

    with TensorFile(path, "a checkpoint") as handle:
        if "gitool.kind" not in handle.metadata:  # a plain state dict, as other tools write it
            within_budget(handle)
            return Checkpoint(model=None, state={name: handle.read(name) for name in handle.entries}, path=path)
    parsed = {}

    def expect(raw: RawFile) -> None:
        within_budget(raw)
        try:
            spec = ModelSpec.from_dict(_section(raw, "model"))
        except GitoolError as exc:
            raise GitoolError(f"{raw.path}: {exc}") from None
        check_trusted(spec, str(raw.path))
        normalize = raw.meta.get("normalize")
        if normalize is not None:
            if not isinstance(normalize, dict) or set(normalize) != {"mean", "std"}:
                raise GitoolError(f"{raw.path}: metadata normalize must be an object with mean and std")
            try:
                InputSpec(shape=tuple(spec.input_shape), mean=normalize["mean"], std=normalize["std"])
            except SpecError as exc:
                raise GitoolError(f"{raw.path}: metadata normalize.{exc.name} {exc.message}") from None
        try:
            state, _ = expected_tensors(spec)
        except GitoolError as exc:
            raise GitoolError(f"{raw.path}: {exc}") from None
        missing, extra = sorted(set(state) - set(raw.entries)), sorted(set(raw.entries) - set(state))
        wrong = [f"{n} {raw.entries[n].shape} vs model {state[n].shape}" for n in sorted(set(state) & set(raw.entries))
                 if raw.entries[n].shape != state[n].shape]
        if missing or extra or wrong:
            problems = ([f"missing {', '.join(missing[:6])}"] if missing else []) + \
                       ([f"unexpected {', '.join(n[:60] for n in extra[:6])}"] if extra else []) + wrong[:6]
            raise GitoolError(f"{raw.path}: the weights do not fit the model {spec.name[:80]}: "
                              + " | ".join(problems))
        parsed["spec"] = spec

    raw = read_raw(path, ("checkpoint",), expect=expect)
    _require_finite(raw, raw.tensors)
    spec = parsed["spec"]
    return Checkpoint(model=spec, state=raw.tensors, meta={k: v for k, v in raw.meta.items() if k != "model"},
                      path=raw.path)


def read_torch_object(path: str | Path, budget: int | None = None) -> Any:
    """Whatever a torch file holds, loaded with ``weights_only=True``: tensors, dicts,
    lists, numbers and strings only. A file that needs arbitrary unpickling (a pickled
    object, whose loading could run code) is refused, not executed. ``budget`` (bytes)
    refuses, unread, a file that would unpack to more."""
    import pickle
    import zipfile

    path = existing_file(path, "a torch file")
    if budget is not None:
        size = path.stat().st_size
        try:
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    size = sum(info.file_size for info in archive.infolist())
        except (zipfile.BadZipFile, OSError, ValueError):
            pass  # torch.load reports what is wrong
        if size > budget:
            raise GitoolError(f"{path}: it unpacks to {size} bytes, more than the model's weights could need "
                              f"({budget}); refused unread")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():  # the weights-only unpickler met a class or function
            raise GitoolError(f"refused: {path} needs arbitrary unpickling (a pickled object), which could run "
                              "code; save a plain state_dict of tensors") from None
        raise GitoolError(f"{path}: not a readable torch file ({_short_torch(exc)})") from None
    except Exception as exc:  # torch raises several types for corrupt or truncated files
        raise GitoolError(f"{path}: not a readable torch file ({_short_torch(exc)})") from None


def _short_torch(exc: BaseException) -> str:
    """The telling line of a torch.load error (torch prefixes long advice)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    telling = [line for line in lines if "Unsupported" in line or "failed reading" in line]
    line = telling[0] if telling else lines[0] if lines else type(exc).__name__
    return line.split(". ")[0].rstrip(".")[:160]


def read_torch_state(path: str | Path, budget: int | None = None) -> dict[str, torch.Tensor]:
    """A tensor dictionary from a torch file, with ``weights_only=True``: a file that
    needs arbitrary unpickling is refused, not executed."""
    obj = read_torch_object(path, budget=budget)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise GitoolError(f"{path}: expected a dictionary of tensors (a state_dict)")
    return {str(k): v for k, v in obj.items()}


# --------------------------------------------------------------------------- naming


def stem_of(path: str | Path) -> str:
    """``0007.update.safetensors`` -> ``0007``; ``run.safetensors`` -> ``run``."""
    name = Path(path).name
    if name.endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    for kind in KINDS:
        if name.endswith("." + kind):
            return name[: -len(kind) - 1]
    return name


def output_name(input_path: str | Path, kind: str) -> str:
    """The file name an output of ``kind`` gets when it is made from ``input_path``."""
    return f"{stem_of(input_path)}.{kind}{SUFFIX}"


def expand_inputs(items: Iterable[str | Path], kind: str) -> list[Path]:
    """Files named directly, plus every ``*.{kind}.safetensors`` inside named folders."""
    paths: list[Path] = []
    for item in items:
        item = Path(item)
        if item.is_dir():
            found = sorted(item.glob(f"*.{kind}{SUFFIX}"))
            if not found:
                raise GitoolError(f"{item}: no *.{kind}{SUFFIX} files in this folder")
            paths.extend(found)
        else:
            paths.append(item)
    return paths


# --------------------------------------------------------------------------- pairs of files


def pointed_update(pointer: Any, beside: Path | None) -> Update | None:
    """The update a result's ``source`` or a truth's ``update`` pointer names, when it can
    be found (as recorded, or by name beside the pointing file) and its sha256 matches;
    only its classifier is read. None otherwise: the pointer is information, not a must."""
    if not isinstance(pointer, dict) or not isinstance(pointer.get("path"), str):
        return None
    recorded = Path(pointer["path"])
    for candidate in (recorded, (beside.parent / recorded.name) if beside is not None else None):
        if candidate is None or not candidate.is_file():
            continue
        if pointer.get("sha256") and file_sha256(candidate) != pointer["sha256"]:
            continue
        from gitool.models import UntrustedFactory

        try:
            return load_update(candidate, tensors="classifier")
        except UntrustedFactory:  # checking the fit would run the user's code, which nobody named here
            return None
    return None


def check_fits_update(kind: str, tensors: dict[str, torch.Tensor], update: Update, where: Path | None) -> None:
    """A result's or truth's tensors against the update they belong to: N samples, K
    classes, the classifier's feature size d, the input shape."""
    layer = update.last_layer()
    k, d = layer.weight.shape
    n = update.num_samples
    shapes = {"labels": (None, k), "counts": (k,), "features": (None, d), "images": (None, *update.input.shape),
              "inputs": (None, *update.input.shape)}
    for name, want in shapes.items():
        tensor = tensors.get(name)
        if tensor is None:
            continue
        got = tuple(tensor.shape)
        rows_ok = len(want) == 1 or got[:1] == (n,)  # one row per sample of the round
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)) or not rows_ok:
            raise GitoolError(f"{where}: '{name}' of shape {got} does not fit its update {update.path} "
                              f"({n} samples, K = {k}, d = {d}, input {tuple(update.input.shape)})")
