"""`reconstruct(..., "optimize", ...)`: the adapter from update + labels/features files."""

from __future__ import annotations

import pytest
import torch

from gitool.capture import CaptureConfig
from gitool.errors import GitoolError, UsageError
from gitool.files import InputSpec, LossSpec, TrainingSpec, new_result
from gitool.metrics import psnr, ssim
from gitool.models import ModelSpec
from gitool.reconstruct import reconstruct

LENET = ModelSpec(name="lenet", num_classes=10, input_shape=(3, 16, 16))


@pytest.fixture
def smoothing_capture(capture_factory):
    config = CaptureConfig(input=InputSpec(shape=LENET.input_shape),
                           loss=LossSpec(family="smoothing", label_smoothing=0.2))
    return capture_factory("s", spec=LENET, config=config)


def labels_result(update, labels=None, counts=None):
    tensors = {k: v for k, v in (("labels", labels), ("counts", counts)) if v is not None}
    return new_result("labels", tensors, method="test", update=update)


def features_result(update, features):
    return new_result("features", {"features": features}, method="test", update=update)


def test_recovers_a_recognisable_lenet_image_with_the_soft_label(smoothing_capture):
    torch.set_num_threads(1)
    update, truth = smoothing_capture
    seen = []
    out = reconstruct(update, labels_result(update, truth.labels), None, "optimize",
                      {"iterations": 300, "report_every": 100, "optimizer": "adam", "distance": "cosine", "tv": 1e-2},
                      lambda done, total, info: seen.append((done, total)))
    assert out.images.shape == truth.images.shape
    assert float(psnr(out.images, truth.images)) > 22.0  # measured 27.1 dB (random start: ~8 dB)
    assert float(ssim(out.images, truth.images)) > 0.9  # measured 0.975
    assert seen == [(100, 300), (200, 300), (300, 300)]


def test_feature_terms_use_the_recovered_feature(smoothing_capture):
    update, truth = smoothing_capture
    out = reconstruct(update, labels_result(update, truth.labels), features_result(update, truth.features),
                      "optimize", {"iterations": 200, "terms": "f", "feature_weight": 2, "optimizer": "adam",
                                   "distance": "cosine", "tv": 1e-2})
    assert update.last_layer().weight_name not in out.diagnostics["matched_tensors"]
    assert float(psnr(out.images, truth.images)) > 22.0  # measured 28.9 dB


def test_restart_choice_never_reads_the_truth(smoothing_capture, tmp_path, monkeypatch):
    """Same result after the truth file is replaced by wrong images and every way of
    reading truth or scoring is made to fail."""
    import gitool.files
    import gitool.metrics
    from gitool.files import load_truth, save_truth

    update, truth = smoothing_capture
    options = {"iterations": 30, "restarts": 3, "seed": 5, "optimizer": "adam"}  # restarts together
    first = reconstruct(update, labels_result(update, truth.labels), None, "optimize", options)

    wrong = load_truth(tmp_path / "s.truth.safetensors")
    wrong.images = torch.rand_like(wrong.images)
    save_truth(wrong, tmp_path / "s.truth.safetensors")

    def forbidden(*args, **kwargs):
        raise AssertionError("the attack looked at the truth or scored itself")

    for module, name in ((gitool.files, "load_truth"), (gitool.metrics, "psnr"), (gitool.metrics, "ssim"),
                         (gitool.metrics, "score_images"), (gitool.metrics, "score")):
        monkeypatch.setattr(module, name, forbidden)
    second = reconstruct(update, labels_result(update, truth.labels), None, "optimize", options)
    assert torch.equal(first.images, second.images)
    assert second.diagnostics["restart_losses"] == first.diagnostics["restart_losses"]
    losses = second.diagnostics["restart_losses"]
    assert second.diagnostics["chosen_restart"] == losses.index(min(losses)) + 1


def test_without_labels_the_labels_are_optimised_jointly(smoothing_capture):
    update, truth = smoothing_capture
    out = reconstruct(update, None, None, "optimize", {"iterations": 20})
    assert out.diagnostics["labels"] == "joint"
    assert torch.tensor(out.diagnostics["joint_labels"]).sum(dim=1).sub(1).abs().max() < 1e-5


