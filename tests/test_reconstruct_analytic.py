"""The analytic reconstruction adapters and the `gitool reconstruct` command.

The labels and features given to the reconstruction here are ORACLE inputs built from the
truth file: they test the reconstruction step in isolation (the attack code itself never
reads truth; `gitool labels` / `gitool features` produce these files in real use).
"""

import sys
import textwrap

import pytest
import torch

from gitool.capture import CaptureConfig
from gitool.errors import GitoolError
from gitool.files import (DefenceSpec, InputSpec, LossSpec, TrainingSpec, load_update, new_result, save_result,
                          save_update)
from gitool.metrics import psnr
from gitool.models import ModelSpec, trust_factory
from gitool.reconstruct import reconstruct


def float64_capture(capture_factory, spec, name="c", data="synthetic", batch=1, send=None, **training):
    config = CaptureConfig(input=InputSpec(shape=spec.input_shape),
                           training=TrainingSpec(dtype="float64", batch_size=batch, **training),
                           send=send, defence=DefenceSpec())
    return capture_factory(name, spec=spec, data=data, config=config)


def oracle(update, truth, features=True):
    """Test-oracle labels/features from the truth: isolates the reconstruction step."""
    labels = new_result("labels", {"labels": truth.labels}, method="test-oracle", update=update)
    feats = new_result("features", {"features": truth.features}, method="test-oracle", update=update)
    return labels, (feats if features else None)


def max_error(outcome, truth):
    return float((outcome.images.to(torch.float64) - truth.images.to(torch.float64)).abs().max())


@pytest.mark.parametrize("hidden_bias,last_bias", [("false", False), ("true", True)])
def test_fcn4_relu_with_and_without_biases_is_exact(capture_factory, hidden_bias, last_bias):
    spec = ModelSpec("fcn4", input_shape=(3, 16, 16), activation="relu", last_bias=last_bias,
                     options={"widths": "96,48,24", "hidden_bias": hidden_bias})
    update, truth = float64_capture(capture_factory, spec, data="samples")
    labels, features = oracle(update, truth)
    outcome = reconstruct(update, labels, features, "fc", {})
    assert max_error(outcome, truth) < 1e-9
    assert [layer["rank"] for layer in outcome.diagnostics["layers"]] == [1, 1, 1]


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "leakyrelu"])
def test_mlp_with_smooth_activations_uses_the_bias_ratio_when_no_features(capture_factory, activation):
    spec = ModelSpec("mlp", input_shape=(1, 12, 12), activation=activation, options={"widths": "40,20"})
    update, truth = float64_capture(capture_factory, spec)
    labels, _ = oracle(update, truth, features=False)
    outcome = reconstruct(update, labels, None, "fc", {})
    assert outcome.diagnostics["features"] == "bias ratio"
    assert max_error(outcome, truth) < 1e-9


def test_fc_method_refuses_convolutions_and_resnet_is_refused_by_name(capture_factory):
    update, truth = float64_capture(capture_factory, ModelSpec("lenet", input_shape=(3, 16, 16)))
    labels, features = oracle(update, truth)
    with pytest.raises(GitoolError, match="'features.0' is a convolution: use --method conv"):
        reconstruct(update, labels, features, "fc", {})
    spec = ModelSpec("resnet18", input_shape=(3, 16, 16), options={"width": "4"})
    update, truth = float64_capture(capture_factory, spec, name="r")
    labels, features = oracle(update, truth)
    with pytest.raises(GitoolError, match=r"^node 'features_1' \(call_module BatchNorm2d\) is a normalisation layer"):
        reconstruct(update, labels, features, "conv", {})


@pytest.mark.parametrize("activation,channels", [("leakyrelu", "12,16,12,3"), ("relu", "77,22,3,3")])
def test_rconv_lenet_is_exact(capture_factory, activation, channels):
    spec = ModelSpec("rconv-lenet", input_shape=(3, 16, 16), activation=activation, options={"channels": channels})
    update, truth = float64_capture(capture_factory, spec, data="samples")
    labels, features = oracle(update, truth)
    outcome = reconstruct(update, labels, features, "conv", {})
    assert max_error(outcome, truth) < 1e-9
    assert all(layer["gradient_residual"] < 1e-12 for layer in outcome.diagnostics["layers"])


