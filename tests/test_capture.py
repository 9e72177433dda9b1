"""capture: the sent gradient is autograd's, the sent delta is the simulated training's."""

from __future__ import annotations

import pytest
import torch

from gitool.capture import CaptureConfig, SampleChoice, soft_cross_entropy
from gitool.errors import UsageError
from gitool.files import DefenceSpec, InputSpec, LossSpec, TrainingSpec
from gitool.models import ModelSpec

SMALL_LENET = ModelSpec(name="lenet", num_classes=10, input_shape=(3, 16, 16))


def _recompute_gradient(update, truth):
    model = update.build_model(dtype=truth.inputs.dtype)
    loss = soft_cross_entropy(model(truth.inputs), truth.labels)
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return dict(zip(names, grads))


@pytest.mark.parametrize("family", ["hard", "smoothing", "mixup"])
def test_gradient_equals_autograd_for_the_recorded_batch(capture_factory, family):
    loss = {
        "hard": LossSpec(),
        "smoothing": LossSpec(family="smoothing", label_smoothing_range=(0.0, 0.5)),
        "mixup": LossSpec(family="mixup", mixup_alpha=1.0),
    }[family]
    config = CaptureConfig(loss=loss, training=TrainingSpec(batch_size=4, dtype="float64"),
                           input=InputSpec(shape=(3, 16, 16)), seed=5)
    update, truth = capture_factory(spec=SMALL_LENET, config=config)
    assert update.kind == "gradient"
    assert truth.images.shape == (4, 3, 16, 16)
    assert torch.allclose(truth.labels.sum(1), torch.ones(4, dtype=torch.float64))
    expected = _recompute_gradient(update, truth)
    for name, grad in expected.items():
        assert torch.allclose(update.values[name], grad, rtol=0, atol=1e-13), name
    if family == "mixup":
        assert (truth.targets[:, 0] != truth.targets[:, 1]).all()
        coef = truth.mix_coef
        rebuilt = (1 - coef)[:, None] * torch.eye(10, dtype=torch.float64)[truth.targets[:, 0]] \
            + coef[:, None] * torch.eye(10, dtype=torch.float64)[truth.targets[:, 1]]
        assert torch.allclose(rebuilt, truth.labels)
    if family == "smoothing":
        eps = truth.label_smoothing
        assert (eps >= 0).all() and (eps <= 0.5).all() and eps.std() > 0
        assert torch.allclose(truth.labels.max(1).values, 1 - eps + eps / 10)


@pytest.mark.parametrize("optimizer,extra", [("sgd", {}), ("momentum", {"momentum": 0.9}),
                                             ("fedprox", {"prox_mu": 0.5})])