def test_bad_inputs_give_clear_errors(smoothing_capture, capture_factory):
    update, truth = smoothing_capture
    labels = labels_result(update, truth.labels)
    with pytest.raises(UsageError, match="leave out --labels"):
        reconstruct(update, labels, None, "optimize", {"joint_labels": True})
    with pytest.raises(UsageError, match="needs --features"):
        reconstruct(update, labels, None, "optimize", {"terms": "gf"})
    with pytest.raises(UsageError, match="features have shape"):
        reconstruct(update, labels, features_result(update, truth.features[:, :-1]), "optimize", {"terms": "gf"})
    with pytest.raises(UsageError, match="labels have shape"):
        reconstruct(update, labels_result(update, truth.labels[:, :5]), None, "optimize", {})
    with pytest.raises(UsageError, match="--optimizer must be one of adam, lbfgs"):
        reconstruct(update, labels, None, "optimize", {"optimizer": "sgd"})
    with pytest.raises(UsageError, match="layer-weights"):
        reconstruct(update, labels, None, "optimize", {"layer_weights": "oops"})
    other, _ = capture_factory("o", spec=LENET, seed=3)
    with pytest.raises(GitoolError, match="another update"):
        reconstruct(update, labels_result(other, truth.labels), None, "optimize", {})


def test_multi_step_update_with_counts_only(capture_factory):
    """FedAvg m = 2, B = 1 on an MLP, labels known only as counts: the simulated local
    training still finds both images (in either order)."""
    spec = ModelSpec(name="mlp", num_classes=4, input_shape=(1, 6, 6), options={"widths": "32"})
    config = CaptureConfig(input=InputSpec(shape=spec.input_shape), choice=__import__("gitool.capture").capture
                           .SampleChoice(classes=[0, 2]), training=TrainingSpec(batch_size=1, steps=2, lr=0.1))
    update, truth = capture_factory("m", spec=spec, config=config)
    assert update.kind == "delta"
    out = reconstruct(update, labels_result(update, counts=truth.counts), None, "optimize",
                      {"iterations": 300, "tv": 0})
    from gitool.metrics import score_images

    assert score_images(out.images, truth.images)["psnr"] > 50.0  # measured 73 dB


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_norm_in_both_modes(capture_factory, mode):
    spec = ModelSpec(name="resnet18", num_classes=4, input_shape=(3, 16, 16), options={"width": "4"})
    config = CaptureConfig(input=InputSpec(shape=spec.input_shape), training=TrainingSpec(model_mode=mode))
    update, truth = capture_factory("r" + mode, spec=spec, config=config)
    out = reconstruct(update, labels_result(update, truth.labels), None, "optimize",
                      {"iterations": 40, "report_every": 5, "signed": False})  # plain Adam in both modes
    losses = [h[2] for h in out.diagnostics["history"]]
    assert torch.isfinite(out.images).all()
    assert losses[-1] < 0.8 * losses[0]  # measured: train 0.61 -> 0.42, eval 2.1e-3 -> 3.5e-4


def test_save_every_writes_pngs(smoothing_capture, tmp_path):
    update, truth = smoothing_capture
    reconstruct(update, labels_result(update, truth.labels), None, "optimize",
                {"iterations": 4, "save_every": 2, "save_dir": tmp_path / "snaps", "restarts": 2})
    names = sorted(p.name for p in (tmp_path / "snaps").glob("*.png"))
    assert names == ["restart01_iter000002.png", "restart01_iter000004.png", "restart02_iter000002.png",
                     "restart02_iter000004.png"]


# --------------------------------------------------------------------------- the CLI


def test_cli_reconstruct_optimize(run_cli, smoothing_capture, tmp_path):
    from gitool.files import load_result, save_result

    update, truth = smoothing_capture
    save_result(labels_result(update, truth.labels), tmp_path / "s.labels.safetensors")
    save_result(features_result(update, truth.features), tmp_path / "s.features.safetensors")
    out = tmp_path / "s.reconstruction.safetensors"
    res = run_cli("reconstruct", tmp_path / "s.update.safetensors", "--labels", tmp_path / "s.labels.safetensors",
                  "--features", tmp_path / "s.features.safetensors", "--method", "optimize", "--terms", "gf",
                  "--iterations", "20", "--restarts", "2", "--save-every", "10", "-o", out, "--json")
    assert res.exit_code == 0, res.stderr
    doc = res.json()
    assert doc["method"] == "optimize" and len(doc["diagnostics"]["restart_losses"]) == 2
    result = load_result(out)
    assert result.kind == "reconstruction" and result.require("images").shape == truth.images.shape
    assert len(list((tmp_path / "s.optimize-steps").glob("*.png"))) == 4

    res = run_cli("reconstruct", tmp_path / "s.update.safetensors", "--labels", tmp_path / "s.labels.safetensors",
                  "--method", "optimize", "--iterations", "3", "--signed", "-o", out, "--json")
    assert res.exit_code == 0 and res.json()["diagnostics"]["config"]["signed"] is True
    res = run_cli("reconstruct", tmp_path / "s.update.safetensors", "--labels", tmp_path / "s.labels.safetensors",
                  "--method", "optimize", "--optimizer", "lbfgs", "--iterations", "2", "--no-line-search",
                  "-o", out, "--json")
    assert res.exit_code == 0 and res.json()["diagnostics"]["config"]["line_search"] is False

    res = run_cli("reconstruct", tmp_path / "s.update.safetensors", "--labels", tmp_path / "s.labels.safetensors",
                  "--method", "optimize", "--terms", "f", "-o", out)
    assert res.exit_code == 2 and "needs --features" in res.stderr and "Traceback" not in res.stderr


