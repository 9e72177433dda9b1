"""Tests for the model zoo: shapes, the classifier, options, initialisation, user models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gitool.errors import GitoolError, UsageError
from gitool.models import (
    ACTIVATIONS,
    MODELS,
    ModelSpec,
    build_model,
    describe_models,
    forward_with_features,
    init_parameters,
    last_linear,
    parse_image_shape,
    parse_model_options,
)

# Small variants keep the whole file fast; the architectures are otherwise the real ones.
SMALL_OPTIONS = {
    "fcn4": {"widths": "32,16,8"},
    "mlp": {"widths": "24,12"},
    "resnet18": {"width": "4"},
    "vgg": {"width": "4", "hidden": "16"},
}

# Feature size at the default 3x32x32 input, as given in methods.md and the papers.
FEATURE_SIZE_AT_32 = {"lenet": 768, "rconv-lenet": 192, "cnn6": 3200, "lenet5": 84, "vgg": 512}


def small_spec(name: str, **changes) -> ModelSpec:
    fields = {"name": name, "num_classes": 7, "options": SMALL_OPTIONS.get(name, {})}
    fields.update(changes)
    return ModelSpec(**fields)


def tiny_factory(num_classes, input_shape, bias=True, hidden="5"):
    """A user model factory, referenced by the tests as ``test_models:tiny_factory``."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(channels * height * width, int(hidden)),
        nn.ReLU(),
        nn.Linear(int(hidden), num_classes, bias=bias),
    )


def not_a_model_factory(num_classes):
    return "not a module"


TINY = f"{__name__}:tiny_factory"


# --------------------------------------------------------------------------------------
# Every zoo model
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 20)])
def test_every_model_forwards_to_logits_of_k_classes(name, shape):
    model = build_model(small_spec(name, input_shape=shape))
    logits = model(torch.rand(2, *shape))
    assert logits.shape == (2, 7)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_classifier_is_last_linear_and_sees_the_features(name):
    model = build_model(small_spec(name))
    assert last_linear(model) is model.classifier
    x = torch.rand(3, 3, 32, 32)
    model.eval()  # BatchNorm must not update statistics between the two forward passes
    logits, features = forward_with_features(model, x)
    assert features.shape == (3, model.classifier.in_features)
    torch.testing.assert_close(logits, model.classifier(features))
    torch.testing.assert_close(logits, model(x))


@pytest.mark.parametrize("name, size", FEATURE_SIZE_AT_32.items())
def test_published_feature_sizes(name, size):
    assert build_model(ModelSpec(name)).classifier.in_features == size


def test_resnet18_default_is_the_standard_width():
    model = build_model(ModelSpec("resnet18", num_classes=10))
    assert model.classifier.in_features == 512
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 20  # 17 + 3 projections


