"""A small federated run, captured once per session: two rounds of clients of the kinds an
audit meets (single-sample gradients of a CNN and of a bias-free FCN with label
smoothing, a FedAvg update of several local steps, a DP-SGD batch)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def capture_into(folder: Path, name: str, spec=None, seed: int = 0, provenance: dict | None = None, **config) -> Path:
    """Capture one client round in-process; returns the update's path (truth beside it)."""
    from gitool.capture import CaptureConfig, capture
    from gitool.data import open_source
    from gitool.files import InputSpec, save_capture
    from gitool.models import ModelSpec

    spec = spec or ModelSpec(name="lenet", num_classes=10, input_shape=(3, 16, 16))
    config = CaptureConfig(input=InputSpec(shape=spec.input_shape), seed=seed, **config)
    update, truth = capture(open_source("synthetic", spec.input_shape, num_classes=spec.num_classes), spec, config,
                            provenance={"data": "synthetic", **(provenance or {})})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.update.safetensors"
    save_capture(update, truth, path, folder / f"{name}.truth.safetensors")
    return path


def fcn_spec():
    from gitool.models import ModelSpec

    return ModelSpec(name="fcn4", num_classes=10, input_shape=(3, 8, 8), last_bias=False,
                     options={"widths": "64,32,16", "hidden_bias": "false"})


@pytest.fixture(scope="session")
def federated_run(tmp_path_factory) -> Path:
    """runs/round-1/{0000,0001} (LeNet, one sample, float64), runs/round-2/{client-1 (FCN-4
    without biases, label smoothing 0.1, float64), client-2 (LeNet, B = 4, 3 local steps),
    client-3 (LeNet, B = 4, DP-SGD clip 1 noise 0.5)}."""
    from gitool.files import DefenceSpec, LossSpec, TrainingSpec

    root = tmp_path_factory.mktemp("audit") / "runs"
    one = TrainingSpec(dtype="float64")
    capture_into(root / "round-1", "0000", seed=1, training=one)
    capture_into(root / "round-1", "0001", seed=2, training=one)
    capture_into(root / "round-2", "client-1", spec=fcn_spec(), seed=3, training=one, init="default",
                 loss=LossSpec(family="smoothing", label_smoothing=0.1))
    capture_into(root / "round-2", "client-2", seed=4, training=TrainingSpec(batch_size=4, steps=3), init="default")
    capture_into(root / "round-2", "client-3", seed=5, training=TrainingSpec(batch_size=4),
                 defence=DefenceSpec(dp_clip=1.0, dp_noise=0.5))
    return root


@pytest.fixture
def run_copy(federated_run, tmp_path) -> Path:
    """A private copy of the run, for tests that change its files."""
    target = tmp_path / "runs"
    shutil.copytree(federated_run, target)
    return target
