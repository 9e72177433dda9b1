"""`gitool labels` / `gitool features` on single-sample gradients, and their adapters."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gitool.capture import CaptureConfig
from gitool.files import (InputSpec, LossSpec, TrainingSpec, load_result, load_update, new_result, save_result,
                          save_update)
from gitool.labels import LABEL_METHODS, recover_labels
from gitool.models import ModelSpec


def spec(bias: bool = False, classes: int = 10) -> ModelSpec:
    return ModelSpec(name="lenet", num_classes=classes, input_shape=(3, 16, 16), last_bias=bias)


def config(loss: LossSpec, dtype: str = "float64", batch: int = 1, seed: int = 0) -> CaptureConfig:
    return CaptureConfig(loss=loss, training=TrainingSpec(dtype=dtype, batch_size=batch),
                         input=InputSpec(shape=(3, 16, 16)), seed=seed)


SMOOTH = LossSpec(family="smoothing", label_smoothing=0.2)
MIX = LossSpec(family="mixup", mixup_coef=0.35)


@pytest.mark.parametrize("bias", [False, True], ids=["lambda", "bias"])
@pytest.mark.parametrize("dtype,tolerance", [("float64", 1e-10), ("float32", 1e-5)])
def test_labels_then_features_recover_the_truth(capture_factory, run_cli, tmp_path, bias, dtype, tolerance):
    update, truth = capture_factory("s", spec=spec(bias), config=config(MIX, dtype))
    labels_path, features_path = tmp_path / "s.labels.safetensors", tmp_path / "s.features.safetensors"
    result = run_cli("labels", update.path, "-o", labels_path, "--json")
    assert result.exit_code == 0, result.stderr
    document = result.json()["files"][0]
    assert document["method"] == ("bias" if bias else "lambda")
    saved = load_result(labels_path, ("labels",))
    assert float((saved.require("labels").double() - truth.labels.double()).abs().max()) < tolerance
    assert saved.require("counts").tolist() == truth.counts.tolist()
    assert saved.diagnostics["family"] == "mixup" and saved.diagnostics["converged"]
    assert set(saved.diagnostics["mixup_classes"]) == set(truth.targets[0].tolist())
    assert saved.diagnostics["mixup_coef"] == pytest.approx(min(0.35, 0.65), abs=tolerance)
    assert saved.source["sha256"] == update.sha256 and saved.options["family"] == "mixup"  # the recorded family, as used
    if not bias:  # the lambda found is 1 / (p_r - y_r) of the truth
        layer = update.last_layer()
        probs = torch.softmax(layer.weight @ truth.features[0].double(), dim=0)
        row = saved.diagnostics["row"]
        expected = 1 / float(probs[row] - truth.labels[0, row].double())
        assert saved.diagnostics["lambda"] == pytest.approx(expected, rel=100 * tolerance)

    result = run_cli("features", update.path, "--labels", labels_path, "-o", features_path, "--json")
    assert result.exit_code == 0, result.stderr
    features = load_result(features_path, ("features",)).require("features").double()
    true_feature = truth.features.double()
    assert float((features - true_feature).norm() / true_feature.norm()) < tolerance
    assert result.json()["diagnostics"]["residual"] < tolerance and "warning" not in result.json()["diagnostics"]


def test_smoothing_summary_plot_and_family_choice(capture_factory, run_cli, tmp_path):
    update, truth = capture_factory("m", spec=spec(), config=config(SMOOTH, seed=4))
    plot = tmp_path / "lambda.png"
    result = run_cli("labels", update.path, "-o", tmp_path / "m.labels.safetensors", "--plot", plot,
                     "--family", "auto")  # without it the recorded family (smoothing) is the prior
    assert result.exit_code == 0, result.stderr
    assert "smoothing label, target class" in result.stdout and "eps = 0.2" in result.stdout
    assert "smoothing fits" in result.stdout  # the reason for the family choice
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = load_result(tmp_path / "m.labels.safetensors")
    assert labels.diagnostics["target"] == int(truth.targets[0, 0])
    assert labels.diagnostics["label_smoothing"] == pytest.approx(0.2, abs=1e-10)


def test_many_updates_into_a_folder_with_pso(capture_factory, run_cli, tmp_path):
    folder = tmp_path / "updates"
    folder.mkdir()
    for i, loss in enumerate((SMOOTH, LossSpec())):
        update, _ = capture_factory(f"{i:04d}", spec=spec(), config=config(loss, seed=i))
        update.path.rename(folder / update.path.name)
    out = tmp_path / "labels"
    result = run_cli("labels", folder, "--out-dir", out, "--search", "pso", "--family", "smoothing", "--json")
    assert result.exit_code == 0, result.stderr
    written = sorted(p.name for p in out.iterdir())
    assert written == ["0000.labels.safetensors", "0001.labels.safetensors"]
    assert all(row["diagnostics"]["search"] == "pso" for row in result.json()["files"])
    assert load_result(out / "0001.labels.safetensors").diagnostics["family"] == "hard"


def test_batch_update_errors_name_the_batch_methods(capture_factory, run_cli, tmp_path, monkeypatch):
    update, _ = capture_factory("b", spec=spec(), config=config(LossSpec(), batch=2))
    result = run_cli("labels", update.path, "-o", tmp_path / "b.labels.safetensors", "--method", "lambda")
    assert result.exit_code == 2
    assert "single-sample gradient" in result.stderr and "rlu" in result.stderr and "Traceback" not in result.stderr
    missing = dataclasses.replace(LABEL_METHODS["rlu"], run="gitool.no_such_module:rlu")  # a build without it
    monkeypatch.setitem(LABEL_METHODS, "rlu", missing)
    result = run_cli("labels", update.path, "-o", tmp_path / "b.labels.safetensors", "--aux", "synthetic")
    assert result.exit_code == 2
    assert "not available" in result.stderr and "idlg" in result.stderr and "rlu" in result.stderr


def test_bad_inputs_are_one_line_errors(capture_factory, run_cli, tmp_path):
    update, truth = capture_factory("z", spec=spec(), config=config(SMOOTH))
    # a truth file where an update belongs
    result = run_cli("labels", truth.path, "-o", tmp_path / "x.labels.safetensors")
    assert result.exit_code == 1 and "truth file" in result.stderr
    # a zero gradient: p = y
    zero = load_update(update.path)
    zero.values = {name: torch.zeros_like(value) for name, value in zero.values.items()}
    save_update(zero, tmp_path / "zero.update.safetensors")
    result = run_cli("labels", tmp_path / "zero.update.safetensors", "-o", tmp_path / "zero.labels.safetensors")
    assert result.exit_code == 1 and "nothing to recover" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # options
    result = run_cli("labels", update.path, "-o", tmp_path / "x.labels.safetensors", "--family", "cutmix")
    assert result.exit_code == 2 and "--family" in result.stderr
    result = run_cli("labels", update.path)
    assert result.exit_code == 2 and "--output" in result.stderr
    result = run_cli("labels", update.path, "-o", tmp_path / "x.labels.safetensors", "--search", "pso", "--plot",
                     tmp_path / "x.png")
    assert result.exit_code == 2 and "--search scan" in result.stderr
    result = run_cli("labels", update.path, "-o", tmp_path / "x.labels.safetensors", "--method", "bias")
    assert result.exit_code == 2 and "needs a classifier with a bias" in result.stderr


def test_features_refuses_labels_of_another_update_and_warns_on_a_bad_label(capture_factory, run_cli, tmp_path):
    first, _ = capture_factory("f1", spec=spec(), config=config(SMOOTH, seed=1))
    second, _ = capture_factory("f2", spec=spec(), config=config(SMOOTH, seed=2))
    labels = tmp_path / "f1.labels.safetensors"
    assert run_cli("labels", first.path, "-o", labels).exit_code == 0
    result = run_cli("features", second.path, "--labels", labels, "-o", tmp_path / "f.features.safetensors")
    assert result.exit_code == 1 and "another update" in result.stderr
    # a tampered label for the right update: the feature cannot reproduce the gradient
    wrong = torch.full((1, 10), 0.1, dtype=torch.float64)
    wrong[0, 0] += 0.3
    wrong[0, 1:4] -= 0.1
    edited = new_result("labels", {"labels": wrong}, method="edited", update=first)
    save_result(edited, tmp_path / "w.labels.safetensors")
    out = tmp_path / "w.features.safetensors"
    result = run_cli("features", first.path, "--labels", tmp_path / "w.labels.safetensors", "-o", out)
    assert result.exit_code == 0 and "warning" in result.stderr
    assert "warning" in load_result(out).diagnostics


def test_adapters_through_the_registry(capture_factory):
    update, truth = capture_factory("r", spec=spec(bias=True), config=config(SMOOTH, seed=6))
    by_bias = recover_labels(update, "auto", {"family": "auto"})
    by_lambda = recover_labels(update, "lambda", {"family": "smoothing"})  # uses the bias in the logits
    assert by_bias.method == "bias" and by_lambda.method == "lambda"
    for outcome in (by_bias, by_lambda):
        assert outcome.labels.shape == (1, 10)
        assert float((outcome.labels - truth.labels.double()).abs().max()) < 1e-10
        assert outcome.diagnostics["family"] == "smoothing" and outcome.summary
    assert by_lambda.curve is not None and len(by_lambda.curve["x"]) == len(by_lambda.curve["y"])
