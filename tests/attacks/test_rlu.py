"""RLU's pieces: the bias system, the constrained NNLS, the drift simulation."""

from __future__ import annotations

import copy

import pytest
import torch

from gitool.attacks import label_counts as lc
from gitool.attacks import rlu


def test_bias_system_columns_sum_to_zero_and_nnls_recovers_exact_counts():
    generator = torch.Generator().manual_seed(3)
    confidence = torch.softmax(torch.randn(6, 6, generator=generator, dtype=torch.float64), dim=1)
    system = rlu.bias_system(confidence)
    assert torch.allclose(system.sum(dim=0), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    counts = torch.tensor([4.0, 0, 2, 0, 7, 1], dtype=torch.float64)
    estimate, residual = rlu.solve_counts_nnls(system, system @ counts, 14)
    assert torch.allclose(estimate, counts, atol=1e-6)
    assert residual < 1e-8


def test_class_confidence_is_the_per_class_mean_softmax():
    probs = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.2, 0.8]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    confidence = rlu.class_confidence(probs, labels, 2)
    assert torch.allclose(confidence, torch.tensor([[0.6, 0.4], [0.2, 0.8]], dtype=torch.float64))


def test_path_fractions_start_at_zero_and_follow_momentum():
    response = lc.optimizer_response(4, 0.1, "sgd")
    assert torch.allclose(rlu.path_fractions(response), torch.tensor([0, 0.25, 0.5, 0.75], dtype=torch.float64))
    accelerating = rlu.path_fractions(lc.optimizer_response(4, 0.1, "momentum", momentum=0.9))
    assert accelerating[0] == 0 and accelerating[1] < 0.25  # momentum starts slowly


def test_calibrate_is_exact_at_both_ends():
    simulated = [torch.full((2, 2), float(s)) for s in range(4)]
    start, end = torch.full((2, 2), 1.0), torch.full((2, 2), 10.0)
    progress = torch.tensor([0.0, 0.2, 0.6, 1.0], dtype=torch.float64)
    calibrated = rlu.calibrate(simulated, progress, start, end)
    assert len(calibrated) == 3
    assert torch.equal(calibrated[0], start)
    # Gaps at the ends (1 - 0 and 10 - 3) spread in proportion to progress.
    assert torch.allclose(calibrated[2], torch.full((2, 2), 2 + 0.4 * 1 + 0.6 * 7))


def test_simulated_drift_with_one_class_raises_its_confidence():
    from gitool.models import ModelSpec, build_model

    torch.manual_seed(0)
    model = build_model(ModelSpec(name="mlp", num_classes=3, input_shape=(1, 4, 4))).double()
    inputs = torch.randn(12, 1, 4, 4, dtype=torch.float64)
    labels = torch.arange(12) % 3
    counts = torch.tensor([20.0, 0.0, 0.0], dtype=torch.float64)
    systems, progress = rlu.simulate_drift(model, inputs, labels, counts, steps=5, batch_size=4, lr=0.5,
                                           optimizer="sgd")
    assert len(systems) == 6 and float(progress[0]) == 0 and float(progress[-1]) == 1
    # A_00 = 1 - S_00 shrinks as the model learns class 0; the model itself is untouched.
    assert systems[-1][0, 0] < systems[0][0, 0]
    assert all(p.grad is None for p in model.parameters())


def test_outputs_with_batch_mix_use_the_mixed_batch_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6),
                                torch.nn.ReLU(), torch.nn.Linear(6, 3)).double().train()
    inputs = torch.randn(30, 1, 2, 2, dtype=torch.float64) + torch.arange(30).remainder(3).view(30, 1, 1, 1)
    labels = torch.arange(30) % 3
    assert rlu.has_batch_statistics(model)
    counts = torch.tensor([20.0, 0.0, 0.0], dtype=torch.float64)  # all of class 0
    probs, _ = rlu.outputs_with_batch_mix(model, inputs, labels, counts, batch_size=10, dtype=torch.float64)
    batch = rlu.mixed_batch(labels, counts, 10)
    assert labels[batch].tolist() == [0] * 10
    with torch.no_grad():
        in_batch = torch.softmax(model(inputs[batch]), dim=1)  # the client's view of that batch
    # Same statistics up to the unbiased/biased variance factor of batch norm (n = 10).
    assert torch.allclose(probs[batch], in_batch, atol=0.02)
    assert model.training and all(p.grad is None for p in model.parameters())


def test_measured_steps_keep_both_ends_and_space_the_rest_evenly():
    assert rlu.measured_steps(10, None) == set(range(11))
    assert rlu.measured_steps(10, 6) == {0, 2, 4, 6, 8, 10}
    assert rlu.measured_steps(3, 6) == {0, 1, 2, 3}
    assert rlu.measured_steps(5, 1) == {0, 5}


