"""The model zoo: the architectures the gradient-inversion papers attack.

Every zoo model has the same shape: a feature extractor followed by one linear
classifier, ``forward(x) = classifier(features(x).flatten(1))``. The classifier's input
is the "last-layer feature" x of methods.md section 0, and label- and feature-recovery
attacks read it through :func:`forward_with_features`.

A model is described by a :class:`ModelSpec` (a name plus everything needed to rebuild
it), so an update file can record exactly which network produced its gradient. The
registry :data:`MODELS` maps a name to a builder; adding a model is one builder function
plus one line in the registry. Model-specific settings arrive as raw ``KEY=VALUE``
strings (``--model-opt``); each builder declares the keys it understands, with their
defaults, through :func:`model_options`.

A name of the form ``package.module:factory`` builds a user's own model instead; see
:func:`build_user_model`.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from gitool.errors import GitoolError, UsageError
from gitool.specs import OutputSelector, check_fields, constraint_of, fact

ACTIVATIONS = ("relu", "leakyrelu", "sigmoid", "tanh")

# Options every zoo model understands, whatever its architecture.
COMMON_OPTIONS = {"leaky_slope": "0.2"}

_OPTION_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")


# --------------------------------------------------------------------------------------
# The specification of a model
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a network: architecture name, shape and options.

    ``name`` is a registry name (see :data:`MODELS`) or ``package.module:factory`` for a
    user model. ``activation`` None means the model's own default. ``options`` holds the
    raw ``--model-opt KEY=VALUE`` strings; each builder parses the ones it knows.
    """

    name: str
    num_classes: int = 10
    input_shape: tuple[int, int, int] = (3, 32, 32)
    activation: str | None = None
    last_bias: bool = True
    options: dict[str, str] = field(default_factory=dict)
    # Which returned value is the logits when forward() returns a tuple, list or dict
    # (published models often return (logits, features)); None: forward returns the logits.
    output: int | str | None = fact(None, OutputSelector())
    # Read from a file (from_dict): a user factory it names is not trusted (see check_trusted).
    from_file: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # A shape read back from JSON arrives as a list; keep the declared tuple type.
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        object.__setattr__(self, "options", dict(self.options))
        check_fields(self, "model")

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON types (lists, not tuples). ``output`` is written only
        when set, so the files of models that return their logits stay as they were."""
        document = {
            "name": self.name,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "activation": self.activation,
            "last_bias": self.last_bias,
            "options": dict(self.options),
        }
        if self.output is not None:
            document["output"] = self.output
        return document

    @classmethod
    def from_dict(cls, data: Any) -> ModelSpec:
        """Rebuild a spec written by :meth:`to_dict`; a malformed dict is a GitoolError."""
        if not isinstance(data, dict):
            raise GitoolError(f"model spec must be a JSON object, got {type(data).__name__}")
        unknown = sorted(str(key) for key in set(data) - _SPEC_FIELDS)
        if unknown:
            raise GitoolError(f"model spec has unknown field(s): {', '.join(unknown)}")
        if "name" not in data:
            raise GitoolError("model spec has no 'name'")
        return cls(
            name=_expect(data, "name", str),
            num_classes=_expect(data, "num_classes", int, default=10),
            input_shape=_expect_shape(data.get("input_shape", [3, 32, 32])),
            activation=_expect(data, "activation", str, default=None, nullable=True),
            last_bias=_expect(data, "last_bias", bool, default=True),
            options=_expect_options(data.get("options", {})),
            output=_expect_output(data.get("output")),
            from_file=True,
        )


_SPEC_FIELDS = {"name", "num_classes", "input_shape", "activation", "last_bias", "options", "output"}


def _expect_output(value: Any) -> int | str | None:
    """An output selector read from JSON, checked by its declared constraint."""
    wrong = constraint_of(ModelSpec, "output").problem(value)
    if wrong:
        raise GitoolError(f"model spec field 'output' {wrong}")
    return value


def parse_output_selector(text: str | None) -> int | str | None:
    """``--model-output`` text: digits are an index into a returned tuple, anything else
    a dict key (checked when the spec is made)."""
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isdigit() and len(text) <= 6 else text


def _expect(data: dict, key: str, kind: type, default: Any = None, nullable: bool = False) -> Any:
    """``data[key]`` checked to be of ``kind``; ``default`` when absent (bool is no int)."""
    if key not in data:
        return default
    value = data[key]
    if value is None and nullable:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise GitoolError(f"model spec field '{key}' must be {kind.__name__}, got {_short_repr(value)}")
    return value


def _expect_shape(value: Any) -> tuple[int, int, int]:
    """An input shape read from JSON: three integers."""
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise GitoolError(f"model spec field 'input_shape' must be three integers, got {_short_repr(value)}")
    return (value[0], value[1], value[2])


def _expect_options(value: Any) -> dict[str, str]:
    """Model options read from JSON: a string-to-string mapping."""
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise GitoolError(f"model spec field 'options' must map strings to strings, got {_short_repr(value)}")
    if len(value) > 64 or any(len(k) > 64 or len(v) > 1000 for k, v in value.items()):
        raise GitoolError("model spec field 'options' is too long (at most 64 options, values of 1000 characters)")
    return dict(value)


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------------------
# Parsing command-line text
# --------------------------------------------------------------------------------------


def parse_model_options(pairs: list[str]) -> dict[str, str]:
    """Turn ``--model-opt KEY=VALUE`` strings into a dict.

    Each string is exactly one pair, split at its first ``=``: values may themselves
    contain commas (``channels=77,22,3,3``) or further ``=`` signs.
    """
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not _OPTION_KEY.match(key):
            raise UsageError(f"model option {pair!r} is not KEY=VALUE (for example widths=256,128)")
        if key in options:
            raise UsageError(f"model option '{key}' is given twice")
        options[key] = value.strip()
    return options


def parse_image_shape(text: str, default_channels: int = 3) -> tuple[int, int, int]:
    """Read an image shape: ``"32"`` is a square with default channels, ``"3x64x64"`` is C x H x W."""
    parts = text.strip().lower().split("x")
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        numbers = []
    if len(numbers) == 1:
        numbers = [default_channels, numbers[0], numbers[0]]
    if len(numbers) != 3 or min(numbers) < 1:
        raise UsageError(f"image shape {text!r} must be SIZE or CxHxW with positive integers (e.g. 32 or 1x28x28)")
    return (numbers[0], numbers[1], numbers[2])


# --------------------------------------------------------------------------------------
# Reading one model option
# --------------------------------------------------------------------------------------


def model_options(**defaults: str) -> Callable[[Callable], Callable]:
    """Declare the ``--model-opt`` keys a builder understands, with their default values."""

    def declare(builder: Callable) -> Callable:
        builder.options = {**defaults, **COMMON_OPTIONS}
        return builder

    return declare


def _option(spec: ModelSpec, key: str) -> str:
    """The raw text of option ``key``: the user's value or the builder's default."""
    return spec.options.get(key, MODELS[spec.name].options[key])


def _int_list(spec: ModelSpec, key: str) -> list[int]:
    """A comma-separated list of positive integers ("" is the empty list)."""
    text = _option(spec, key)
    items = [item.strip() for item in text.split(",")] if text.strip() else []
    if not all(item.isdigit() and int(item) >= 1 for item in items):
        raise UsageError(f"model option {key}={text!r}: expected comma-separated positive integers")
    return [int(item) for item in items]


def _bool(spec: ModelSpec, key: str) -> bool:
    """A yes/no option."""
    text = _option(spec, key).lower()
    if text in _TRUE_WORDS:
        return True
    if text in _FALSE_WORDS:
        return False
    raise UsageError(f"model option {key}={text!r}: expected true or false")


def _positive_int(spec: ModelSpec, key: str) -> int:
    """A single positive integer."""
    values = _int_list(spec, key)
    if len(values) != 1:
        raise UsageError(f"model option {key}={_option(spec, key)!r}: expected one positive integer")
    return values[0]


def _fraction(spec: ModelSpec, key: str) -> float:
    text = _option(spec, key)
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value < 1:
        raise UsageError(f"model option {key} must be a number in [0, 1), got {text!r}")
    return value


def _leaky_slope(spec: ModelSpec) -> float:
    """The negative slope used whenever the activation is leakyrelu."""
    text = _option(spec, "leaky_slope")
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"model option leaky_slope={text!r}: expected a number") from None


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def make_activation(name: str, leaky_slope: float = 0.2) -> nn.Module:
    """A fresh activation module (one instance per layer, so hooks can tell them apart)."""
    if name == "relu":
        return nn.ReLU()
    if name == "leakyrelu":
        return nn.LeakyReLU(negative_slope=leaky_slope)
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "tanh":
        return nn.Tanh()
    raise UsageError(f"unknown activation '{name}'; choose one of {', '.join(ACTIVATIONS)}")


def _activation_maker(spec: ModelSpec, default: str) -> Callable[[], nn.Module]:
    """A function returning a new activation module as the spec (or the model default) says."""
    name = spec.activation or default
    slope = _leaky_slope(spec)
    return lambda: make_activation(name, slope)


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial size after a convolution (PyTorch's floor rule)."""
    return (size + 2 * padding - kernel) // stride + 1