def test_delta_equals_weights_after_the_simulated_local_training(capture_factory, optimizer, extra):
    training = TrainingSpec(batch_size=3, steps=4, lr=0.05, optimizer=optimizer, weight_decay=1e-3,
                            dtype="float64", **extra)
    config = CaptureConfig(loss=LossSpec(family="smoothing", label_smoothing=0.1), training=training,
                           input=InputSpec(shape=(3, 16, 16)), seed=2)
    update, truth = capture_factory(spec=SMALL_LENET, config=config)
    assert update.kind == "delta"
    assert truth.inputs.shape[0] == 12 and truth.counts.sum() == 12
    # Replay the client with torch's own SGD (independent of capture's loop).
    model = update.build_model(dtype=torch.float64)
    theta0 = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=extra.get("momentum", 0.0), weight_decay=1e-3)
    for t in range(4):
        rows = slice(3 * t, 3 * t + 3)
        loss = soft_cross_entropy(model(truth.inputs[rows]), truth.labels[rows])
        if optimizer == "fedprox":
            loss = loss + 0.5 / 2 * sum(((p - p0) ** 2).sum() for p, p0 in zip(model.parameters(), theta0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (name, p), p0 in zip(model.named_parameters(), theta0):
        assert torch.allclose(update.values[name], p.detach() - p0, rtol=0, atol=1e-12), name
    assert (truth.step == torch.arange(4).repeat_interleave(3)).all()


def test_dp_and_pruning_change_the_update(capture_factory):
    base = dict(training=TrainingSpec(batch_size=2, dtype="float64"), input=InputSpec(shape=(3, 16, 16)), seed=1)
    clean, _ = capture_factory("clean", spec=SMALL_LENET, config=CaptureConfig(**base))
    pruned, _ = capture_factory("pruned", spec=SMALL_LENET,
                                config=CaptureConfig(defence=DefenceSpec(prune=0.9), **base))
    noisy, _ = capture_factory("noisy", spec=SMALL_LENET,
                               config=CaptureConfig(defence=DefenceSpec(dp_clip=1.0, dp_noise=0.01), **base))
    for name, value in pruned.values.items():
        zero_fraction = float((value == 0).double().mean())
        assert zero_fraction >= 0.89, name
        kept = value != 0
        assert torch.equal(value[kept], clean.values[name][kept])
    total_norm = torch.sqrt(sum((v**2).sum() for v in noisy.values.values()))
    assert noisy.defence.dp_clip == 1.0
    assert not torch.allclose(noisy.values["classifier.weight"], clean.values["classifier.weight"])
    assert float(total_norm) > 0


def test_sample_choice_by_class_indices_and_dirichlet(capture_factory):
    cfg = dict(training=TrainingSpec(batch_size=6), input=InputSpec(shape=(3, 16, 16)))
    _, truth = capture_factory("a", spec=SMALL_LENET,
                               config=CaptureConfig(choice=SampleChoice(classes=[1, 1, 2, 3, 3, 3]), **cfg))
    assert truth.counts.tolist() == [0, 2, 1, 3, 0, 0, 0, 0, 0, 0]
    _, truth = capture_factory("b", spec=SMALL_LENET,
                               config=CaptureConfig(choice=SampleChoice(indices=[0, 1, 2, 3, 4, 5]), **cfg))
    assert truth.meta["indices"] == [0, 1, 2, 3, 4, 5]
    _, truth = capture_factory("c", spec=SMALL_LENET,
                               config=CaptureConfig(choice=SampleChoice(dirichlet_alpha=0.05), **cfg))
    assert int((truth.counts > 0).sum()) <= 3  # a very skewed client uses few classes


def test_impossible_options_are_usage_errors(capture_factory):
    with pytest.raises(UsageError, match="B x m"):
        capture_factory(spec=SMALL_LENET, data="digits",
                        config=CaptureConfig(training=TrainingSpec(batch_size=5000), input=InputSpec((3, 16, 16))))
    with pytest.raises(UsageError, match="fedprox"):
        capture_factory(spec=SMALL_LENET, config=CaptureConfig(
            training=TrainingSpec(optimizer="fedprox"), input=InputSpec((3, 16, 16))))
    with pytest.raises(UsageError):  # one class: no mixup partner, and no classifier
        capture_factory(spec=ModelSpec("lenet", num_classes=1, input_shape=(3, 16, 16)),
                        config=CaptureConfig(loss=LossSpec(family="mixup", mixup_coef=0.3),
                                             input=InputSpec((3, 16, 16))))


@pytest.mark.parametrize("make,message", [
    (lambda: TrainingSpec(lr=float("nan")), "training.lr must be a finite number > 0"),
    (lambda: TrainingSpec(lr=float("inf"), steps=2), "training.lr must be a finite number > 0"),
    (lambda: TrainingSpec(weight_decay=-1.0, steps=2), "training.weight_decay must be >= 0"),
    (lambda: TrainingSpec(optimizer="fedprox", prox_mu=float("nan"), steps=2), "training.prox_mu"),
    (lambda: DefenceSpec(dp_clip=float("nan")), "defence.dp_clip"),
    (lambda: DefenceSpec(dp_clip=1.0, dp_noise=-1.0), "defence.dp_noise"),
])
def test_nan_infinite_and_negative_hyperparameters_are_refused_by_the_spec(make, message):
    """NaN passes every '<= 0' test; such values used to reach the file (and load back as strings).
    Each spec checks its fields when it is made, so no impossible value reaches a capture."""
    from gitool.specs import SpecError

    with pytest.raises(SpecError, match=message):
        make()


@pytest.mark.parametrize("training,defence,choice,message", [
    (TrainingSpec(lr=1e39, steps=2), DefenceSpec(), SampleChoice(), "for float32, got 1e+39"),
    (TrainingSpec(), DefenceSpec(), SampleChoice(dirichlet_alpha=float("nan")), "--dirichlet"),
])
def test_values_the_dtype_or_the_sampler_cannot_take_are_refused(capture_factory, training, defence, choice,
                                                                  message):
    with pytest.raises(UsageError, match=message.replace("+", r"\+")):
        capture_factory(spec=SMALL_LENET, config=CaptureConfig(training=training, defence=defence, choice=choice,
                                                               input=InputSpec((3, 16, 16))))


def test_diverged_training_is_refused_not_written(capture_factory):
    from gitool.errors import GitoolError

    with pytest.raises(GitoolError, match="diverged"):
        capture_factory(spec=SMALL_LENET, config=CaptureConfig(
            training=TrainingSpec(lr=3e38, steps=3), input=InputSpec((3, 16, 16))))


def test_batch_norm_on_one_value_per_channel_is_a_usage_error(capture_factory):
    """ResNet on 8x8 images ends at 1x1; one sample in train mode left torch's ValueError unexplained."""
    spec = ModelSpec("resnet18", num_classes=10, input_shape=(3, 8, 8), options={"width": "1"})
    with pytest.raises(UsageError, match="--mode eval"):
        capture_factory(spec=spec, config=CaptureConfig(input=InputSpec((3, 8, 8))))
    update, _ = capture_factory(spec=spec, config=CaptureConfig(input=InputSpec((3, 8, 8)),
                                                                training=TrainingSpec(model_mode="eval")))
    assert update.training.model_mode == "eval"
