"""The facts of a client round, each declared once with its constraint.

An update records what the server knows about the client's round in four typed specs:
:class:`InputSpec` (what the model sees), :class:`LossSpec` (the label family),
:class:`TrainingSpec` (B, m, eta, optimiser, ...) and :class:`DefenceSpec`. Each field
declares its constraint next to its default (``fact(default, Interval(...))``), in the
manner of scikit-learn's ``_parameter_constraints``, and every spec checks itself when it
is made. So the same rule serves the command-line options of ``capture`` and ``import``,
the facts files of ``import --facts`` and the metadata of every loaded update: an
impossible value can never reach an attack, whoever wrote it.

A violated constraint raises :class:`SpecError` naming the field; callers translate it
into their own terms (the file and metadata key, or the option that set the field, see
:data:`OPTION_OF`).
"""

from __future__ import annotations

import contextlib
import math
import re
import typing
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from gitool.errors import GitoolError

if TYPE_CHECKING:  # torch is imported where tensors are made: checking options needs none
    import torch

# Bounds that no legitimate round exceeds, so that a header cannot make gitool allocate
# for a batch, an image or a class count that does not exist.
MAX_BATCH = 100_000
MAX_STEPS = 1_000_000
MAX_SAMPLES = 1_000_000  # B x m
MAX_CHANNELS = 64
MAX_SIDE = 4096
MAX_PIXELS = 1 << 24  # C x H x W of one input
MAX_CLASSES = 1_000_000
MAX_SEED = 2**63 - 1


class SpecError(ValueError):
    """A fact violates its constraint: ``field`` (e.g. ``"batch_size"``) and a message
    that completes the sentence "FIELD ..."."""

    def __init__(self, section: str, name: str, message: str) -> None:
        super().__init__(f"{section}.{name} {message}")
        self.section, self.name, self.message = section, name, message

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"


# --------------------------------------------------------------------------- constraints


