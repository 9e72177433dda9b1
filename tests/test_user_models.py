"""Models as users write them, end to end through the command line.

Each model of tests/user_models.py (copied into a scratch folder as ``usernets.py``) is
trained one step by plain PyTorch code, its weights saved as ``.pt`` state dicts, imported
with ``gitool import --model usernets:FACTORY`` and attacked: labels, and the analytic
reconstruction where the model is a chain the analytic methods can invert, exact in
float64 (scored with a truth made by ``gitool truth`` from the client's own tensors).
What they cannot invert is refused in one line naming the graph node.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

K = 10
USER_MODULE = Path(__file__).with_name("user_models.py").read_text()


@pytest.fixture
def usernets(tmp_path, monkeypatch):
    """The user's module in the current directory, as `--model usernets:FACTORY` finds it."""
    (tmp_path / "usernets.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "usernets", raising=False)
    return importlib.import_module("usernets")


def logits_of(out, output):
    return out if output is None else out[output]


def client_round(usernets, name, shape, output=None, mode="train", send="grad", seed=0):
    """One client step written as a user writes it, in float64: saves before.pt and grad.pt
    (or after.pt after one SGD step with lr 0.1) and the private sample in private.pt."""
    torch.manual_seed(seed)
    net = getattr(usernets, name)(num_classes=K, input_shape=shape).double()
    net.train(mode == "train")
    before = {key: value.clone() for key, value in net.state_dict().items()}
    images = torch.rand(1, *shape, dtype=torch.float64)
    labels = torch.tensor([3])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    optimizer.zero_grad()
    F.cross_entropy(logits_of(net(images), output), labels).backward()
    torch.save(before, "before.pt")
    if send == "grad":
        torch.save({n: p.grad for n, p in net.named_parameters()}, "grad.pt")
    else:
        optimizer.step()
        torch.save(net.state_dict(), "after.pt")
    torch.save({"images": images, "labels": labels}, "private.pt")
    return images


def import_args(name, shape, output=None, mode="train", send="grad"):
    args = ["import", "--model", f"usernets:{name}", "-K", str(K), "--image-size", "x".join(map(str, shape)),
            "--before", "before.pt", "-B", "1", "--hard-labels", "--normalize", "none", "--no-defence",
            "--mode", mode, "-o", "u.update.safetensors"]
    if output is not None:
        args += ["--model-output", str(output)]
    if send == "grad":
        return args + ["--grad", "grad.pt"]
    return args + ["--after", "after.pt", "--steps", "1", "--lr", "0.1", "--optimizer", "sgd", "--weight-decay", "0"]


def ok(result):
    assert result.exit_code == 0, result.stderr
    return result


# (factory, input shape, --model-output, client mode, what the client sends, analytic method)
INVERTIBLE = [
    pytest.param("functional_mlp", (3, 8, 8), None, "train", "grad", "fc", id="functional-forward"),
    pytest.param("shared_activation_cnn", (3, 8, 8), None, "train", "grad", "conv", id="reused-activation"),
    pytest.param("sequential_mlp", (3, 8, 8), None, "train", "grad", "fc", id="nn-sequential"),
    pytest.param("view_flatten_cnn", (3, 8, 8), None, "train", "grad", "conv", id="view-flatten"),
    pytest.param("dropout_mlp", (3, 8, 8), None, "eval", "grad", "fc", id="eval-mode-dropout"),
    pytest.param("dict_output_mlp", (3, 8, 8), "logits", "train", "grad", "fc", id="dict-output"),
    pytest.param("rconv_lenet", (3, 16, 16), 0, "train", "grad", "conv", id="tuple-output-rconv-lenet"),
]


@pytest.mark.parametrize("name,shape,output,mode,send,method", INVERTIBLE)
def test_user_model_is_imported_and_inverted_exactly(run_cli, usernets, name, shape, output, mode, send, method):
    images = client_round(usernets, name, shape, output, mode, send)
    ok(run_cli(*import_args(name, shape, output, mode, send)))
    trust = ["--model", f"usernets:{name}"]
    ok(run_cli("labels", "u.update.safetensors", *trust, "-o", "u.labels.safetensors"))
    ok(run_cli("features", "u.update.safetensors", *trust, "--labels", "u.labels.safetensors",
               "-o", "u.features.safetensors"))
    ok(run_cli("reconstruct", "u.update.safetensors", *trust, "--labels", "u.labels.safetensors", "--features",
               "u.features.safetensors", "--method", method, "-o", "u.reconstruction.safetensors"))
    ok(run_cli("truth", "u.update.safetensors", *trust, "--private", "private.pt", "-o", "u.truth.safetensors"))
    # gradient matching runs the model through the same selector (a few steps: it runs, not how well)
    ok(run_cli("reconstruct", "u.update.safetensors", *trust, "--labels", "u.labels.safetensors", "--method",
               "optimize", "--iterations", "2", "-o", "u.optimize.safetensors"))

    labels = ok(run_cli("score", "u.labels.safetensors", "--truth", "u.truth.safetensors", "--json")).json()
    assert labels["files"][0]["max_abs_error"] < 1e-12
    scored = ok(run_cli("score", "u.reconstruction.safetensors", "--truth", "u.truth.safetensors", "--json")).json()
    assert scored["files"][0]["psnr"] > 200  # float64 round-off: PSNR 200 dB is a relative error near 1e-10
    from gitool.files import load_result

    recovered = load_result("u.reconstruction.safetensors").require("images")
    assert float((recovered - images).norm() / images.norm()) < 1e-10


REFUSED = [
    pytest.param("rlu_lenet5", (3, 32, 32), 0, "conv",
                 r"^node 'pool' \(call_module MaxPool2d\) is pooling, which discards what the inversion needs; "
                 "the analytic methods invert chains", id="pooling-rlu-lenet5"),
    pytest.param("residual_mlp", (3, 8, 8), None, "fc",
                 r"^node 'add' \(call_function add\) combines 2 tensors \(a residual add", id="residual-add"),
    pytest.param("twice_used_linear", (3, 8, 8), None, "fc",
                 r"^node 'mid_1' \(call_module Linear\) uses module 'mid' a second time \(first at node 'mid'\)",
                 id="linear-used-twice"),
]


@pytest.mark.parametrize("name,shape,output,method,message", REFUSED)
def test_what_the_analytic_methods_cannot_invert_is_refused_by_node(run_cli, usernets, name, shape, output, method,
                                                                     message):
    client_round(usernets, name, shape, output)
    ok(run_cli(*import_args(name, shape, output)))
    trust = ["--model", f"usernets:{name}"]
    labels = ok(run_cli("labels", "u.update.safetensors", *trust, "-o", "u.labels.safetensors", "--json")).json()
    assert labels["files"][0]["labels"][0].index(max(labels["files"][0]["labels"][0])) == 3  # the labels still work
    ok(run_cli("features", "u.update.safetensors", *trust, "--labels", "u.labels.safetensors",
               "-o", "u.features.safetensors"))
    for command in (["reconstruct"], ["reconstruct", "--explain"]):
        refused = run_cli(*command, "u.update.safetensors", *trust, "--labels", "u.labels.safetensors",
                          "--features", "u.features.safetensors", "--method", method, "-o", "u.rec.safetensors")
        assert refused.exit_code == 1 and "Traceback" not in refused.stderr
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and refused.stderr.strip().endswith(errors[0])  # after the progress line, if any
        assert re.search(message, errors[0].removeprefix("error: ")), errors[0]


def test_rlu_lenet5_gives_its_label_counts_through_the_output_selector(run_cli, usernets, tmp_path):
    """The RLU paper's LeNet5 returns (logits, embedding): a FedAvg client of 3 local steps
    of 8 samples, imported, attacked with RLU and scored with the client's own batch."""
    torch.manual_seed(5)
    net = usernets.rlu_lenet5(num_classes=K, input_shape=(3, 32, 32))
    before = {key: value.clone() for key, value in net.state_dict().items()}
    images, labels = torch.rand(24, 3, 32, 32), torch.randint(0, K, (24,))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    for step in range(3):
        batch = slice(8 * step, 8 * step + 8)
        optimizer.zero_grad()
        logits, embedding = net(images[batch])
        F.cross_entropy(logits, labels[batch]).backward()
        optimizer.step()
    torch.save(before, "before.pt")
    torch.save(net.state_dict(), "after.pt")
    torch.save({"images": images, "labels": labels}, "private.pt")
    base = ["--model", "usernets:rlu_lenet5", "-K", str(K), "--image-size", "3x32x32", "--before", "before.pt",
            "--after", "after.pt", "-B", "8", "--steps", "3", "--lr", "0.01", "--optimizer", "sgd",
            "--weight-decay", "0", "--mode", "train", "--hard-labels", "--normalize", "none", "--no-defence",
            "-o", "u.update.safetensors"]
    refused = run_cli("import", *base)
    assert refused.exit_code == 1
    assert refused.stderr.strip() == ("error: model usernets:rlu_lenet5: forward returns a tuple of 2 (tensor 2x10, "
                                      "tensor 2x84); pass --model-output INDEX to gitool import (or capture, train) "
                                      "to name the logits")
    ok(run_cli("import", *base, "--model-output", "0"))
    trust = ["--model", "usernets:rlu_lenet5"]
    ok(run_cli("labels", "u.update.safetensors", *trust, "--method", "rlu", "--aux", "synthetic",
               "-o", "u.labels.safetensors"))
    made = ok(run_cli("truth", "u.update.safetensors", *trust, "--private", "private.pt", "-o", "u.truth.safetensors",
                      "--json")).json()
    assert made["replays"] and made["replay_error"] < 1e-5  # float32 round-off of 3 local steps
    counts = ok(run_cli("score", "u.labels.safetensors", "--truth", "u.truth.safetensors", "--json")).json()
    assert counts["files"][0]["iAcc"] >= 0.9 and counts["files"][0]["cAcc"] >= 0.9
    # the gradient-matching reconstruction simulates the 3 local steps through the selector too
    ok(run_cli("reconstruct", "u.update.safetensors", *trust, "--labels", "u.labels.safetensors", "--method",
               "optimize", "--iterations", "3", "-o", "u.reconstruction.safetensors"))
    # and the export carries the selector: importing it again gives the same model spec
    ok(run_cli("export", "u.update.safetensors", *trust, "-o", "out.pt"))
    ok(run_cli("import", "--before", "out.pt", "--delta", "out.pt", "--facts", "out.facts.json", *trust,
               "-o", "again.update.safetensors"))
    from gitool.files import load_update

    assert load_update("again.update.safetensors").model == load_update("u.update.safetensors").model
    assert load_update("again.update.safetensors").model.output == 0


def test_output_selector_errors_are_one_line(run_cli, usernets):
    client_round(usernets, "dict_output_mlp", (3, 8, 8), "logits", send="after")
    args = import_args("dict_output_mlp", (3, 8, 8), send="after")

    def error(*extra):
        result = run_cli(*args, *extra)
        assert result.exit_code in (1, 2) and len(result.stderr.strip().splitlines()) == 1, result.stderr
        return result.stderr.strip().removeprefix("error: ")

    assert error() == ("model usernets:dict_output_mlp: forward returns a dict (logits: tensor 2x10, projection: "
                       "tensor 2x16); pass --model-output KEY to gitool import (or capture, train) to name the logits")
    assert error("--model-output", "scores").endswith("--model-output scores is not one of its keys (logits, "
                                                      "projection)")
    assert error("--model-output", "projection").startswith("model usernets:dict_output_mlp: forward gives one "
                                                            "tensor 2x16 for 2 inputs, not logits of 2 x K = 2 x 10")
    assert "--model-output must be an index 0 to 255 or a key" in error("--model-output", "no spaces")
    client_round(usernets, "functional_mlp", (3, 8, 8))
    args = import_args("functional_mlp", (3, 8, 8))
    assert error("--model-output", "0").endswith("forward returns one tensor 2x10, but --model-output 0 is "
                                                 "recorded: drop --model-output")
    assert "--model-output is for user models" in error("--model", "lenet", "--model-output", "0")


def test_capture_and_train_take_user_models_with_a_selector(run_cli, usernets):
    """A user model returning (out, x) through capture (float64, one sample) and the conv
    inversion, and through train: the checkpoint keeps the selector for a later capture."""
    model = ["--model", "usernets:rconv_lenet", "--model-output", "0", "--image-size", "16"]
    ok(run_cli("capture", *model, "--data", "samples", "--dtype", "float64", "--seed", "2",
               "-o", "c.update.safetensors"))
    trust = ["--model", "usernets:rconv_lenet"]
    ok(run_cli("labels", "c.update.safetensors", *trust, "-o", "c.labels.safetensors"))
    ok(run_cli("features", "c.update.safetensors", *trust, "--labels", "c.labels.safetensors",
               "-o", "c.features.safetensors"))
    ok(run_cli("reconstruct", "c.update.safetensors", *trust, "--labels", "c.labels.safetensors", "--features",
               "c.features.safetensors", "--method", "conv", "-o", "c.reconstruction.safetensors"))
    scored = ok(run_cli("score", "c.reconstruction.safetensors", "--truth", "c.truth.safetensors", "--json")).json()
    assert scored["files"][0]["psnr"] > 200
    ok(run_cli("train", *model, "--data", "synthetic:40", "--epochs", "1", "-o", "ck.safetensors"))
    ok(run_cli("capture", "--init", "ck.safetensors", *trust, "--data", "synthetic", "-o", "t.update.safetensors"))
    from gitool.files import load_update

    assert load_update("t.update.safetensors").model.output == 0


def test_dropout_needs_the_model_mode_and_is_refused_in_train_mode(run_cli, usernets):
    client_round(usernets, "dropout_mlp", (3, 8, 8), mode="train")
    trust = ["--model", "usernets:dropout_mlp"]
    attack = ["reconstruct", "u.update.safetensors", *trust, "--labels", "u.labels.safetensors", "--features",
              "u.features.safetensors", "--method", "fc", "--explain", "-o", "u.rec.safetensors"]
    args = import_args("dropout_mlp", (3, 8, 8), mode="train")
    unknown = args[:args.index("--mode")] + args[args.index("--mode") + 2:]  # nobody said the mode
    ok(run_cli(*unknown))
    ok(run_cli("labels", "u.update.safetensors", *trust, "-o", "u.labels.safetensors"))
    ok(run_cli("features", "u.update.safetensors", *trust, "--labels", "u.labels.safetensors",
               "-o", "u.features.safetensors"))
    refused = run_cli(*attack)
    assert refused.exit_code == 2 and "analytic reconstruction of a model with dropout needs training facts the " \
                                     "update u.update.safetensors does not record: model_mode (--mode)" in refused.stderr
    ok(run_cli(*args))
    refused = run_cli(*attack)
    assert refused.exit_code == 1 and refused.stderr.strip() == (
        "error: node 'drop' (call_module Dropout, p=0.5) drops values at random in train mode (the update's "
        "model_mode): the client's masks are unknown, so the analytic methods cannot invert it; --method optimize "
        "takes any model")