@pytest.fixture
def user_conv_module(tmp_path, monkeypatch):
    """A user factory: two convs with chosen stride/padding and plenty of filters."""
    (tmp_path / "analytic_user_nets.py").write_text(textwrap.dedent("""
        from torch import nn

        def net(num_classes, input_shape, bias=True, stride="1", padding="0", filters="24"):
            s, p, f = int(stride), int(padding), int(filters)
            c, h, w = input_shape
            convs = nn.Sequential(nn.Conv2d(c, f, 3, s, p), nn.LeakyReLU(0.2), nn.Conv2d(f, 24, 3, 1, 1), nn.Tanh(),
                                  nn.Flatten())
            size = (h + 2 * p - 3) // s + 1
            return nn.Sequential(convs, nn.Linear(24 * size * size, num_classes, bias=bias))
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    trust_factory("analytic_user_nets:net")  # the test names it, as --model would
    yield "analytic_user_nets:net"
    sys.modules.pop("analytic_user_nets", None)


@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_user_conv_stacks_with_any_stride_and_padding(capture_factory, user_conv_module, stride, padding):
    spec = ModelSpec(user_conv_module, input_shape=(3, 9, 9),
                     options={"stride": str(stride), "padding": str(padding), "filters": "40"})
    update, truth = float64_capture(capture_factory, spec)
    labels, features = oracle(update, truth)
    outcome = reconstruct(update, labels, features, "conv", {})
    assert max_error(outcome, truth) < 1e-9


def test_one_step_fedavg_delta_is_turned_back_into_the_gradient(capture_factory):
    spec = ModelSpec("rconv-lenet", input_shape=(3, 16, 16))
    update, truth = float64_capture(capture_factory, spec, send="delta", lr=0.1, weight_decay=0.01)
    assert update.kind == "delta"
    labels, features = oracle(update, truth)
    assert max_error(reconstruct(update, labels, features, "conv", {}), truth) < 1e-9


def test_a_batch_is_separated_and_label_order_is_fixed_from_the_update(capture_factory):
    spec = ModelSpec("mlp", input_shape=(1, 10, 10), options={"widths": "64,32"})
    update, truth = float64_capture(capture_factory, spec, batch=3)
    shuffled = new_result("labels", {"labels": truth.labels[[2, 0, 1]]}, method="test-oracle", update=update)
    _, features = oracle(update, truth)
    outcome = reconstruct(update, shuffled, features, "fc", {})
    assert outcome.images.shape[0] == 3
    assert outcome.diagnostics["classifier_residual"] < 1e-12
    assert max_error(outcome, truth) < 1e-9


def test_multi_step_updates_are_refused(capture_factory):
    spec = ModelSpec("mlp", input_shape=(1, 8, 8), options={"widths": "16"})
    update, truth = float64_capture(capture_factory, spec, steps=2)
    labels, features = oracle(update, truth)
    with pytest.raises(GitoolError, match="one local step; this update has 2"):
        reconstruct(update, labels, features, "fc", {})


def test_noisy_gradient_error_grows_smoothly_with_the_noise(capture_factory):
    spec = ModelSpec("rconv-lenet", input_shape=(3, 16, 16), options={"channels": "24,16,12,3"})
    update, truth = float64_capture(capture_factory, spec, data="samples")
    labels, features = oracle(update, truth)
    clean = {name: value.clone() for name, value in update.values.items()}
    generator = torch.Generator().manual_seed(0)
    noise = {name: torch.randn(value.shape, dtype=torch.float64, generator=generator) for name, value in clean.items()}
    errors = []
    for level in (0.0, 1e-9, 1e-7, 1e-5):
        update.values = {name: clean[name] + level * float(clean[name].std()) * noise[name] for name in clean}
        outcome = reconstruct(update, labels, features, "conv", {})
        errors.append(float((outcome.images - truth.images.to(torch.float64)).norm() / truth.images.norm()))
    assert errors[0] < 1e-12
    assert errors == sorted(errors)
    assert errors[3] < 1.0  # still an answer, not noise blown up


def test_cli_reconstruct_writes_file_png_and_json(capture_factory, run_cli, tmp_path):
    spec = ModelSpec("rconv-lenet", input_shape=(3, 16, 16))
    update, truth = float64_capture(capture_factory, spec, data="samples")
    labels, features = oracle(update, truth)
    save_result(labels, tmp_path / "c.labels.safetensors")
    save_result(features, tmp_path / "c.features.safetensors")
    out = tmp_path / "c.reconstruction.safetensors"
    result = run_cli("reconstruct", update.path, "--labels", tmp_path / "c.labels.safetensors", "--features",
                     tmp_path / "c.features.safetensors", "--method", "conv", "-o", out, "--png",
                     tmp_path / "c.png", "--json")
    assert result.exit_code == 0, result.stderr
    document = result.json()
    assert [layer["layer"] for layer in document["diagnostics"]["layers"]] == [
        "features.6", "features.4", "features.2", "features.0"]
    assert (tmp_path / "c.png").stat().st_size > 100
    scored = run_cli("score", out, "--truth", truth.path, "--json").json()
    assert scored["files"][0]["psnr"] > 100
    explained = run_cli("reconstruct", update.path, "-l", tmp_path / "c.labels.safetensors", "-o", out, "--explain")
    assert explained.exit_code == 0 and "gradient eqs" in explained.stderr and "features.0" in explained.stdout


def test_cli_rank_deficient_network_stops_with_one_clear_line(capture_factory, run_cli, tmp_path):
    spec = ModelSpec("rconv-lenet", input_shape=(3, 16, 16), activation="relu", options={"channels": "4,4,4,3"})
    update, truth = float64_capture(capture_factory, spec, data="samples")
    labels, features = oracle(update, truth)
    save_result(labels, tmp_path / "l.safetensors")
    save_result(features, tmp_path / "f.safetensors")
    result = run_cli("reconstruct", update.path, "-l", tmp_path / "l.safetensors", "-f", tmp_path / "f.safetensors",
                     "-o", tmp_path / "r.safetensors")
    assert result.exit_code == 1
    assert "features." in result.stderr and "unknowns" in result.stderr and "equations" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "r.safetensors").exists()


def test_cli_without_labels_is_a_usage_error(capture_factory, run_cli, tmp_path):
    update, _ = float64_capture(capture_factory, ModelSpec("mlp", input_shape=(1, 8, 8), options={"widths": "8"}))
    result = run_cli("reconstruct", update.path, "--method", "fc", "-o", tmp_path / "r.safetensors")
    assert result.exit_code == 2 and "--labels" in result.stderr


def test_a_conv_batch_is_reconstructed_jointly(capture_factory):
    spec = ModelSpec("rconv-lenet", input_shape=(3, 16, 16))
    update, truth = float64_capture(capture_factory, spec, data="samples", batch=2)
    labels, features = oracle(update, truth)
    outcome = reconstruct(update, labels, features, "conv", {})
    assert outcome.images.shape[0] == 2
    assert max_error(outcome, truth) < 1e-9


def float32_capture(capture_factory, spec, name="c32", data="samples", smoothing=0.2):
    """What real clients send: a float32 gradient (here with label smoothing 0.2)."""
    config = CaptureConfig(input=InputSpec(shape=spec.input_shape), training=TrainingSpec(dtype="float32"),
                           loss=LossSpec(family="smoothing", label_smoothing=smoothing), defence=DefenceSpec())
    return capture_factory(name, spec=spec, data=data, config=config)


ALL_RELU = ModelSpec("rconv-lenet", input_shape=(3, 32, 32), activation="relu", options={"channels": "77,22,3,3"})


def test_float32_all_relu_update_reaches_float32_round_off(capture_factory):
    # Issue 15: the fixed 1e-9 zero rule gave residuals 5.8e-8, 0.38, 0.59, 0.48 and 7.6 dB here.
    update, truth = float32_capture(capture_factory, ALL_RELU)
    labels, _ = oracle(update, truth, features=False)
    outcome = reconstruct(update, labels, None, "conv", {})
    layers = outcome.diagnostics["layers"]
    assert all(layer["within_precision"] for layer in layers)
    assert max(layer["gradient_residual"] for layer in layers) < 1e-6  # measured 3.8e-7 (3 epsilon)
    assert layers[0]["residual_limit"] == pytest.approx(1e3 * torch.finfo(torch.float32).eps)
    assert "warnings" not in outcome.diagnostics
    assert float(psnr(outcome.images.to(torch.float64), truth.images.to(torch.float64)).min()) > 115  # 129.8


def test_a_wrong_relu_pattern_is_flagged_with_the_layer_named(capture_factory, monkeypatch):
    # The old fixed rule, with the re-solve switched off: the result must not pass silently.
    from gitool.attacks import analytic_conv
    from gitool.attacks.analytic_fc import relu_active

    monkeypatch.setattr(analytic_conv, "decide_pattern",
                        lambda name, output, slope, tol, margin=4.0: relu_active(output).to(output.dtype))
    monkeypatch.setattr(analytic_conv, "repair_pattern", lambda pattern, upstream, low, cands, solve, model, score,
                        start, limit: (pattern, start[0], start[1], 0))
    update, truth = float32_capture(capture_factory, ALL_RELU)
    labels, _ = oracle(update, truth, features=False)
    outcome = reconstruct(update, labels, None, "conv", {})
    assert outcome.diagnostics["flagged_layers"][0] == "features.4"
    warning = outcome.diagnostics["warnings"][0]
    assert warning.startswith("warning: features.4: gradient residual") and "float32 round-off" in warning
    assert warning in outcome.summary


def test_the_relu_threshold_is_re_solved_when_the_noise_floor_is_misjudged(capture_factory, monkeypatch):
    # A noise margin 50 times too large counts small activations as zero (features.0's output
    # has one at 1.6e-5 of its largest): the residual (1e-2) triggers the re-solve, which finds them.
    from gitool.attacks import analytic_conv
    from gitool.attacks.activation_pattern import decide_pattern

    monkeypatch.setattr(analytic_conv, "decide_pattern",
                        lambda name, output, slope, tol, margin=4.0: decide_pattern(name, output, slope, tol,
                                                                                    50 * margin))
    update, truth = float32_capture(capture_factory, ALL_RELU)
    labels, _ = oracle(update, truth, features=False)
    outcome = reconstruct(update, labels, None, "conv", {})
    repaired = [layer for layer in outcome.diagnostics["layers"] if "pattern" in layer]
    assert "features.0" in [layer["layer"] for layer in repaired]
    assert all(layer["pattern"]["residual_before"] > 1e-3 and layer["within_precision"] for layer in repaired)
    assert float(psnr(outcome.images.to(torch.float64), truth.images.to(torch.float64)).min()) > 115


def test_cli_prints_the_precision_warning_also_with_json(capture_factory, run_cli, tmp_path):
    spec = ModelSpec("mlp", input_shape=(1, 8, 8), options={"widths": "16"})
    update, truth = float64_capture(capture_factory, spec, name="noisy")
    # Relative noise 1e-6 on the gradient: far above what float64 round-off explains.
    generator = torch.Generator().manual_seed(0)
    update.values = {name: value * (1 + 1e-6 * torch.randn(value.shape, dtype=value.dtype, generator=generator))
                     for name, value in update.values.items()}
    save_update(update, tmp_path / "n.update.safetensors")
    update = load_update(tmp_path / "n.update.safetensors")
    labels, features = oracle(update, truth)
    save_result(labels, tmp_path / "n.labels.safetensors")
    save_result(features, tmp_path / "n.features.safetensors")
    args = ("reconstruct", tmp_path / "n.update.safetensors", "-l", tmp_path / "n.labels.safetensors", "-f",
            tmp_path / "n.features.safetensors", "--method", "fc", "-o", tmp_path / "n.rec.safetensors")
    plain = run_cli(*args)
    text = " ".join(plain.stdout.split())  # the terminal wraps long lines
    assert plain.exit_code == 0 and "warning: features." in text and "float64 round-off explains" in text
    document = run_cli(*args, "--json")
    assert document.exit_code == 0 and "float64 round-off" in " ".join(document.stderr.split())
    assert document.json()["diagnostics"]["flagged_layers"]