class FeatureClassifier(nn.Module):
    """A feature extractor followed by one linear classifier: the shape of every zoo model.

    ``classifier`` is registered last, so it is also the last ``nn.Linear`` in module order.
    """

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int, bias: bool) -> None:
        super().__init__()
        self.features = features
        self.classifier = nn.Linear(feature_dim, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _conv_stack(
    spec: ModelSpec,
    channels: list[int],
    kernels: list[int],
    strides: list[int],
    paddings: list[int],
    default_activation: str,
    bias: bool,
) -> FeatureClassifier:
    """Plain convolutions, each followed by the activation, then the classifier."""
    activation = _activation_maker(spec, default_activation)
    in_channels, height, width = spec.input_shape
    layers: list[nn.Module] = []
    for out_channels, kernel, stride, padding in zip(channels, kernels, strides, paddings):
        layers += [nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=bias), activation()]
        in_channels = out_channels
        height = conv_output_size(height, kernel, stride, padding)
        width = conv_output_size(width, kernel, stride, padding)
        if height < 1 or width < 1:
            raise UsageError(f"input shape {spec.input_shape} is too small for model '{spec.name}'")
    feature_dim = in_channels * height * width
    return FeatureClassifier(nn.Sequential(*layers), feature_dim, spec.num_classes, spec.last_bias)