@dataclass(frozen=True)
class Interval:
    """A number of type ``kind`` (int or float) in an interval; floats must be finite.

    ``closed`` says which ends belong to it: both, left, right or neither."""

    kind: type
    low: float | None = None
    high: float | None = None
    closed: str = "both"

    def problem(self, value: Any) -> str | None:
        """None when ``value`` satisfies the constraint, else what is wrong."""
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            return f"must be {'a number' if self.kind is float else 'an integer'} {self.describe()}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number {self.describe()}, got {value}"
        low_ok = self.low is None or value > self.low or (value == self.low and self.closed in ("both", "left"))
        high_ok = self.high is None or value < self.high or (value == self.high and self.closed in ("both", "right"))
        return None if low_ok and high_ok else f"must be {self.describe()}, got {value!r}"

    def describe(self) -> str:
        left = "[" if self.closed in ("both", "left") else "("
        right = "]" if self.closed in ("both", "right") else ")"
        if self.low is not None and self.high is not None:
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>=' if left == '[' else '>'} {_num(self.low)}"
        if self.high is not None:
            return f"{'<=' if right == ']' else '<'} {_num(self.high)}"
        return ""


@dataclass(frozen=True)
class OneOf:
    """One of the listed strings."""

    values: tuple[str, ...]

    def problem(self, value: Any) -> str | None:
        if isinstance(value, str) and value in self.values:
            return None
        return f"must be one of {', '.join(self.values)}, got {value!r}"

    def describe(self) -> str:
        return f"one of {', '.join(self.values)}"


@dataclass(frozen=True)
class Optional_:
    """None, or a value that meets ``inner``."""

    inner: Any

    def problem(self, value: Any) -> str | None:
        return None if value is None else self.inner.problem(value)

    def describe(self) -> str:
        return f"{self.inner.describe()} (or absent)"


@dataclass(frozen=True)
class Values:
    """A non-empty tuple of numbers, each meeting ``each``, of at most ``most`` items."""

    each: Interval
    most: int = MAX_CHANNELS

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= self.most:
            return f"must be a list of 1 to {self.most} numbers, got {_short(value)}"
        for item in value:
            wrong = self.each.problem(item)
            if wrong:
                return "values " + wrong
        return None

    def describe(self) -> str:
        return f"numbers {self.each.describe()}"


MAX_OUTPUT_INDEX = 255
_OUTPUT_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class OutputSelector:
    """Which of the values a model's ``forward`` returns holds the logits: None (forward
    returns the logits tensor itself), an index into a returned tuple or list, or a key
    of a returned dict (letters, digits, ``_ . -``, at most 64 characters)."""

    most: int = MAX_OUTPUT_INDEX

    def problem(self, value: Any) -> str | None:
        if value is None or (type(value) is int and 0 <= value <= self.most):
            return None
        if isinstance(value, str) and _OUTPUT_KEY.match(value):
            return None
        return f"must be {self.describe()}, got {_short(value)}"

    def describe(self) -> str:
        return (f"an index 0 to {self.most} or a key (a name of at most 64 letters, digits, _ . -, not starting "
                "with a digit)")


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def fact(default: Any, constraint: Any) -> Any:
    """A spec field with its default and its constraint."""
    return field(default=default, metadata={"constraint": constraint})


def check_fields(spec: Any, section: str) -> None:
    """Check every field of ``spec`` against its declared constraint."""
    for item in fields(spec):
        constraint = item.metadata.get("constraint")
        if constraint is not None:
            wrong = constraint.problem(getattr(spec, item.name))
            if wrong:
                raise SpecError(section, item.name, wrong)


def constraint_of(cls: type, name: str) -> Any:
    """The declared constraint of field ``name`` of spec class ``cls``."""
    return next(f.metadata["constraint"] for f in fields(cls) if f.name == name)


# --------------------------------------------------------------------------- specs

NONNEGATIVE = Interval(float, 0.0, None)
POSITIVE = Interval(float, 0.0, None, closed="neither")
FRACTION = Interval(float, 0.0, 1.0, closed="left")  # [0, 1)


@dataclass(frozen=True)
class InputSpec:
    """What the model sees: input shape (C, H, W) and the normalisation applied to
    images in [0, 1]: ``inputs = (images - mean) / std`` per channel."""

    shape: tuple[int, int, int]
    mean: tuple[float, ...] = fact((0.0,), Values(Interval(float)))
    std: tuple[float, ...] = fact((1.0,), Values(POSITIVE))

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape) if isinstance(self.shape, list) else self.shape)
        object.__setattr__(self, "mean", tuple(self.mean) if isinstance(self.mean, list) else self.mean)
        object.__setattr__(self, "std", tuple(self.std) if isinstance(self.std, list) else self.std)
        wrong = shape_problem(self.shape)
        if wrong:
            raise SpecError("input", "shape", wrong)
        check_fields(self, "input")
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, self.shape[0]):
                raise SpecError("input", name, f"needs 1 or {self.shape[0]} values (one per channel), "
                                f"got {len(getattr(self, name))}")

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        channels = self.shape[0]
        mean = torch.as_tensor(self.mean, dtype=like.dtype, device=like.device)
        std = torch.as_tensor(self.std, dtype=like.dtype, device=like.device)
        mean = mean.expand(channels) if mean.numel() == 1 else mean
        std = std.expand(channels) if std.numel() == 1 else std
        return mean.view(1, channels, 1, 1), std.view(1, channels, 1, 1)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(images)
        return (images - mean) / std

    def denormalize(self, inputs: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(inputs)
        return inputs * std + mean

    @property
    def numel(self) -> int:
        c, h, w = self.shape
        return c * h * w


def shape_problem(shape: Any) -> str | None:
    """None for an input shape (C, H, W) within gitool's bounds, else what is wrong."""
    if (not isinstance(shape, (tuple, list)) or len(shape) != 3
            or not all(type(v) is int and v >= 1 for v in shape)):
        return f"must be three positive integers C, H, W, got {_short(shape)}"
    c, h, w = shape
    if c > MAX_CHANNELS or h > MAX_SIDE or w > MAX_SIDE or c * h * w > MAX_PIXELS:
        return (f"{c}x{h}x{w} is beyond gitool's bounds (C <= {MAX_CHANNELS}, H and W <= {MAX_SIDE}, "
                f"C*H*W <= {MAX_PIXELS})")
    return None


FAMILIES = ("hard", "smoothing", "mixup")


@dataclass(frozen=True)
class LossSpec:
    """The label family the client trained with, as configured (the per-sample values
    stay in the truth file): hard labels, label smoothing with a fixed factor or a
    range drawn per sample, or mixup with a fixed coefficient or Beta(alpha, alpha)."""

    family: str = fact("hard", OneOf(FAMILIES))
    label_smoothing: float | None = fact(None, Optional_(FRACTION))
    label_smoothing_range: tuple[float, float] | None = fact(None, Optional_(Values(FRACTION, most=2)))
    mixup_alpha: float | None = fact(None, Optional_(POSITIVE))
    mixup_coef: float | None = fact(None, Optional_(Interval(float, 0.0, 1.0)))

    def __post_init__(self) -> None:
        if isinstance(self.label_smoothing_range, list):
            object.__setattr__(self, "label_smoothing_range", tuple(self.label_smoothing_range))
        check_fields(self, "loss")
        given = {name for name in ("label_smoothing", "label_smoothing_range", "mixup_alpha", "mixup_coef")
                 if getattr(self, name) is not None}
        allowed = {"hard": set(), "smoothing": {"label_smoothing", "label_smoothing_range"},
                   "mixup": {"mixup_alpha", "mixup_coef"}}[self.family]
        if given - allowed:
            name = sorted(given - allowed)[0]
            raise SpecError("loss", name, f"does not belong to the {self.family} family")
        if self.family != "hard" and len(given) != 1:
            choices = " or ".join(sorted(allowed))
            raise SpecError("loss", "family", f"{self.family} needs exactly one of {choices}")
        if self.label_smoothing_range is not None:
            lo_hi = self.label_smoothing_range
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
                raise SpecError("loss", "label_smoothing_range", f"must be [LO, HI] with LO <= HI, got {lo_hi}")


OPTIMIZERS = ("sgd", "momentum", "fedprox")
MODES = ("train", "eval")
DTYPE_NAMES = ("float32", "float64")


@dataclass(frozen=True)
class TrainingSpec:
    """The client's local training: B samples per step, m steps, learning rate eta,
    the optimiser (sgd, momentum, fedprox), weight decay, and the model mode
    (``train`` or ``eval``, which matters for batch norm)."""

    batch_size: int = fact(1, Interval(int, 1, MAX_BATCH))
    steps: int = fact(1, Interval(int, 1, MAX_STEPS))
    lr: float = fact(0.01, POSITIVE)
    optimizer: str = fact("sgd", OneOf(OPTIMIZERS))
    momentum: float = fact(0.0, FRACTION)
    prox_mu: float = fact(0.0, NONNEGATIVE)
    weight_decay: float = fact(0.0, NONNEGATIVE)
    model_mode: str = fact("train", OneOf(MODES))
    dtype: str = fact("float32", OneOf(DTYPE_NAMES))

    def __post_init__(self) -> None:
        check_fields(self, "training")
        if self.batch_size * self.steps > MAX_SAMPLES:
            raise SpecError("training", "steps", f"times batch_size is {self.batch_size * self.steps}, over "
                            f"gitool's bound of {MAX_SAMPLES} samples per round")
        if self.optimizer != "momentum" and self.momentum != 0:
            raise SpecError("training", "momentum", f"must be 0 unless the optimizer is momentum "
                            f"(it is {self.optimizer})")
        if self.optimizer != "fedprox" and self.prox_mu != 0:
            raise SpecError("training", "prox_mu", f"must be 0 unless the optimizer is fedprox "
                            f"(it is {self.optimizer})")

    @property
    def num_samples(self) -> int:
        return self.batch_size * self.steps


@dataclass(frozen=True)
class DefenceSpec:
    """Defences the client applied: DP-SGD (per-sample clipping to ``dp_clip`` then
    Gaussian noise of std ``dp_noise * dp_clip``) and top-k pruning (the smallest
    ``prune`` fraction of each tensor's entries set to zero)."""

    dp_clip: float | None = fact(None, Optional_(POSITIVE))
    dp_noise: float | None = fact(None, Optional_(NONNEGATIVE))
    prune: float | None = fact(None, Optional_(FRACTION))

    def __post_init__(self) -> None:
        check_fields(self, "defence")
        if self.dp_noise is not None and self.dp_clip is None:
            raise SpecError("defence", "dp_noise", "needs dp_clip (DP-SGD clips before adding noise)")

    @property
    def active(self) -> bool:
        return bool(self.dp_clip) or bool(self.prune)


# The command-line option that sets each field, for messages about options.
OPTION_OF = {
    "input.shape": "--image-size", "input.mean": "--normalize", "input.std": "--normalize",
    "loss.family": "--label-smoothing / --mixup / --mixup-coef", "loss.label_smoothing": "--label-smoothing",
    "loss.label_smoothing_range": "--label-smoothing", "loss.mixup_alpha": "--mixup",
    "loss.mixup_coef": "--mixup-coef",
    "training.batch_size": "--batch-size", "training.steps": "--steps", "training.lr": "--lr",
    "training.optimizer": "--optimizer", "training.momentum": "--momentum", "training.prox_mu": "--prox-mu",
    "training.weight_decay": "--weight-decay", "training.model_mode": "--mode", "training.dtype": "--dtype",
    "model.output": "--model-output",
    "defence.dp_clip": "--dp-clip", "defence.dp_noise": "--dp-noise", "defence.prune": "--prune",
}


def as_option_error(error: SpecError, error_type: type[Exception]) -> Exception:
    """``error`` in the words of the command line: "--batch-size must be ..."."""
    return error_type(f"{OPTION_OF.get(error.key, error.key)} {error.message}")


@contextlib.contextmanager
def option_errors():
    """Turn a spec's refusal into a usage error naming the option that set the field."""
    from gitool.errors import UsageError

    try:
        yield
    except SpecError as exc:
        raise as_option_error(exc, UsageError) from None


# ----------------------------------------------------------------------- values read from files


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
