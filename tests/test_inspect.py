"""gitool.inspect: unknown facts shown as unknown, and a user model noted, not refused."""

from __future__ import annotations

import torch
from torch import nn

USER_MODULE = """
from torch import nn

def make(num_classes, input_shape):
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes))
"""


def test_unknown_facts_are_shown_as_unknown_not_as_their_placeholder(run_cli, tmp_path, monkeypatch):
    (tmp_path / "gitool_inspect_net.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.nn.functional.cross_entropy(net(torch.rand(2, 3, 2, 2)), torch.tensor([0, 1])).backward()
    torch.save(before, "before.pt")
    torch.save({n: p.grad for n, p in net.named_parameters()}, "grad.pt")
    model = ["--model", "gitool_inspect_net:make"]
    done = run_cli("import", *model, "-K", "3", "--image-size", "3x2x2", "--before", "before.pt", "--grad", "grad.pt",
                   "-B", "2", "-o", "u.update.safetensors")
    assert done.exit_code == 0, done.stderr

    from gitool import models

    monkeypatch.setattr(models, "_TRUSTED_FACTORIES", set())  # a later command, without --model
    shown = run_cli("inspect", "u.update.safetensors", "--json").json()
    training = shown["metadata"]["training"]
    assert training["weight_decay"] == training["model_mode"] == training["lr"] == "unknown"
    assert training["batch_size"] == 2 and shown["metadata"]["loss"]["family"] == "unknown"
    assert shown["problem"] is None  # nothing wrong with the file ...
    assert "(--model gitool_inspect_net:make)" in shown["unchecked"]  # ... but its model was not run
    shown = run_cli("inspect", "u.update.safetensors", *model, "--json").json()
    assert shown["problem"] is None and shown["unchecked"] is None
    monkeypatch.setattr(models, "_TRUSTED_FACTORIES", set())
    text = run_cli("inspect", "u.update.safetensors")
    assert "'weight_decay': 'unknown'" in text.stdout and "refuse" not in text.stderr
    assert text.stderr.startswith("warning: not checked against its model: gitool_inspect_net:make is a user factory")