def test_interpolated_systems_lie_on_the_line_between_measured_ones():
    first, last = torch.zeros(2, 2, dtype=torch.float64), torch.full((2, 2), 4.0, dtype=torch.float64)
    filled = rlu.interpolate_systems([first, None, None, None, last])
    assert [float(s[0, 0]) for s in filled] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_simulated_drift_with_batch_norm_measures_only_the_asked_points():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6),
                                torch.nn.ReLU(), torch.nn.Linear(6, 3)).double().train()
    inputs = torch.randn(30, 1, 2, 2, dtype=torch.float64)
    labels = torch.arange(30) % 3
    counts = torch.tensor([10.0, 6.0, 4.0], dtype=torch.float64)
    kwargs = dict(steps=4, batch_size=5, lr=0.3, optimizer="sgd", dtype=torch.float64)
    every, progress = rlu.simulate_drift(model, inputs, labels, counts, **kwargs)
    sparse, sparse_progress = rlu.simulate_drift(model, inputs, labels, counts, points=3, **kwargs)
    # Measured steps 0, 2, 4 are exactly the full run's; 1 and 3 are their midpoints.
    for step in (0, 2, 4):
        assert torch.allclose(sparse[step], every[step], atol=1e-12)
    assert torch.allclose(sparse[1], (every[0] + every[2]) / 2, atol=1e-12)
    assert not torch.allclose(sparse[1], every[1], atol=1e-6)  # the path really bends a little
    assert torch.equal(progress, sparse_progress)


def test_effective_fraction_is_the_coefficient_weighted_mean_of_the_step_fractions():
    response = lc.optimizer_response(10, 0.01, "sgd")
    assert rlu.effective_fraction(response, response[10]) == pytest.approx(0.45)
    assert rlu.effective_fraction(lc.optimizer_response(1, 0.01, "sgd"), torch.ones(1)) == 0.0
    momentum = lc.optimizer_response(10, 0.05, "momentum", momentum=0.9)
    assert 0.1 < rlu.effective_fraction(momentum, momentum[10]) < 0.45  # early steps weigh more and sit early


def _tiny_client(optimizer: str, lr: float, momentum: float = 0.0):
    """A 3-class MLP, one auxiliary sample per class, and a client whose 4 batches of 4 are
    copies of those samples: the weighted auxiliary loss is then the client's own loss."""
    from gitool.models import ModelSpec, build_model

    torch.manual_seed(0)
    model = build_model(ModelSpec(name="mlp", num_classes=3, input_shape=(1, 4, 4))).double()
    inputs = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    labels = torch.arange(3)
    kwargs = dict(steps=4, batch_size=4, lr=lr, optimizer=optimizer, momentum=momentum, dtype=torch.float64)
    return model, inputs, labels, kwargs


def test_batch_mixes_split_the_counts_into_batches_of_b():
    counts = torch.tensor([9, 0, 5, 2])
    mixes = rlu.batch_mixes(counts, 4, 4, torch.Generator().manual_seed(1))
    assert mixes.shape == (4, 4)
    assert mixes.sum(dim=1).tolist() == [4, 4, 4, 4]
    assert mixes.sum(dim=0).tolist() == counts.tolist()
    assert torch.equal(mixes, rlu.batch_mixes(counts, 4, 4, torch.Generator().manual_seed(1)))  # seeded


def test_simulated_drift_with_the_client_batches_replays_the_client_path_under_momentum():
    from gitool.capture import local_training
    from gitool.files import DefenceSpec, TrainingSpec
    from gitool.models import forward_with_features

    model, inputs, labels, kwargs = _tiny_client("momentum", 0.5, 0.9)
    mixes = torch.tensor([[4, 0, 0], [3, 1, 0], [1, 1, 2], [2, 2, 0]])
    order = torch.cat([torch.repeat_interleave(torch.arange(3), mix) for mix in mixes])
    true_systems = []

    def measure(step):
        with torch.no_grad():
            logits, features = forward_with_features(client, inputs)
        true_systems.append(rlu.step_system(torch.softmax(logits, dim=1), features, labels, 3))

    client = copy.deepcopy(model)
    training = TrainingSpec(batch_size=4, steps=4, lr=0.5, optimizer="momentum", momentum=0.9, dtype="float64")
    local_training(client, inputs[order], torch.eye(3, dtype=torch.float64)[order], training, DefenceSpec(),
                   "delta", torch.Generator(), before_step=measure)
    simulated, _ = rlu.simulate_drift(model, inputs, labels, mixes, **kwargs)
    for step in range(4):
        assert torch.allclose(simulated[step], true_systems[step], atol=1e-12)
    # The mean batch n / m (the same mix at every step) follows another path.
    mean_path, _ = rlu.simulate_drift(model, inputs, labels, mixes.sum(dim=0), **kwargs)
    assert float((mean_path[3] - true_systems[3]).abs().max()) > 0.01


def test_expected_system_is_the_mean_over_batch_draws_and_not_the_mean_batch_path():
    counts = torch.tensor([10, 4, 2])
    model, inputs, labels, kwargs = _tiny_client("momentum", 0.1, 0.9)
    coefficients = lc.optimizer_response(4, 0.1, "momentum", 0.9)[4]
    generator = torch.Generator().manual_seed(0)
    draws = [rlu.weighted_system(rlu.simulate_drift(model, inputs, labels, rlu.batch_mixes(counts, 4, 4, generator),
                                                    **kwargs)[0][:-1], coefficients) for _ in range(16)]
    expected = rlu.expected_system(draws)
    assert torch.allclose(expected, sum(draws) / 16)
    mean_batch = rlu.weighted_system(rlu.simulate_drift(model, inputs, labels, counts, **kwargs)[0][:-1], coefficients)
    # The path is not linear in the batches: the mean batch's system is off by 0.002 here
    # (LeNet-5 at 52% with lr 0.05, m = 10: enough to cost 0.045 iAcc, see expected_system).
    assert float((expected - mean_batch).abs().max()) == pytest.approx(0.00214, abs=5e-5)
