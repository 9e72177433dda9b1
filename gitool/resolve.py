"""From command-line text to typed values: ranges, lists, normalisations, model specs.

The CLI declares options and calls these; they hold the parsing and the defaults that
follow the model's paper, so that the same rules serve every command (and scripts that
drive gitool from Python).
"""

from __future__ import annotations

import math
from pathlib import Path

from gitool.errors import UsageError


def parse_float_range(text: str, what: str) -> tuple[float, float]:
    """``0.1`` -> (0.1, 0.1); ``0:0.5`` -> (0.0, 0.5)."""
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        raise UsageError(f"{what}: expected a number or a range LO:HI, got {text!r}") from None
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2 and parts[0] <= parts[1]:
        return parts[0], parts[1]
    raise UsageError(f"{what}: expected a number or a range LO:HI with LO <= HI, got {text!r}")


def parse_int_list(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p != ""]
    except ValueError:
        raise UsageError(f"{what}: expected comma-separated integers, got {text!r}") from None


NORMALIZATIONS = {
    "none": ((0.0,), (1.0,)),
    "half": ((0.5,), (0.5,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def parse_normalization(text: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A named normalisation or ``MEAN,MEAN,MEAN/STD,STD,STD`` (one value or one per channel)."""
    if text in NORMALIZATIONS:
        mean, std = NORMALIZATIONS[text]
    else:
        try:
            mean_text, std_text = text.split("/")
            mean = tuple(float(v) for v in mean_text.split(","))
            std = tuple(float(v) for v in std_text.split(","))
        except ValueError:
            raise UsageError(
                f"--normalize: expected one of {', '.join(NORMALIZATIONS)} or MEAN/STD, got {text!r}") from None
    for values in (mean, std):
        if len(values) not in (1, channels):
            raise UsageError(f"--normalize needs 1 or {channels} values for mean and std")
    if not all(math.isfinite(v) for v in mean + std):
        raise UsageError("--normalize: mean and std must be finite numbers")
    if any(s <= 0 for s in std):
        raise UsageError("--normalize: std must be positive")
    return mean, std


def trust_models(names: list[str] | None) -> None:
    """The user factories named on this command line may be imported (the trust boundary)."""
    from gitool.models import is_user_model, trust_factory

    for name in names or []:
        if not is_user_model(name):
            continue
        trust_factory(name)


def resolve_model(model: str | None, num_classes: int | None, image_size: str | None, activation: str | None,
                  bias: bool | None, model_opt: list[str] | None, init: str | None, base=None,
                  output: str | None = None):
    """The model spec from the options, the initial weights if ``init`` is a checkpoint,
    and the checkpoint's metadata (its training normalisation, say; {} otherwise).

    A gitool checkpoint carries its own spec (else ``base``, a ModelSpec, is the starting
    point); options given explicitly override it. What nobody gave (``init`` and
    ``bias`` None, model options) follows the model's paper (models.PAPER_DEFAULTS).
    ``output`` is the ``--model-output`` text. A user model is run once on a probe, so
    that a forward returning no logits of K classes stops here (models.check_logits)."""
    from gitool.specs import SpecError, as_option_error

    try:
        spec, state, meta, init = _resolve_model(model, num_classes, image_size, activation, bias, model_opt, init,
                                                 base, output)
    except SpecError as exc:
        raise as_option_error(exc, UsageError) from None
    from gitool.models import check_logits, is_user_model

    if is_user_model(spec.name):
        check_logits(spec)
    return spec, state, meta, init


def _resolve_model(model, num_classes, image_size, activation, bias, model_opt, init, base, output):
    from gitool.files import load_checkpoint
    from gitool.models import ModelSpec, parse_image_shape, parse_model_options, parse_output_selector

    from gitool.models import PAPER_DEFAULTS

    if model is not None:
        trust_models([model])
    paper = PAPER_DEFAULTS.get(model or (base.name if base is not None else "lenet"))
    if init is None:  # the model's paper decides, unless a checkpoint or the user does
        init = paper.init if paper is not None else "default"
    checkpoint = None
    if init not in ("uniform", "default"):
        if not Path(init).exists():
            raise UsageError(f"--init must be uniform, default or an existing checkpoint file; {init!r} is none")
        checkpoint = load_checkpoint(init)
    base = checkpoint.model if checkpoint is not None and checkpoint.model is not None else base
    options = parse_model_options(model_opt or [])
    if base is not None and model in (None, base.name):
        spec = ModelSpec(
            name=base.name,
            num_classes=base.num_classes if num_classes is None else num_classes,
            input_shape=parse_image_shape(image_size) if image_size else tuple(base.input_shape),
            activation=activation or base.activation,
            last_bias=base.last_bias if bias is None else bias,
            options={**base.options, **options},
            output=base.output if output is None else parse_output_selector(output),
            from_file=base.from_file and model is None,
        )
    else:
        name = model or "lenet"
        paper = PAPER_DEFAULTS.get(name)
        shape = parse_image_shape(image_size) if image_size else (3, 32, 32)
        spec = ModelSpec(name=name, num_classes=10 if num_classes is None else num_classes,
                         input_shape=shape, activation=activation,
                         last_bias=bias if bias is not None else (paper.last_bias if paper else True),
                         options={**(paper.options if paper else {}), **options},
                         output=parse_output_selector(output))
    return spec, (checkpoint.state if checkpoint is not None else None), (checkpoint.meta if checkpoint else {}), init