def resnet_capture(capture_factory, mode, width="8"):
    """ResNet-18 (3x32x32, K=100) with PyTorch's default initialisation, label smoothing 0.1."""
    spec = ModelSpec(name="resnet18", num_classes=100, input_shape=(3, 32, 32), options={"width": width})
    config = CaptureConfig(input=InputSpec(shape=spec.input_shape), init="default",
                           loss=LossSpec(family="smoothing", label_smoothing=0.1),
                           training=TrainingSpec(model_mode=mode))
    return capture_factory("resnet" + mode, spec=spec, config=config)


def test_eval_mode_resnet18_gives_a_recognisable_image(capture_factory):
    """Inverting Gradients' setting (cosine + TV 1e-2, signed Adam lr 0.1) on an eval-mode
    ResNet-18 at width 8 (the benchmark runs width 64: 22 dB in 200 iterations)."""
    torch.set_num_threads(1)
    update, truth = resnet_capture(capture_factory, "eval")
    out = reconstruct(update, labels_result(update, truth.labels), None, "optimize",
                      {"iterations": 150, "signed": True, "report_every": 50})
    assert float(psnr(out.images, truth.images)) > 16.0  # measured 18.9 dB (random start: ~8 dB)
    assert float(ssim(out.images, truth.images)) > 0.15  # measured 0.25


def test_train_mode_batch_norm_makes_the_resnet_objective_a_needle(capture_factory):
    """Why train-mode ResNet-18 reconstructions fail at one image: with batch statistics the
    update's gradients (all but the classifier's) decorrelate under a 1 % pixel
    perturbation, so the objective is flat almost everywhere; with running statistics
    (eval mode) the same perturbation barely changes it. The objective is exactly zero at
    the truth in both modes (the simulated client step is right)."""
    from gitool.attacks.gradient_matching import ClientTraining, GradientMatcher, MatchConfig

    noise = torch.randn(truth_shape := (1, 3, 32, 32), generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64)
    values = {}
    for mode in ("train", "eval"):
        update, truth = resnet_capture(capture_factory, mode)
        model = update.build_model(dtype=torch.float64)
        matcher = GradientMatcher(model, update.input.normalize, dict(update.values), ClientTraining("gradient", 1),
                                  MatchConfig(tv=0), labels=truth.labels.to(torch.float64))
        assert truth.images.shape == truth_shape
        values[mode] = [float(matcher.objective((truth.images + s * noise).clamp(0, 1), truth.labels).detach())
                        for s in (0.0, 1e-2)]
    assert abs(values["train"][0]) < 1e-6 and abs(values["eval"][0]) < 1e-6  # float32 update: ~1e-7
    assert values["train"][1] > 0.3  # measured 0.53 (0.67 at width 16; random images: 0.87)
    assert values["eval"][1] < 0.01  # measured 2.9e-4 (random images: 0.010)


# --------------------------------------------------------------------------- time budget and signals


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_time_budget_stops_and_keeps_the_best_iterate(smoothing_capture, optimizer):
    import math
    import time

    update, truth = smoothing_capture
    labels = labels_result(update, truth.labels)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # torch's one-time optimiser import (1-5 s) out of the way
    started = time.monotonic()
    out = reconstruct(update, labels, None, "optimize", {"iterations": 1_000_000, "time_budget": 2.0,
                                                         "optimizer": optimizer})
    seconds = time.monotonic() - started
    # measured 2.1-2.3 s: L-BFGS stops between the evaluations of an iteration, Adam after one
    assert seconds < 2.0 + 1.5
    diagnostics = out.diagnostics
    assert diagnostics["stopped"] == "budget" and diagnostics["time_budget"] == 2.0
    # How far it got depends on the load (measured: 0-8 whole L-BFGS iterations of 20 evaluations,
    # 4-300 Adam ones on one shared core); the result is a valid one either way.
    assert 0 <= diagnostics["iterations_done"] < 1_000_000
    assert "stopped by the 2 s time budget" in " ".join(out.summary)
    # The kept images are the lowest objective seen: never above a reported loss.
    assert math.isfinite(diagnostics["loss"])
    assert diagnostics["loss"] <= min([h[2] for h in diagnostics["history"]], default=math.inf) + 1e-12
    assert out.images.shape == truth.images.shape and 0 <= float(out.images.min()) <= float(out.images.max()) <= 1


