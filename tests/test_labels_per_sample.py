"""`gitool labels --per-sample`, `features` and `reconstruct` on a one-step batch: the
chain from the update alone, scored against the truth only at the end."""

from __future__ import annotations

import pytest
import torch

from gitool.files import load_result


@pytest.fixture
def batch_update(tmp_path, run_cli):
    def make(*extra: str, name: str = "c", batch: int = 4):
        path = tmp_path / f"{name}.update.safetensors"
        classes = ",".join(map(str, [0, 3, 5, 7, 9, 11, 1, 2][:batch]))
        result = run_cli("capture", "--model", "fcn4", "--model-opt", "widths=256,128,64", "--image-size", "3x8x8",
                         "-K", "12", "--data", "samples", "-B", str(batch), "--classes", classes,
                         "--dtype", "float64", "--seed", "1", *extra, "-o", path)
        assert result.exit_code == 0, result.stderr
        return path

    return make


def test_the_chain_reconstructs_every_sample_of_a_batch(batch_update, run_cli, tmp_path):
    update = batch_update()
    labels, features, recon = (tmp_path / f"c.{kind}.safetensors" for kind in ("labels", "features", "recon"))
    result = run_cli("labels", update, "--per-sample", "-o", labels)
    assert result.exit_code == 0, result.stderr
    assert "per-sample: 4 hard labels, classes 0 3 5 7" in result.stdout
    made = load_result(labels)
    assert made.tensors["labels"].shape == made.tensors["softmax"].shape == (4, 12)
    assert made.diagnostics["rank"] == 4 and made.diagnostics["residual"] < 1e-13
    assert run_cli("features", update, "--labels", labels, "-o", features).exit_code == 0
    assert load_result(features).tensors["features"].shape == (4, 64)
    result = run_cli("reconstruct", update, "--labels", labels, "--features", features, "--method", "fc", "-o", recon)
    assert result.exit_code == 0, result.stderr
    import json

    rows = {}
    for made_file in (labels, features, recon):
        result = run_cli("score", made_file, "--truth", tmp_path / "c.truth.safetensors", "--json")
        assert result.exit_code == 0, result.stderr
        row = json.loads(result.stdout)["files"][0]
        rows[row["kind"]] = row
    assert rows["labels"]["max_abs_error"] == 0.0 and rows["labels"]["iAcc"] == 1.0
    assert rows["features"]["relative_error"] < 1e-12
    assert rows["reconstruction"]["psnr"] > 250 and min(rows["reconstruction"]["psnr_per_image"]) > 250


def test_refusals_are_one_line(batch_update, run_cli, tmp_path):
    multi = batch_update("--steps", "2", name="m")
    result = run_cli("labels", multi, "--per-sample", "-o", tmp_path / "m.labels.safetensors")
    assert result.exit_code != 0 and len(result.stderr.strip().splitlines()) == 1
    assert "a delta of 2 local steps" in result.stderr
    update = batch_update(name="b")
    result = run_cli("labels", update, "--per-sample", "--method", "llg", "-o", tmp_path / "x.labels.safetensors")
    assert result.exit_code == 2 and "--per-sample is --method per-sample" in result.stderr
    # B > K - 1: eleven classes, a batch of 12 cannot be separated
    big = tmp_path / "big.update.safetensors"
    assert run_cli("capture", "--model", "mlp", "--image-size", "1x8x8", "-K", "4", "-B", "4", "--dtype", "float64",
                   "-o", big).exit_code == 0
    result = run_cli("labels", big, "--per-sample", "-o", tmp_path / "big.labels.safetensors")
    assert result.exit_code == 1 and "B = 4 > K - 1 = 3" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # count labels of a batch give no features; the error points to --per-sample
    counts = tmp_path / "b.labels.safetensors"
    assert run_cli("labels", update, "--method", "llg", "-o", counts).exit_code == 0
    result = run_cli("features", update, "--labels", counts, "-o", tmp_path / "b.features.safetensors")
    assert result.exit_code != 0 and "--per-sample" in result.stderr


def test_a_one_step_delta_is_turned_back_into_its_gradient(batch_update, run_cli, tmp_path):
    update = batch_update("--send", "delta", name="d")
    labels = tmp_path / "d.labels.safetensors"
    result = run_cli("labels", update, "--per-sample", "-o", labels)
    assert result.exit_code == 0, result.stderr
    assert load_result(labels).diagnostics["residual"] < 1e-12
    assert torch.equal(load_result(labels).tensors["counts"].nonzero().view(-1), torch.tensor([0, 3, 5, 7]))