def _fully_connected(spec: ModelSpec, widths: list[int], hidden_bias: bool) -> FeatureClassifier:
    """Flatten, then Linear + activation for each hidden width, then the classifier."""
    activation = _activation_maker(spec, "relu")
    in_features = spec.input_shape[0] * spec.input_shape[1] * spec.input_shape[2]
    layers: list[nn.Module] = [nn.Flatten()]
    for width in widths:
        layers += [nn.Linear(in_features, width, bias=hidden_bias), activation()]
        in_features = width
    return FeatureClassifier(nn.Sequential(*layers), in_features, spec.num_classes, spec.last_bias)


# --------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------


@model_options(widths="4096,1024,256", hidden_bias="true")
def build_fcn4(spec: ModelSpec) -> nn.Module:
    """FCN-4 of Wang et al.: three hidden Linear+act layers and a classifier (default relu).

    The paper's network has no biases at all: ``hidden_bias=false`` with ``last_bias``
    off (``--no-bias``).
    """
    widths = _int_list(spec, "widths")
    if len(widths) != 3:
        raise UsageError(f"fcn4 needs exactly 3 widths, got widths={_option(spec, 'widths')!r}")
    return _fully_connected(spec, widths, _bool(spec, "hidden_bias"))


@model_options(widths="256,128", hidden_bias="true")
def build_mlp(spec: ModelSpec) -> nn.Module:
    """Multi-layer perceptron with any number of hidden layers (default relu; widths= for none)."""
    return _fully_connected(spec, _int_list(spec, "widths"), _bool(spec, "hidden_bias"))


@model_options()
def build_lenet(spec: ModelSpec) -> nn.Module:
    """LeNet of DLG/iDLG: three 5x5 convs with 12 filters, strides 2,2,1 (default sigmoid)."""
    return _conv_stack(
        spec,
        channels=[12, 12, 12],
        kernels=[5, 5, 5],
        strides=[2, 2, 1],
        paddings=[2, 2, 2],
        default_activation="sigmoid",
        bias=True,
    )


@model_options(channels="12,16,12,3", strides="2,2,1,1")
def build_rconv_lenet(spec: ModelSpec) -> nn.Module:
    """LeNet-like net of the R-CONV experiments: 5x5 convs, padding 2 (default leakyrelu 0.2).

    The defaults give 3->12 (stride 2), 12->16 (s2), 16->12 (s1), 12->3 (s1) and an FC
    layer 192 -> K for 32x32 inputs, all with biases (methods.md section 2).
    """
    channels = _int_list(spec, "channels")
    strides = _int_list(spec, "strides")
    if not channels or len(strides) != len(channels):
        raise UsageError(
            f"rconv-lenet needs one stride per conv layer: channels={_option(spec, 'channels')!r}, "
            f"strides={_option(spec, 'strides')!r}"
        )
    depth = len(channels)
    return _conv_stack(
        spec,
        channels=channels,
        kernels=[5] * depth,
        strides=strides,
        paddings=[2] * depth,
        default_activation="leakyrelu",
        bias=True,
    )