def test_lenet5_is_lecuns_with_an_84_unit_bottleneck():
    model = build_model(ModelSpec("lenet5", num_classes=10))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [6, 16]
    assert [(m.in_features, m.out_features) for m in linears] == [(400, 120), (120, 84), (84, 10)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2


def test_vgg_depths_have_batch_norm_and_dropout():
    for depth, convs in (("11", 8), ("13", 10), ("16", 13)):
        model = build_model(ModelSpec("vgg", options={"depth": depth}))
        assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == convs
        assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == convs
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert [d.p for d in dropouts] == [0.5, 0.5]
    small = build_model(ModelSpec("vgg", input_shape=(3, 16, 16), options={"width": "4", "hidden": "16",
                                                                           "dropout": "0.2"}))
    assert small.classifier.in_features == 16 and small(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(UsageError, match="dropout"):
        build_model(ModelSpec("vgg", options={"dropout": "1.5"}))
    with pytest.raises(UsageError, match="depth"):
        build_model(ModelSpec("vgg", options={"depth": "19"}))


def test_dropout_off_only_while_measuring():
    from gitool.models import dropout_off

    model = build_model(small_spec("vgg")).train()
    x = torch.rand(4, 3, 32, 32)
    with dropout_off(model):
        first, second = model(x), model(x)  # batch norm still uses the batch, dropout is off
        assert model.features[0].training is True
    torch.testing.assert_close(first, second)
    assert all(m.training for m in model.modules())


def test_cnn6_layers_follow_r_gap():
    convs = [m for m in build_model(ModelSpec("cnn6")).modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [12, 36, 36, 36, 64, 128]
    assert [c.kernel_size[0] for c in convs] == [4, 3, 3, 3, 3, 3]
    assert [c.stride[0] for c in convs] == [2, 2, 1, 1, 2, 1]
    assert all(c.bias is None for c in convs)


def test_fcn4_paper_setting_has_no_bias_at_all():
    spec = ModelSpec("fcn4", input_shape=(3, 8, 8), last_bias=False,
                     options={"widths": "16,8,4", "hidden_bias": "false"})
    model = build_model(spec)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [16, 8, 4, 10]
    assert all(m.bias is None for m in linears)


def test_mlp_without_hidden_layers_is_a_linear_classifier():
    model = build_model(ModelSpec("mlp", input_shape=(1, 4, 4), options={"widths": ""}))
    assert [m for m in model.modules() if isinstance(m, nn.Linear)] == [model.classifier]
    assert model.classifier.in_features == 16


def test_rconv_lenet_channels_and_strides_options():
    spec = ModelSpec("rconv-lenet", options={"channels": "77,22,3,3", "strides": "2,2,1,1"})
    convs = [m for m in build_model(spec).modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [77, 22, 3, 3]
    with pytest.raises(UsageError, match="one stride per conv"):
        build_model(ModelSpec("rconv-lenet", options={"channels": "12,16", "strides": "2,2,1"}))


@pytest.mark.parametrize("name", list(MODELS))
def test_no_bias_removes_the_classifier_bias(name):
    assert build_model(small_spec(name)).classifier.bias is not None
    assert build_model(small_spec(name, last_bias=False)).classifier.bias is None


# --------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------


def activation_types(model: nn.Module) -> set[type]:
    kinds = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh)
    return {type(m) for m in model.modules() if isinstance(m, kinds)}


@pytest.mark.parametrize(
    "name, default", [("fcn4", nn.ReLU), ("lenet", nn.Sigmoid), ("rconv-lenet", nn.LeakyReLU), ("cnn6", nn.LeakyReLU)]
)
def test_default_activations(name, default):
    assert activation_types(build_model(small_spec(name))) == {default}


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_switches(activation):
    expected = {"relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[activation]
    for name in ("mlp", "lenet", "resnet18"):
        assert activation_types(build_model(small_spec(name, activation=activation))) == {expected}


def test_leaky_slope_option():
    model = build_model(small_spec("lenet", activation="leakyrelu", options={"leaky_slope": "0.05"}))
    assert {m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)} == {0.05}


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        (ModelSpec("vgg99"), "unknown model 'vgg99'"),
        (ModelSpec("lenet", activation="gelu"), "unknown activation 'gelu'"),
        (ModelSpec("lenet", options={"depth": "3"}), "valid options: leaky_slope"),
        (ModelSpec("fcn4", options={"widths": "10,10"}), "exactly 3 widths"),
        (ModelSpec("mlp", options={"widths": "10,x"}), "positive integers"),
        (ModelSpec("mlp", options={"hidden_bias": "maybe"}), "true or false"),
        (ModelSpec("lenet", num_classes=1), r"in \[2, 1000000\]"),
        (ModelSpec("lenet", input_shape=(3, 0, 32)), "positive integers"),
    ],
)
def test_impossible_specs_are_usage_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        build_model(spec)


def test_unknown_option_message_lists_the_valid_ones():
    with pytest.raises(UsageError) as error:
        build_model(ModelSpec("resnet18", options={"depth": "3"}))
    assert "leaky_slope, width" in str(error.value)


# --------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------


def test_uniform_init_bounds_and_seed():
    model = build_model(small_spec("resnet18"))
    init_parameters(model, "uniform", torch.Generator().manual_seed(3))
    values = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert values.min() >= -0.5 and values.max() <= 0.5
    assert values.std() > 0.25  # U(-0.5, 0.5) has std 0.289; PyTorch's init is far smaller
    again = build_model(small_spec("resnet18"))
    init_parameters(again, "uniform", torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_default_init_is_seeded_by_the_generator_without_touching_global_rng():
    first, second = build_model(small_spec("lenet")), build_model(small_spec("lenet"))
    state = torch.random.get_rng_state()
    init_parameters(first, "default", torch.Generator().manual_seed(5))
    init_parameters(second, "default", torch.Generator().manual_seed(5))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    assert first.classifier.weight.abs().max() < 0.5  # PyTorch's fan-in scaled bounds


def test_unknown_init_is_a_usage_error():
    with pytest.raises(UsageError, match="uniform or default"):
        init_parameters(build_model(small_spec("mlp")), "xavier")


# --------------------------------------------------------------------------------------
# User models
# --------------------------------------------------------------------------------------


def test_user_factory_gets_only_the_arguments_it_accepts():
    spec = ModelSpec(TINY, num_classes=4, input_shape=(1, 6, 6), last_bias=False,
                     activation="tanh", options={"hidden": "9"})
    model = build_model(spec)
    assert last_linear(model).out_features == 4 and last_linear(model).bias is None
    logits, features = forward_with_features(model, torch.rand(2, 1, 6, 6))
    assert logits.shape == (2, 4) and features.shape == (2, 9)


def test_user_factory_errors():
    with pytest.raises(UsageError, match="cannot import module"):
        build_model(ModelSpec("no_such_module_here:factory"))
    with pytest.raises(UsageError, match="has no attribute 'missing'"):
        build_model(ModelSpec(f"{__name__}:missing"))
    with pytest.raises(UsageError, match="does not accept option"):
        build_model(ModelSpec(TINY, options={"depth": "2"}))
    with pytest.raises(GitoolError, match="not a torch.nn.Module"):
        build_model(ModelSpec(f"{__name__}:not_a_model_factory"))


def test_last_linear_needs_a_linear_layer():
    with pytest.raises(GitoolError, match="no nn.Linear"):
        last_linear(nn.Conv2d(1, 1, 1))


# --------------------------------------------------------------------------------------
# Spec round trip and parsing
# --------------------------------------------------------------------------------------


def test_spec_round_trip_through_json():
    import json

    spec = ModelSpec("rconv-lenet", 100, (1, 28, 28), "relu", False, {"channels": "77,22,3,3", "strides": "2,2,1,1"})
    again = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and isinstance(again.input_shape, tuple)


def test_output_selector_round_trips_and_is_written_only_when_set():
    import json

    from gitool.models import parse_output_selector
    from gitool.specs import SpecError

    assert "output" not in ModelSpec("lenet").to_dict()  # files of models returning logits stay as they were
    for text, value in (("0", 0), ("12", 12), ("logits", "logits"), (" out.logits ", "out.logits"), (None, None)):
        assert parse_output_selector(text) == value
        spec = ModelSpec("mynet:make", output=value)
        assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert ModelSpec("mynet:make", output=0) != ModelSpec("mynet:make", output=1)
    with pytest.raises(SpecError, match="model.output must be an index 0 to 255 or a key"):
        ModelSpec("mynet:make", output="two words")
    with pytest.raises(UsageError, match="'lenet' returns its logits: --model-output is for user models"):
        build_model(ModelSpec("lenet", output=0))


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"num_classes": 10},
        {"name": "mynet:make", "output": -1},
        {"name": "mynet:make", "output": True},
        {"name": "mynet:make", "output": "9lives"},
        {"name": "lenet", "num_classes": "10"},
        {"name": "lenet", "num_classes": True},
        {"name": "lenet", "input_shape": [3, 32]},
        {"name": "lenet", "options": {"widths": 3}},
        {"name": "lenet", "last_bias": "yes"},
        {"name": "lenet", "colour": "red"},
    ],
)
def test_malformed_spec_dict_is_a_gitool_error(data):
    with pytest.raises(GitoolError):
        ModelSpec.from_dict(data)


def test_parse_model_options():
    assert parse_model_options(["channels=77,22,3,3", "hidden_bias=false", "x=a=b"]) == {
        "channels": "77,22,3,3",
        "hidden_bias": "false",
        "x": "a=b",
    }
    for bad in (["widths"], ["=3"], ["two words=1"]):
        with pytest.raises(UsageError):
            parse_model_options(bad)
    with pytest.raises(UsageError, match="twice"):
        parse_model_options(["a=1", "a=2"])


def test_parse_image_shape():
    assert parse_image_shape("32") == (3, 32, 32)
    assert parse_image_shape("28", default_channels=1) == (1, 28, 28)
    assert parse_image_shape("3x64x64") == (3, 64, 64)
    assert parse_image_shape("1X28x28") == (1, 28, 28)
    for bad in ("", "x", "3x64", "0", "3x-1x4", "big"):
        with pytest.raises(UsageError):
            parse_image_shape(bad)


def test_describe_models_covers_the_registry():
    rows = describe_models()
    assert [row.name for row in rows] == list(MODELS)
    fcn4 = next(row for row in rows if row.name == "fcn4")
    assert fcn4.options["widths"] == "4096,1024,256" and fcn4.description
