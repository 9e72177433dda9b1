"""The command line: capture -> inspect -> score, conventions, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gitool.files import load_truth, load_update

SMALL = ["--model", "lenet", "--image-size", "16", "--num-classes", "10"]


def test_capture_then_inspect_json(run_cli, tmp_path):
    out = tmp_path / "x.update.safetensors"
    r = run_cli("capture", *SMALL, "--label-smoothing", "0.1", "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    assert doc["written"][0]["truth"].endswith("x.truth.safetensors")
    r = run_cli("inspect", out, "--json")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert doc["kind"] == "update" and doc["version"] == 1
    assert doc["metadata"]["loss"]["family"] == "smoothing"
    names = {t["name"] for t in doc["tensors"]}
    assert "grad.classifier.weight" in names and "global.classifier.weight" in names
    r = run_cli("inspect", tmp_path / "x.truth.safetensors")
    assert r.exit_code == 0 and "truth" in r.stdout


def test_repeat_writes_numbered_pairs(run_cli, tmp_path):
    r = run_cli("capture", *SMALL, "--repeat", "3", "--out-dir", tmp_path / "runs", "--batch-size", "2",
                "--steps", "2", "--optimizer", "momentum", "--json")
    assert r.exit_code == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert names == [f"{i:04d}.{k}.safetensors" for i in range(3) for k in ("truth", "update")]
    u0 = load_update(tmp_path / "runs" / "0000.update.safetensors")
    u1 = load_update(tmp_path / "runs" / "0001.update.safetensors")
    assert u0.kind == "delta" and u0.training.momentum == 0.9
    assert not torch.equal(u0.values["classifier.weight"], u1.values["classifier.weight"])


@pytest.mark.parametrize("model,extra", [
    ("fcn4", ["--model-opt", "widths=64,32,16", "--no-bias"]),
    ("mlp", ["--model-opt", "widths=32"]),
    ("lenet", []),
    ("rconv-lenet", ["--activation", "relu"]),
    ("cnn6", []),
    ("resnet18", ["--model-opt", "width=4", "--mode", "eval"]),
    ("lenet5", []),
    ("vgg", ["--model-opt", "width=4", "--model-opt", "hidden=16", "--mode", "eval"]),
])
@pytest.mark.parametrize("data", ["synthetic", "digits", "samples", "photos"])
def test_every_model_and_source_captures(run_cli, tmp_path, model, extra, data):
    out = tmp_path / "m.update.safetensors"
    r = run_cli("capture", "--model", model, "--image-size", "32", "--data", data, "--batch-size", "2", *extra,
                "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    update = load_update(out)
    truth = load_truth(tmp_path / "m.truth.safetensors")
    assert update.model.name == model and truth.images.shape == (2, 3, 32, 32)
    assert 0 <= float(truth.images.min()) and float(truth.images.max()) <= 1


def test_models_lists_the_photos_source(run_cli):
    r = run_cli("models", "--json")
    assert r.exit_code == 0, r.stderr
    sources = dict(r.json()["data"])
    assert "scikit-image" in sources["photos"] and "PER_CLASS" in sources["photos"]


def test_score_labels_file_against_truth(run_cli, tmp_path):
    from gitool.files import load_update, new_result, save_result

    out = tmp_path / "s.update.safetensors"
    assert run_cli("capture", *SMALL, "--mixup-coef", "0.3", "-o", out).exit_code == 0
    truth = load_truth(tmp_path / "s.truth.safetensors")
    result = new_result("labels", {"labels": truth.labels.clone()}, method="oracle-for-test",
                        update=load_update(out))
    save_result(result, tmp_path / "s.labels.safetensors")
    r = run_cli("score", tmp_path / "s.labels.safetensors", "--truth", tmp_path / "s.truth.safetensors", "--json")
    assert r.exit_code == 0, r.stderr
    row = r.json()["files"][0]
    assert row["max_abs_error"] == 0 and row["top2_accuracy"] == 1.0 and row["iAcc"] == 1.0
    assert "warning" not in row and "warning" not in r.stderr
    r = run_cli("score", tmp_path, "--truth-dir", tmp_path)
    assert r.exit_code == 0 and "labels" in r.stdout


def test_score_warns_when_result_and_truth_come_from_different_updates(run_cli, tmp_path):
    from gitool.files import load_update, new_result, save_result

    for name, seed in (("a", "1"), ("b", "2")):
        assert run_cli("capture", *SMALL, "--seed", seed, "-o", tmp_path / f"{name}.update.safetensors").exit_code == 0
    truth_b = load_truth(tmp_path / "b.truth.safetensors")
    result = new_result("labels", {"labels": truth_b.labels.clone()}, method="oracle-for-test",
                        update=load_update(tmp_path / "a.update.safetensors"))
    save_result(result, tmp_path / "a.labels.safetensors")
    r = run_cli("score", tmp_path / "a.labels.safetensors", "--truth", tmp_path / "b.truth.safetensors", "--json")
    assert r.exit_code == 1 and "another update" in r.stderr  # scores that look perfect but mean nothing fail
    row = r.json()["files"][0]
    assert "a.update.safetensors" in row["warning"] and "b.update.safetensors" in row["warning"]
    r = run_cli("score", tmp_path / "a.labels.safetensors", "--truth", tmp_path / "b.truth.safetensors",
                "--allow-mismatch")
    assert r.exit_code == 0  # a re-imported export must still be scorable, with the warning
    assert r.stderr.count("warning:") == 1


@pytest.mark.parametrize("args,code,message", [
    (["capture", "--model", "nonsense", "-o", "{tmp}/a.safetensors"], 2, "unknown model"),
    (["capture", *SMALL, "--data", "nowhere", "-o", "{tmp}/a.safetensors"], 2, "unknown data source"),
    (["capture", *SMALL, "--data", "digits", "--batch-size", "5000", "-o", "{tmp}/a.safetensors"], 2, "holds only"),
    (["capture", *SMALL, "--mixup", "1", "--label-smoothing", "0.1", "-o", "{tmp}/a.safetensors"], 2, "not both"),
    (["capture", *SMALL, "--optimizer", "adam", "--steps", "2", "-o", "{tmp}/a.safetensors"], 2,
     "--optimizer must be one of sgd, momentum, fedprox"),
    (["capture", *SMALL, "-o", "{tmp}/no/such/dir/a.safetensors"], 2, "does not exist"),
    (["capture", *SMALL, "--device", "cuda:0", "-o", "{tmp}/a.safetensors"], 2, "CUDA is not available"),
    (["inspect", "{tmp}/missing.safetensors"], 1, "no such file"),
    (["inspect", "{tmp}/garbage.safetensors"], 1, "not a readable safetensors"),
    (["score", "{tmp}/garbage.safetensors", "--truth", "{tmp}/garbage.safetensors"], 1, "not a readable"),
    (["capture", *SMALL, "--batch-size", "abc", "-o", "x"], 2, ""),
    (["capture", *SMALL, "--normalize", "nan/1", "-o", "{tmp}/a.safetensors"], 2, "must be finite"),
    (["capture", *SMALL, "--lr", "nan", "-o", "{tmp}/a.safetensors"], 2, "--lr must be a finite number > 0"),
    (["train", *SMALL, "--lr", "nan", "-o", "{tmp}/a.safetensors"], 2, "lr > 0"),
    (["capture", "--num-classes", "0", "-o", "{tmp}/a.safetensors"], 2, "number of classes must be"),
    (["capture", *SMALL, "-o", "{tmp}/a.truth.safetensors"], 2, "would both be"),
    (["demo", "-o", "{tmp}/garbage.safetensors"], 2, "is a file, not a folder"),
    (["capture", *SMALL, "-o", "{tmp}/a.safetensors", "--truth", "{tmp}/./a.safetensors"], 2, "would both be"),
])
def test_errors_are_one_line_with_exit_codes(run_cli, tmp_path, args, code, message):
    if not torch.cuda.is_available() or "cuda" not in " ".join(args):
        (tmp_path / "garbage.safetensors").write_bytes(b"\x00garbage" * 10)
        r = run_cli(*[a.replace("{tmp}", str(tmp_path)) if isinstance(a, str) else a for a in args])
        assert r.exit_code == code, (r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        if message:
            assert message in r.stderr
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "a.safetensors").exists()


def test_score_refuses_an_update_as_result(run_cli, tmp_path):
    out = tmp_path / "u.update.safetensors"
    assert run_cli("capture", *SMALL, "-o", out).exit_code == 0
    r = run_cli("score", out, "--truth", tmp_path / "u.truth.safetensors")
    assert r.exit_code == 1 and "is an update file" in r.stderr


def test_train_then_capture_from_the_checkpoint(run_cli, tmp_path):
    ckpt = tmp_path / "lenet.safetensors"
    r = run_cli("train", *SMALL, "--activation", "relu", "--data", "synthetic", "--epochs", "10", "-o", ckpt, "--json")
    assert r.exit_code == 0, r.stderr
    report = r.json()
    assert report["heldout_accuracy"] > 0.5  # 10 classes: far above chance (measured 0.8)
    r = run_cli("inspect", ckpt, "--json")
    assert r.json()["kind"] == "checkpoint"
    out = tmp_path / "t.update.safetensors"
    r = run_cli("capture", "--init", ckpt, "-o", out, "--json")  # the checkpoint carries its model spec
    assert r.exit_code == 0, r.stderr
    update = load_update(out)
    assert update.model.name == "lenet" and update.model.input_shape == (3, 16, 16)
    from safetensors.torch import load_file

    trained = load_file(str(ckpt))
    assert torch.equal(update.global_state["classifier.weight"], trained["classifier.weight"])


def test_folder_and_cifar_sources_through_the_cli(run_cli, tmp_path):
    import pickle

    import numpy as np
    from PIL import Image

    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((40, 50, 3), 60 * i + (100 if cls == "dogs" else 0), np.uint8)).save(
                tmp_path / "imgs" / cls / f"{i}.png")
    r = run_cli("capture", *SMALL, "--data", f"folder:{tmp_path / 'imgs'}", "--batch-size", "4",
                "-o", tmp_path / "f.update.safetensors")
    assert r.exit_code == 0, r.stderr
    assert load_truth(tmp_path / "f.truth.safetensors").counts[:2].tolist() == [2, 2]
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, (6, 3072), dtype=np.uint8), b"labels": list(range(6))}
        (cifar / name).write_bytes(pickle.dumps(batch))
    r = run_cli("capture", "--model", "lenet", "--data", f"cifar10:{cifar}", "--batch-size", "3",
                "--label-smoothing", "0.1", "-o", tmp_path / "c.update.safetensors")
    assert r.exit_code == 0, r.stderr
    assert load_truth(tmp_path / "c.truth.safetensors").images.shape == (3, 3, 32, 32)


def test_zero_and_nan_inputs_are_clear_errors(run_cli, tmp_path):
    out = tmp_path / "z.update.safetensors"
    r = run_cli("capture", *SMALL, "--lr", "0", "--steps", "2", "-o", out)
    assert r.exit_code == 2 and "--lr must be > 0" in r.stderr
    assert not out.exists()


def test_capture_inherits_the_checkpoint_normalisation(run_cli, tmp_path):
    ckpt = tmp_path / "n.safetensors"
    assert run_cli("train", *SMALL, "--epochs", "1", "--normalize", "half", "-o", ckpt).exit_code == 0
    assert run_cli("capture", "--init", ckpt, "-o", tmp_path / "n.update.safetensors").exit_code == 0
    update = load_update(tmp_path / "n.update.safetensors")
    assert update.input.mean == (0.5,) and update.input.std == (0.5,)


def test_out_of_memory_is_a_one_line_error_not_an_internal_one(run_cli, tmp_path, monkeypatch):
    import gitool.capture

    def refuse(*args, **kwargs):  # what torch's CPU allocator raises for a huge tensor
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 1073741824 bytes. Error code 12")

    monkeypatch.setattr(gitool.capture, "capture", refuse)
    result = run_cli("capture", "--model", "mlp", "--data", "synthetic:1", "-o", tmp_path / "c.update.safetensors")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: out of memory (1.0 GiB in one piece): ask for a smaller model, batch, image size or number of classes"]
    assert not list(tmp_path.iterdir())


def test_features_and_reconstruct_over_a_folder_keep_going_past_a_failure(run_cli, tmp_path):
    """Folders work for features and reconstruct as for labels: each update finds its
    labels and features by stem, outputs keep the stem, one broken update is reported
    (exit 1, "1 of 3") while the others are written; progress goes to the log as lines."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    r = run_cli("capture", "--model", "fcn4", "--image-size", "8", "--no-bias", "--model-opt", "widths=64,32,16",
                "--data", "samples", "--label-smoothing", "0.1", "--dtype", "float64", "--repeat", "3",
                "--out-dir", runs)
    assert r.exit_code == 0, r.stderr
    assert run_cli("labels", runs, "--out-dir", out).exit_code == 0
    (out / "0001.labels.safetensors").unlink()  # the second update has no labels any more
    r = run_cli("features", runs, "--labels", out, "--out-dir", out)
    assert r.exit_code == 1 and "1 of 3 updates failed" in r.stderr and "0001" in r.stderr
    assert "recovering features: 3/3" in r.stderr  # plain progress lines: stderr is not a terminal
    assert sorted(p.name for p in out.glob("*.features.safetensors")) == ["0000.features.safetensors",
                                                                        "0002.features.safetensors"]
    r = run_cli("reconstruct", runs / "0000.update.safetensors", runs / "0002.update.safetensors", "--labels", out,
                "--features", out, "--method", "fc", "--out-dir", out, "--json")
    assert r.exit_code == 0, r.stderr
    document = r.json()
    assert [Path(row["output"]).name for row in document["files"]] == ["0000.reconstruction.safetensors",
                                                                      "0002.reconstruction.safetensors"]
    r = run_cli("score", out / "0000.reconstruction.safetensors", "--truth", runs / "0000.truth.safetensors", "--json")
    assert r.json()["files"][0]["psnr"] > 100  # exact in float64
    r = run_cli("reconstruct", runs, "--labels", out / "0000.labels.safetensors", "--method", "fc", "--out-dir", out)
    assert r.exit_code == 2 and "--labels names one file; for many updates give a folder" in r.stderr


def test_ctrl_c_in_a_command_says_so_in_one_line(tmp_path):
    """typer turns a KeyboardInterrupt inside a command into a bare exit 130; the user
    still reads one line saying what happened to the files."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "gitool", "capture", "--model", "lenet", "--repeat", "100000",
                             "--out-dir", str(tmp_path / "run")], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert "started" in proc.stderr.readline()  # the command is running
        proc.send_signal(signal.SIGINT)
        stderr = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert stderr.strip().splitlines()[-1] == "error: interrupted; files finished before stayed as they were"