@model_options()
def build_cnn6(spec: ModelSpec) -> nn.Module:
    """CNN6 of R-GAP: six bias-free convs 12,36,36,36,64,128 (default leakyrelu 0.2).

    Layer list as in R-GAP's ``models/CNN6.py`` (repository JunyiZhu-AI/R-GAP):
    conv 4x4 stride 2 padding 2 to 12 channels; conv 3x3 s2 p1 to 36; two conv 3x3 s1 p1
    at 36; conv 3x3 s2 p1 to 64; conv 3x3 s1 p1 to 128; each followed by LeakyReLU(0.2);
    no conv biases. For 32x32 inputs the classifier sees 128*5*5 = 3200 features. R-GAP
    ends in a single bias-free output; here the classifier has K outputs (bias per
    ``last_bias``).
    """
    return _conv_stack(
        spec,
        channels=[12, 36, 36, 36, 64, 128],
        kernels=[4, 3, 3, 3, 3, 3],
        strides=[2, 2, 1, 1, 2, 1],
        paddings=[2, 1, 1, 1, 1, 1],
        default_activation="leakyrelu",
        bias=False,
    )


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 conv+BN, added to a (projected) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, activation: Callable[[], nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = activation()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            # The identity cannot be added when the shape changes: project it with a 1x1 conv.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.act2 = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


@model_options(width="64")
def build_resnet18(spec: ModelSpec) -> nn.Module:
    """CIFAR-style ResNet-18: 3x3 stem, no max-pool, blocks [2,2,2,2], BatchNorm (default relu).

    Stage widths are width, 2*width, 4*width, 8*width (64..512 by default); adaptive
    average pooling makes the classifier input 8*width for any input size.
    """
    width = _positive_int(spec, "width")
    activation = _activation_maker(spec, "relu")
    layers: list[nn.Module] = [
        nn.Conv2d(spec.input_shape[0], width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        activation(),
    ]
    in_channels = width
    for stage, stride in enumerate([1, 2, 2, 2]):
        out_channels = width * 2**stage
        layers.append(BasicBlock(in_channels, out_channels, stride, activation))
        layers.append(BasicBlock(out_channels, out_channels, 1, activation))
        in_channels = out_channels
    layers.append(nn.AdaptiveAvgPool2d(1))
    return FeatureClassifier(nn.Sequential(*layers), in_channels, spec.num_classes, spec.last_bias)


@model_options()
def build_lenet5(spec: ModelSpec) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998) as RLU attacks it: conv 6, pool, conv 16, pool, FC 120, FC 84 (default relu).

    Two 5x5 convolutions without padding, each followed by the activation and 2x2 max
    pooling, then fully connected layers of 120 and 84 units: the classifier reads an
    84-d bottleneck (400 -> 120 -> 84 -> K for 32x32 inputs, as in Chen & Vikalo 2024).
    """
    activation = _activation_maker(spec, "relu")
    channels, height, width = spec.input_shape
    for _ in range(2):
        height, width = conv_output_size(height, 5, 1, 0) // 2, conv_output_size(width, 5, 1, 0) // 2
    if height < 1 or width < 1:
        raise UsageError(f"input shape {spec.input_shape} is too small for lenet5 (it needs at least 12x12)")
    features = nn.Sequential(
        nn.Conv2d(channels, 6, 5), activation(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), activation(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * height * width, 120), activation(),
        nn.Linear(120, 84), activation(),
    )
    return FeatureClassifier(features, 84, spec.num_classes, spec.last_bias)


# Convolutions per stage of the VGG configurations (Simonyan & Zisserman 2015, A, B, D).
VGG_DEPTHS = {"11": (1, 1, 2, 2, 2), "13": (2, 2, 2, 2, 2), "16": (2, 2, 3, 3, 3)}


@model_options(depth="16", width="64", hidden="512", dropout="0.5")
def build_vgg(spec: ModelSpec) -> nn.Module:
    """VGG with batch norm and dropout, CIFAR style: 5 stages of 3x3 conv+BN, max-pool, FC hidden, FC hidden (default relu).

    ``depth`` 11, 13 or 16 picks the convolutions per stage; the stages have width,
    2*width, 4*width, 8*width, 8*width channels (64..512 as VGG16), each conv followed by
    batch norm and the activation, each stage by 2x2 max pooling (skipped once the map is
    1x1; adaptive average pooling to 1x1 at the end). The head is dropout, Linear to
    ``hidden``, activation, dropout, Linear to ``hidden``, activation, as the CIFAR VGG16
    RLU attacks; the classifier reads that ``hidden``-d feature.
    """
    depth = _option(spec, "depth")
    if depth not in VGG_DEPTHS:
        raise UsageError(f"vgg depth must be one of {', '.join(VGG_DEPTHS)}, got depth={depth!r}")
    width, hidden = _positive_int(spec, "width"), _positive_int(spec, "hidden")
    dropout = _fraction(spec, "dropout")
    activation = _activation_maker(spec, "relu")
    in_channels, size = spec.input_shape[0], min(spec.input_shape[1:])
    layers: list[nn.Module] = []
    for stage, convs in enumerate(VGG_DEPTHS[depth]):
        out_channels = width * min(2**stage, 8)
        for _ in range(convs):
            layers += [nn.Conv2d(in_channels, out_channels, 3, 1, 1), nn.BatchNorm2d(out_channels), activation()]
            in_channels = out_channels
        if size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Dropout(dropout), nn.Linear(in_channels, hidden), activation(),
               nn.Dropout(dropout), nn.Linear(hidden, hidden), activation()]
    return FeatureClassifier(nn.Sequential(*layers), hidden, spec.num_classes, spec.last_bias)


MODELS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "fcn4": build_fcn4,
    "mlp": build_mlp,
    "lenet": build_lenet,
    "rconv-lenet": build_rconv_lenet,
    "cnn6": build_cnn6,
    "resnet18": build_resnet18,
    "lenet5": build_lenet5,
    "vgg": build_vgg,
}


class PaperDefaults(NamedTuple):
    """How the paper a zoo model comes from sets it up: the initialisation (uniform:
    every parameter U(-0.5, 0.5) as DLG's code; default: PyTorch's), whether the
    classifier has a bias, model options, the dtype of its experiments and the source.
    The command line uses these unless told otherwise; the library's ModelSpec stays
    explicit."""

    init: str
    last_bias: bool
    options: dict[str, str]
    dtype: str
    paper: str


PAPER_DEFAULTS: dict[str, PaperDefaults] = {
    "fcn4": PaperDefaults("default", False, {"hidden_bias": "false"}, "float32",
                          "Wang, Liang, He (ICLR 2024): FCN-4 with PyTorch's init and no biases at all"),
    "mlp": PaperDefaults("default", True, {}, "float32", "a plain MLP (no paper): PyTorch's init"),
    "lenet": PaperDefaults("uniform", True, {}, "float32", "DLG / iDLG: LeNet, weights U(-0.5, 0.5)"),
    "rconv-lenet": PaperDefaults("uniform", True, {}, "float32",
                                 "R-CONV (Eltaras et al.): DLG's LeNet set-up, weights U(-0.5, 0.5)"),
    "cnn6": PaperDefaults("uniform", True, {}, "float32", "R-GAP's CNN6 as R-CONV attacks it, weights U(-0.5, 0.5)"),
    "resnet18": PaperDefaults("default", True, {}, "float32",
                              "Inverting Gradients (Geiping et al. 2020): ResNet-18 with PyTorch's init"),
    "lenet5": PaperDefaults("default", True, {}, "float32",
                            "RLU (Chen & Vikalo, ICML 2024) on SVHN: LeNet-5 with PyTorch's init"),
    "vgg": PaperDefaults("default", True, {}, "float32",
                         "RLU (Chen & Vikalo, ICML 2024) on CIFAR: VGG16 with batch norm and dropout, PyTorch's init"),
}


# --------------------------------------------------------------------------------------
# Building a model from a spec
# --------------------------------------------------------------------------------------


def is_user_model(name: str) -> bool:
    """True for ``package.module:factory`` names, which refer to a user's own code."""
    return ":" in name


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the network a spec describes, in float32 with PyTorch's default initialisation."""
    _check_spec(spec)
    if is_user_model(spec.name):
        model = build_user_model(spec)
    else:
        model = MODELS[spec.name](spec)
    return model.float()


class TensorShape(NamedTuple):
    shape: tuple[int, ...]
    floating: bool


def expected_tensors(spec: ModelSpec) -> tuple[dict[str, TensorShape], dict[str, TensorShape]]:
    """The shapes of the model's ``state_dict()`` entries and of its trainable
    parameters, without allocating them: the model is built on torch's meta device, so
    a file that claims a billion classes costs nothing before it is refused."""
    key = json.dumps(spec.to_dict(), sort_keys=True)
    if key not in _EXPECTED:
        try:
            with torch.device("meta"):
                model = build_model(spec)
        except GitoolError:
            raise
        except Exception:  # a user factory that cannot build on the meta device: build it for real
            model = build_model(spec)
        state = {n: TensorShape(tuple(t.shape), t.is_floating_point()) for n, t in model.state_dict().items()}
        params = {n: TensorShape(tuple(p.shape), True) for n, p in model.named_parameters()}
        _EXPECTED[key] = (state, params)
        names = {id(p): n for n, p in model.named_parameters()}
        try:
            layer = last_linear(model)
            _CLASSIFIER[key] = (names[id(layer.weight)], names.get(id(layer.bias)) if layer.bias is not None else None)
        except GitoolError:
            pass  # no classifier: the label methods will say so when they ask
    return _EXPECTED[key]


def classifier_names(spec: ModelSpec) -> tuple[str, str | None]:
    """The parameter names (weight, bias or None) of the model's classifier, found once
    per spec on the meta device."""
    expected_tensors(spec)
    key = json.dumps(spec.to_dict(), sort_keys=True)
    if key not in _CLASSIFIER:
        last_linear(nn.Module())  # raises the one-line "no nn.Linear" error
    return _CLASSIFIER[key]


_EXPECTED: dict[str, tuple[dict[str, TensorShape], dict[str, TensorShape]]] = {}
_CLASSIFIER: dict[str, tuple[str, str | None]] = {}


def cached_model(spec: ModelSpec, dtype: torch.dtype, device: str | torch.device) -> nn.Module:
    """One built model per (spec, dtype, device) in a process: a command over many
    updates of one model builds it once and loads each update's weights into it.
    The caller loads the state; gradients, modes and requires_grad are reset here."""
    key = (json.dumps(spec.to_dict(), sort_keys=True), str(dtype), str(device))
    model = _MODELS.get(key)
    if model is None:
        model = build_model(spec).to(dtype=dtype)  # cast before loading: float64 weights must not round
        _MODELS.clear()  # keep one: a folder of updates shares one model, and memory stays bounded
        _MODELS[key] = model
    for parameter in model.parameters():
        parameter.grad = None
        parameter.requires_grad_(True)
    return model


_MODELS: dict[tuple, nn.Module] = {}


def _check_spec(spec: ModelSpec) -> None:
    """Reject specs no builder can honour, with the valid choices in the message."""
    if not is_user_model(spec.name) and spec.name not in MODELS:
        raise UsageError(
            f"unknown model {spec.name[:80]!r}; choose one of {', '.join(MODELS)} or package.module:factory"
        )
    from gitool.specs import MAX_CLASSES, shape_problem

    if (isinstance(spec.num_classes, bool) or not isinstance(spec.num_classes, int)
            or not 2 <= spec.num_classes <= MAX_CLASSES):
        raise UsageError(f"number of classes must be an integer in [2, {MAX_CLASSES}], got {spec.num_classes!r}")
    wrong = shape_problem(spec.input_shape)
    if wrong:
        raise UsageError(f"input shape {wrong}")
    if spec.activation is not None and spec.activation not in ACTIVATIONS:
        raise UsageError(f"unknown activation '{spec.activation}'; choose one of {', '.join(ACTIVATIONS)}")
    if spec.output is not None and not is_user_model(spec.name):
        raise UsageError(f"model '{spec.name}' returns its logits: --model-output is for user models whose forward "
                         "returns several values")
    if not is_user_model(spec.name):
        valid = MODELS[spec.name].options
        unknown = sorted(set(spec.options) - set(valid))
        if unknown:
            raise UsageError(
                f"model '{spec.name}' has no option {', '.join(unknown)}; "
                f"valid options: {', '.join(sorted(valid))}"
            )


# --------------------------------------------------------------------------------------
# The trust boundary: user code runs only when the user names it
# --------------------------------------------------------------------------------------

# Factories the user named on the command line (``--model pkg.mod:factory``) or in code.
_TRUSTED_FACTORIES: set[str] = set()


def trust_factory(name: str) -> None:
    """Allow the user factory ``name`` (``package.module:factory``) to be imported and
    called, also when a file names it. The CLI calls this for ``--model``; nothing
    read from a file ever does."""
    if is_user_model(name):
        _TRUSTED_FACTORIES.add(name)


class UntrustedFactory(UsageError):
    """A file names a user model factory (``factory``) that the command line did not name."""

    def __init__(self, message: str, factory: str) -> None:
        super().__init__(message)
        self.factory = factory


def check_trusted(spec: ModelSpec, where: str) -> None:
    """Refuse a spec read from a file (``where``) that names a user factory the user did
    not name: importing it would run code on the file's word."""
    if is_user_model(spec.name) and spec.name not in _TRUSTED_FACTORIES:
        raise UntrustedFactory(f"{where} names the model factory {spec.name[:80]!r}, and gitool never imports code "
                               f"because a file says so; if you trust that module, pass --model {spec.name[:80]}",
                               spec.name[:80])


def build_user_model(spec: ModelSpec) -> nn.Module:
    """Build a model from a user's factory named ``package.module:factory``.

    Importing the module executes its code, exactly as ``import`` would: the user names
    the module explicitly, and gitool imports nothing else. The current directory is
    searched first (as ``python -m`` does) so a ``mymodels.py`` next to the data works.

    The factory receives, among ``num_classes``, ``input_shape``, ``activation`` (only
    when given), ``bias`` (= ``last_bias``) and the ``--model-opt`` options (as strings),
    only the keyword arguments its signature accepts. An option it does not accept is a
    usage error rather than silently ignored.
    """
    offered: dict[str, Any] = {
        "num_classes": spec.num_classes,
        "input_shape": tuple(spec.input_shape),
        "bias": spec.last_bias,
    }
    if spec.activation is not None:
        offered["activation"] = spec.activation
    clashing = sorted(set(spec.options) & (set(offered) | {"activation"}))
    if clashing:
        raise UsageError(
            f"model option(s) {', '.join(clashing)} clash with gitool's own arguments; "
            "use --classes, --image-shape, --activation or --no-bias instead"
        )
    if spec.from_file and spec.name not in _TRUSTED_FACTORIES:
        check_trusted(spec, "a file")
    factory = _import_factory(spec.name)
    accepted = _accepted_keywords(factory)
    if accepted is not None:
        rejected = sorted(set(spec.options) - accepted)
        if rejected:
            raise UsageError(
                f"factory {spec.name} does not accept option(s) {', '.join(rejected)}; "
                f"its keyword arguments: {', '.join(sorted(accepted)) or 'none'}"
            )
        offered = {k: v for k, v in offered.items() if k in accepted}
    try:
        model = factory(**offered, **spec.options)
    except Exception as error:  # the user's code may raise anything; report it in one line
        raise GitoolError(f"model factory {spec.name} failed: {type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise GitoolError(f"model factory {spec.name} returned {type(model).__name__}, not a torch.nn.Module")
    # Every caller of model(x) gets the logits, whatever forward() returns: the hook's
    # return value replaces the module's output. The state dict keeps the user's names.
    model.register_forward_hook(_logits_of(spec))
    from gitool.model_graph import classifier_name

    model._gitool_classifier = classifier_name(model, spec.output)  # None: last_linear's module order decides
    return model


def check_logits(spec: ModelSpec, model: nn.Module | None = None) -> None:
    """Run the model once on two zero inputs of the spec's shape and check that it gives
    logits of shape 2 x K (through the output selector): a model that returns something
    else, or does not fit the input shape, is refused here in one line, before any file
    is written or read."""
    model = build_model(spec) if model is None else model
    probe = torch.zeros(2, *spec.input_shape, dtype=next(model.parameters(), torch.zeros(())).dtype)
    was_training = model.training
    model.eval()  # batch norm in train mode needs no batch statistics for a shape check
    try:
        with torch.no_grad():
            logits = model(probe)
    except GitoolError:
        raise
    except Exception as exc:  # the user's forward may raise anything
        shape = "x".join(map(str, spec.input_shape))
        raise GitoolError(f"model {spec.name}: forward fails on inputs of shape 2x{shape} ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:160]}); does --image-size fit the model?") from None
    finally:
        model.train(was_training)
    if tuple(logits.shape) != (2, spec.num_classes):
        raise GitoolError(f"model {spec.name}: forward gives {describe_output(logits)} for 2 inputs, not logits of "
                          f"2 x K = 2 x {spec.num_classes}; check --num-classes"
                          + (" and --model-output" if spec.output is not None else ""))


def _logits_of(spec: ModelSpec):
    """A forward hook that hands back the logits among the values forward() returned."""

    def select(module: nn.Module, inputs: Any, output: Any) -> torch.Tensor:
        return select_output(output, spec.output, spec.name)

    return select


def select_output(output: Any, selector: int | str | None, name: str, leaf: type = torch.Tensor) -> Any:
    """The logits among what a forward() returned: ``output`` itself when it is one
    ``leaf`` (a tensor; an fx node when reading a graph), else its element ``selector``
    (an index into a tuple or list, a key of a dict or a named tuple's field). Anything
    else is one line saying what forward returned and how to name the logits."""
    what = f"model {name}: forward returns {describe_output(output, leaf)}"
    if selector is None:
        if isinstance(output, leaf):
            return output
        if isinstance(output, (tuple, list, dict)):
            example = "INDEX" if isinstance(output, (tuple, list)) else "KEY"
            raise GitoolError(f"{what}; pass --model-output {example} to gitool import (or capture, train) to name "
                              "the logits")
        raise GitoolError(f"{what}, not the logits tensor")
    if isinstance(output, leaf):
        raise GitoolError(f"{what}, but --model-output {selector} is recorded: drop --model-output")
    if isinstance(output, (tuple, list)):
        if isinstance(selector, str) and selector in getattr(output, "_fields", ()):
            value = getattr(output, selector)
        elif type(selector) is int and selector < len(output):
            value = output[selector]
        else:
            raise GitoolError(f"{what}: --model-output {selector} is not one of its indices 0 to {len(output) - 1}")
    elif isinstance(output, dict):
        keys = [key for key in (selector, str(selector)) if key in output]
        if not keys:
            listed = ", ".join(str(key) for key in list(output)[:8])
            raise GitoolError(f"{what}: --model-output {selector} is not one of its keys ({listed})")
        value = output[keys[0]]
    else:
        raise GitoolError(f"{what}, not the logits tensor")
    if not isinstance(value, leaf):
        raise GitoolError(f"{what}: its element {selector} is {describe_output(value, leaf)}, not the logits tensor")
    return value


def describe_output(output: Any, leaf: type = torch.Tensor) -> str:
    """What forward() returned, in a few words: "a tuple of 2 (tensor 2x10, tensor 2x84)"."""

    def one(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return "tensor " + "x".join(map(str, value.shape))
        return "tensor" if isinstance(value, leaf) else type(value).__name__

    if isinstance(output, leaf):
        return f"one {one(output)}" if isinstance(output, torch.Tensor) else "one tensor"
    if isinstance(output, (tuple, list)):
        kind = "a list" if isinstance(output, list) else "a tuple"
        items = ", ".join(one(value) for value in list(output)[:6]) + (", ..." if len(output) > 6 else "")
        return f"{kind} of {len(output)} ({items})"
    if isinstance(output, dict):
        items = ", ".join(f"{key}: {one(value)}" for key, value in list(output.items())[:6])
        return f"a dict ({items}{', ...' if len(output) > 6 else ''})"
    return f"a {type(output).__name__}"


def _import_factory(name: str) -> Callable[..., Any]:
    """Import ``package.module`` and return its callable attribute ``factory``."""
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"user model '{name}' must look like package.module:factory")
    with _current_directory_on_path(module_name):
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # ImportError, or whatever the module's own code raised
            raise UsageError(f"cannot import module '{module_name}' for model {name}: {error}") from error
    factory = getattr(module, attribute, None)
    if factory is None:
        raise UsageError(f"module '{module_name}' has no attribute '{attribute}'")
    if not callable(factory):
        raise UsageError(f"'{name}' is not callable")
    return factory


@contextlib.contextmanager
def _current_directory_on_path(module_name: str):
    """Let ``import`` find the named module in the current directory, for the duration of
    the block, and only when that module (``NAME.py`` or a package ``NAME/``) is there:
    nothing else is imported from the working directory."""
    cwd = os.getcwd()
    top = module_name.split(".")[0]
    here = os.path.isfile(os.path.join(cwd, f"{top}.py")) or os.path.isdir(os.path.join(cwd, top))
    added = here and cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _accepted_keywords(factory: Callable[..., Any]) -> set[str] | None:
    """Names the factory takes as keywords, or None when it takes ``**kwargs`` (anything)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in parameters if p.kind in keyword_kinds}


# --------------------------------------------------------------------------------------
# Initialisation and the last layer
# --------------------------------------------------------------------------------------


def init_parameters(model: nn.Module, init: str, generator: torch.Generator | None = None) -> None:
    """Re-initialise every parameter in place.

    ``uniform``: every parameter drawn from U(-0.5, 0.5), the untrained setting of the
    analytic-attack papers. Values are drawn on the CPU, so a seed gives the same network
    on every device.

    ``default``: PyTorch's own initialisation, re-run through each module's
    ``reset_parameters()``. That uses the global RNG; with a generator, the global RNG is
    seeded from it inside a forked RNG state, so the result is reproducible and the
    caller's global RNG is left untouched.
    """
    if init == "uniform":
        _init_uniform(model, generator)
    elif init == "default":
        _init_default(model, generator)
    else:
        raise UsageError(f"unknown initialisation '{init}'; choose uniform or default")


def _init_uniform(model: nn.Module, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            values = torch.empty(parameter.shape, dtype=parameter.dtype)
            values.uniform_(-0.5, 0.5, generator=generator)
            parameter.copy_(values)


def _init_default(model: nn.Module, generator: torch.Generator | None) -> None:
    resettable = [m for m in model.modules() if callable(getattr(m, "reset_parameters", None))]
    if generator is None:
        for module in resettable:
            module.reset_parameters()
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in resettable:
            module.reset_parameters()


DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@contextlib.contextmanager
def dropout_off(model: nn.Module):
    """Dropout layers in eval mode for the duration, the rest of the model as it is.

    The server measures what the client's model does *on average*: dropout's masks are
    the client's private randomness, while batch norm in train mode is part of the
    function the client trains (it normalises with the batch), so only dropout is
    switched off."""
    dropouts = [m for m in model.modules() if isinstance(m, DROPOUT_TYPES) and m.training]
    for module in dropouts:
        module.eval()
    try:
        yield model
    finally:
        for module in dropouts:
            module.train()


def last_linear(model: nn.Module) -> nn.Linear:
    """The classifier: the ``nn.Linear`` whose output forward() returns as the logits
    where the model's graph tells (user models, read with torch.fx when built), else the
    last ``nn.Linear`` in module order (every zoo model registers its classifier last)."""
    named = getattr(model, "_gitool_classifier", None)
    if named:
        return model.get_submodule(named)
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise GitoolError(f"model {type(model).__name__} has no nn.Linear layer to act as classifier")
    return linears[-1]


def forward_with_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the classifier's input feature, flattened to (B, d).

    The feature is captured with a forward hook on :func:`last_linear`, so this works
    for user models as well. It stays in the autograd graph, so feature-matching losses
    can differentiate through it.
    """
    captured: list[torch.Tensor] = []

    def remember_input(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        captured.append(inputs[0])

    handle = last_linear(model).register_forward_hook(remember_input)
    try:
        logits = model(x)
    finally:
        handle.remove()
    if not captured:
        raise GitoolError(f"the last nn.Linear of {type(model).__name__} was not called in forward()")
    # If the layer ran more than once, the last call is the one that produced the logits.
    return logits, captured[-1].flatten(1)


# --------------------------------------------------------------------------------------
# Documentation
# --------------------------------------------------------------------------------------


class ModelInfo(NamedTuple):
    """One row of the model list: name, one-line description, option defaults, and the
    set-up of its paper (init, classifier bias, dtype, source)."""

    name: str
    description: str
    options: dict[str, str]
    init: str = "uniform"
    last_bias: bool = True
    dtype: str = "float32"
    paper: str = ""


def describe_models() -> list[ModelInfo]:
    """Name, one-line description, option defaults and paper set-up of every zoo model."""
    rows = []
    for name, builder in MODELS.items():
        paper = PAPER_DEFAULTS[name]
        rows.append(ModelInfo(name, _first_line(builder.__doc__), {**builder.options, **paper.options}, paper.init,
                              paper.last_bias, paper.dtype, paper.paper))
    return rows


def _first_line(docstring: str | None) -> str:
    return (docstring or "").strip().splitlines()[0] if docstring else ""
