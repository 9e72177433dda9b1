"""gitool.private_batch and `gitool truth`: a truth file from the client's own tensors."""

from __future__ import annotations

import pytest
import torch

from gitool.capture import CaptureConfig
from gitool.errors import GitoolError, UsageError
from gitool.files import InputSpec, LossSpec, TrainingSpec, load_truth
from gitool.models import ModelSpec
from gitool.private_batch import describe_replay, private_batch, truth_from_private_batch

LENET = ModelSpec(name="lenet", num_classes=10, input_shape=(3, 16, 16))


def fedavg_capture(capture_factory, loss=None, dtype="float32"):
    """A 3-step momentum client with weight decay and a normalisation: every fact matters."""
    training = TrainingSpec(batch_size=2, steps=3, lr=0.05, optimizer="momentum", momentum=0.9, weight_decay=1e-3,
                            dtype=dtype)
    config = CaptureConfig(training=training, loss=loss or LossSpec(), seed=3,
                           input=InputSpec(shape=LENET.input_shape, mean=(0.5,), std=(0.25,)))
    return capture_factory("c", spec=LENET, config=config)


def test_the_truth_of_a_capture_is_rebuilt_from_its_batch(capture_factory, tmp_path):
    update, truth = fedavg_capture(capture_factory, LossSpec(family="smoothing", label_smoothing=0.1))
    torch.save({"images": truth.images, "labels": truth.labels}, tmp_path / "private.pt")
    made, error = truth_from_private_batch(update, tmp_path / "private.pt")
    assert error < 1e-6  # float32: replayed with the capture's own arithmetic
    for name in ("images", "inputs", "labels", "targets", "counts", "step"):
        assert torch.equal(getattr(made, name).to(getattr(truth, name).dtype), getattr(truth, name)), name
    torch.testing.assert_close(made.features, truth.features, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(made.label_smoothing, truth.label_smoothing.to(torch.float64), rtol=0, atol=1e-6)
    assert made.meta["update"]["sha256"] == update.sha256 and made.meta["replay_error"] == error
    assert describe_replay(update, error).startswith("the private batch replays the update")


def test_samples_out_of_step_order_are_reported(capture_factory, tmp_path):
    update, truth = fedavg_capture(capture_factory)
    order = torch.tensor([2, 3, 0, 1, 4, 5])  # steps 1 and 2 swapped
    torch.save({"inputs": truth.inputs[order], "labels": truth.targets[order, 0]}, tmp_path / "private.pt")
    _, error = truth_from_private_batch(update, tmp_path / "private.pt")
    assert error > 1e-3
    assert describe_replay(update, error).startswith("warning: replaying the local training")


def test_class_indices_follow_the_label_family(capture_factory):
    update, truth = fedavg_capture(capture_factory, LossSpec(family="smoothing", label_smoothing=0.2))
    batch = private_batch(update, {"images": truth.images, "labels": truth.targets[:, 0]}, "p")
    torch.testing.assert_close(batch.labels, truth.labels.to(torch.float64))
    assert torch.allclose(batch.label_smoothing, torch.full((6,), 0.2, dtype=torch.float64))
    # inputs instead of images: the images come back through the normalisation
    batch = private_batch(update, {"inputs": truth.inputs, "labels": truth.targets[:, 0]}, "p")
    torch.testing.assert_close(batch.images, truth.images.to(torch.float64), rtol=0, atol=1e-6)


def test_mixup_needs_soft_labels_and_gives_both_classes(capture_factory):
    update, truth = fedavg_capture(capture_factory, LossSpec(family="mixup", mixup_coef=0.3))
    with pytest.raises(GitoolError, match="trained with mixup labels that class indices cannot describe"):
        private_batch(update, {"images": truth.images, "labels": truth.targets[:, 0]}, "p")
    batch = private_batch(update, {"images": truth.images, "labels": truth.labels}, "p")
    assert torch.equal(batch.targets, truth.targets)
    torch.testing.assert_close(batch.mix_coef, truth.mix_coef.to(torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("tensors,message", [
    ({"labels": torch.zeros(6, dtype=torch.int64)}, "give exactly one of 'images'"),
    ({"images": torch.rand(5, 3, 16, 16), "labels": torch.zeros(5, dtype=torch.int64)},
     r"'images' is float32 of shape 5 x 3 x 16 x 16, expected floats of 6 x 3 x 16 x 16 \(B x m = 2 x 3"),
    ({"images": torch.rand(6, 3, 16, 16) * 2, "labels": torch.zeros(6, dtype=torch.int64)},
     "save what the model saw as 'inputs' instead"),
    ({"images": torch.rand(6, 3, 16, 16), "labels": torch.full((6,), 10)}, r"classes outside 0\.\.9"),
    ({"images": torch.rand(6, 3, 16, 16), "labels": torch.full((6, 10), 0.2)}, "rows that sum to 1"),
    ({"images": torch.rand(6, 3, 16, 16)}, "no 'labels'"),
])
def test_bad_batches_are_one_line(capture_factory, tensors, message):
    update, _ = fedavg_capture(capture_factory)
    with pytest.raises(GitoolError, match=message):
        private_batch(update, tensors, "p")


def test_truth_command_and_the_facts_it_needs(run_cli, capture_factory, tmp_path):
    update, truth = fedavg_capture(capture_factory)
    torch.save({"images": truth.images, "labels": truth.targets[:, 0]}, tmp_path / "private.pt")
    out = tmp_path / "mine.truth.safetensors"
    result = run_cli("truth", update.path, "--private", tmp_path / "private.pt", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["replays"] and load_truth(out).meta["private"]["path"] == str(tmp_path / "private.pt")
    # an import that does not say the optimiser: the replay cannot run, and says what it needs
    run_cli("export", update.path, "-o", tmp_path / "e.pt")
    imported = tmp_path / "i.update.safetensors"
    assert run_cli("import", "--model", "lenet", "--image-size", "3x16x16", "--before", tmp_path / "e.pt",
                   "--delta", tmp_path / "e.pt", "-B", "2", "--steps", "3", "--hard-labels",
                   "-o", imported).exit_code == 0
    refused = run_cli("truth", imported, "--private", tmp_path / "private.pt", "-o", tmp_path / "t.safetensors")
    assert refused.exit_code == 2
    assert ("gitool truth (it replays the client's local training) needs training facts the update" in refused.stderr
            and "lr (--lr), optimizer (--optimizer), weight_decay (--weight-decay)" in refused.stderr)
    with pytest.raises(UsageError):  # the library says the same
        from gitool.files import load_update

        truth_from_private_batch(load_update(imported), tmp_path / "private.pt")