def test_a_run_in_full_records_no_stop(smoothing_capture):
    update, truth = smoothing_capture
    out = reconstruct(update, labels_result(update, truth.labels), None, "optimize",
                      {"iterations": 20, "restarts": 2, "time_budget": 600.0})
    assert out.diagnostics["stopped"] is None and out.diagnostics["iterations_done"] == 40


def test_time_budget_must_be_a_non_negative_number(smoothing_capture):
    update, truth = smoothing_capture
    with pytest.raises(UsageError, match="time-budget"):
        reconstruct(update, labels_result(update, truth.labels), None, "optimize", {"time_budget": -1.0})


def test_a_deferred_signal_stops_the_run_and_is_raised_after(smoothing_capture):
    import os
    import signal

    from gitool import interrupts
    from gitool.atomic import Terminated

    update, truth = smoothing_capture
    seen = []

    def progress(done, total, info):
        seen.append(done)
        if done == 20:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Terminated):
        with interrupts.deferred():
            out = reconstruct(update, labels_result(update, truth.labels), None, "optimize",
                              {"iterations": 10_000, "report_every": 10}, progress)
        interrupts.reraise()
    assert out.diagnostics["stopped"] == "interrupted" and out.diagnostics["iterations_done"] == 21
    assert signal.getsignal(signal.SIGTERM) is not interrupts._on_signal  # handlers restored


def _gitool(*args: str, stderr) -> "subprocess.Popen":
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-m", "gitool", *args], env=env, stdout=subprocess.PIPE, stderr=stderr,
                            text=True, start_new_session=True)


@pytest.mark.parametrize("signum, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_to_the_command_writes_the_best_iterate(smoothing_capture, tmp_path, signum, code):
    """A long optimize run, stopped once its progress line (plain text: stderr is a file)
    shows, leaves a valid result that gitool score reads, and exits 130 / 143."""
    import signal
    import time

    from gitool.files import load_result, save_result

    update, truth = smoothing_capture
    labels = tmp_path / "s.labels.safetensors"
    save_result(labels_result(update, truth.labels), labels)
    out = tmp_path / "s.reconstruction.safetensors"
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        process = _gitool("reconstruct", str(tmp_path / "s.update.safetensors"), "--labels", str(labels),
                          "--method", "optimize", "--optimizer", "adam", "--iterations", "1000000", "-o", str(out),
                          stderr=stderr)
        try:
            deadline = time.monotonic() + 120
            while "iteration 50" not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert "optimize: loss" in log.read_text()  # iteration, loss, elapsed, restart in a plain line
            assert "restart 1, iteration 50: 50/1000000 in" in log.read_text()
            process.send_signal(getattr(signal, signum))
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == code, log.read_text()[-2000:]
    result = load_result(out)
    assert result.diagnostics["stopped"] == "interrupted" and result.diagnostics["iterations_done"] >= 50
    assert not list(tmp_path.glob(".*gitool-tmp"))
    from typer.testing import CliRunner

    from gitool.cli import app

    scored = CliRunner().invoke(app, ["score", str(out), "--truth", str(tmp_path / "s.truth.safetensors"), "--json"])
    assert scored.exit_code == 0 and '"psnr"' in scored.output


def test_defaults_follow_the_model(smoothing_capture, capture_factory):
    """No batch norm: L-BFGS, l2, no TV (DLG); batch norm: signed Adam, cosine, TV 1e-2 (IG)."""
    update, truth = smoothing_capture
    out = reconstruct(update, labels_result(update, truth.labels), None, "optimize", {"iterations": 2})
    config = out.diagnostics["config"]
    assert (config["optimizer"], config["distance"], config["tv"], config["signed"]) == ("lbfgs", "l2", 0.0, False)
    spec = ModelSpec(name="resnet18", num_classes=4, input_shape=(3, 16, 16), options={"width": "4"})
    cfg = CaptureConfig(input=InputSpec(shape=spec.input_shape), training=TrainingSpec(model_mode="eval"))
    bn_update, bn_truth = capture_factory("bn", spec=spec, config=cfg)
    out = reconstruct(bn_update, labels_result(bn_update, bn_truth.labels), None, "optimize",
                      {"iterations": 2, "tv": 0.0})
    config = out.diagnostics["config"]
    assert (config["optimizer"], config["distance"], config["tv"], config["signed"]) == ("adam", "cosine", 0.0, True)
