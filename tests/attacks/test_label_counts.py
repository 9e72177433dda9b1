"""label_counts: the baselines' math on hand-built gradients with known counts."""

from __future__ import annotations

import pytest
import torch

from gitool.attacks import label_counts as lc


def exact_gradient(counts: list[int], dim: int = 20, seed: int = 0, spread: float = 0.3):
    """The mean last-layer gradient of a batch with the given class counts.

    Features are non-negative (after a ReLU) and probabilities near uniform, as for an
    untrained model. Returns (weight, bias, weight gradient, bias gradient, features)."""
    generator = torch.Generator().manual_seed(seed)
    num_classes = len(counts)
    labels = torch.repeat_interleave(torch.arange(num_classes), torch.tensor(counts))
    features = torch.rand(len(labels), dim, generator=generator, dtype=torch.float64)
    weight = spread * torch.randn(num_classes, dim, generator=generator, dtype=torch.float64) / dim**0.5
    bias = 0.01 * torch.randn(num_classes, generator=generator, dtype=torch.float64)
    probs = torch.softmax(features @ weight.T + bias, dim=1)
    residual = probs - torch.eye(num_classes, dtype=torch.float64)[labels]
    return weight, bias, residual.T @ features / len(labels), residual.mean(dim=0), features


def test_largest_remainder_sums_exactly_and_follows_the_largest_fractions():
    counts = lc.largest_remainder(torch.tensor([1.4, 2.6, -0.5, 1.0]), 5)
    assert counts.tolist() == [1, 3, 0, 1]
    assert int(lc.largest_remainder(torch.tensor([0.2, 0.2, 0.2]), 7).sum()) == 7
    assert lc.largest_remainder(torch.zeros(3), 4).tolist() == [2, 1, 1]  # nothing known: spread evenly


def test_optimizer_coefficients_match_the_closed_forms():
    m, lr = 6, 0.05
    assert torch.allclose(lc.optimizer_response(m, lr, "sgd")[m], torch.ones(m, dtype=torch.float64))
    gamma = 0.9
    expected = torch.tensor([(1 - gamma ** (m - s)) / (1 - gamma) for s in range(m)], dtype=torch.float64)
    assert torch.allclose(lc.optimizer_response(m, lr, "momentum", momentum=gamma)[m], expected)
    mu = 0.5
    expected = torch.tensor([(1 - lr * mu) ** (m - 1 - s) for s in range(m)], dtype=torch.float64)
    assert torch.allclose(lc.optimizer_response(m, lr, "fedprox", prox_mu=mu)[m], expected)
    with pytest.raises(ValueError):
        lc.optimizer_response(m, lr, "adam")


def test_drift_without_gradients_is_weight_decay_only():
    theta = torch.tensor([1.0, -2.0], dtype=torch.float64)
    assert torch.equal(lc.drift_without_gradients(theta, 5, 0.1, "sgd"), torch.zeros(2, dtype=torch.float64))
    drift = lc.drift_without_gradients(theta, 5, 0.1, "sgd", weight_decay=0.01)
    assert torch.allclose(drift, ((1 - 0.1 * 0.01) ** 5 - 1) * theta)


def test_idlg_finds_the_single_label():
    _, _, weight_grad, _, _ = exact_gradient([0, 0, 1, 0, 0])
    assert lc.idlg_label(weight_grad.sum(dim=1)) == 2


def test_yin_finds_distinct_labels():
    _, _, weight_grad, _, _ = exact_gradient([1, 0, 1, 1, 0, 0, 1, 0])
    assert lc.yin_counts(weight_grad, 4).tolist() == [1, 0, 1, 1, 0, 0, 1, 0]


@pytest.mark.parametrize("counts", [[2, 0, 1, 0, 3, 0], [1, 1, 1, 1, 0, 0], [0, 5, 0, 0, 0, 1]])
def test_llg_recovers_repeated_labels_of_an_untrained_model(counts):
    _, _, weight_grad, _, _ = exact_gradient(counts, spread=0.05)
    assert lc.llg_counts(weight_grad.sum(dim=1), sum(counts)).tolist() == counts


def test_llg_plus_with_exact_impact_and_offsets():
    counts = [3, 0, 2, 0, 1, 2]
    weight, bias, weight_grad, _, features = exact_gradient(counts)
    total = sum(counts)
    # Offsets and impact measured on the batch itself (known data in the limit).
    sums = features.sum(dim=1)
    probs = torch.softmax(features @ weight.T + bias, dim=1)
    offsets = (probs * sums[:, None]).mean(dim=0)
    result = lc.llg_counts(weight_grad.sum(dim=1), total, float(-sums.mean()) / total, offsets)
    assert result.tolist() == counts


def test_zlg_with_exact_statistics_recovers_counts():
    counts = [3, 0, 2, 0, 1, 2]
    weight, bias, weight_grad, _, features = exact_gradient(counts, spread=0.05)
    probs = torch.softmax(features @ weight.T + bias, dim=1)
    estimate = lc.zlg_estimate(weight_grad.sum(dim=1), sum(counts), probs.mean(dim=0),
                               float(features.sum(dim=1).mean()))
    assert lc.largest_remainder(estimate, sum(counts)).tolist() == counts


def test_ilrg_recovers_counts_and_fits_its_system():
    counts = [2, 0, 1, 3, 0, 2]
    weight, bias, weight_grad, bias_grad, _ = exact_gradient(counts, spread=0.05)
    estimate, residual = lc.ilrg_estimate(weight, bias, weight_grad, bias_grad, sum(counts))
    assert lc.largest_remainder(estimate, sum(counts)).tolist() == counts
    assert residual < 0.05


def test_off_class_mean_logits_weigh_every_other_class_alike():
    # Class 0 has two samples, class 1 one, class 2 one; logits of 3 outputs.
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0], [0.0, 6.0, 0.0], [9.0, 0.0, 3.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2])
    # E[z | 0] = (2, 3, 4), E[z | 1] = (0, 6, 0), E[z | 2] = (9, 0, 3)
    mu = lc.off_class_mean_logits(logits, labels, 3)
    assert mu.tolist() == [(0 + 9) / 2, (3 + 0) / 2, (4 + 0) / 2]


def test_published_rlu_estimate_is_exact_when_every_sample_has_the_shift_as_softmax():
    # g_b = mean(p - y) = s - n / N when every p equals s: the estimator returns n exactly.
    counts = torch.tensor([5.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    shift = torch.tensor([0.1, 0.4, 0.3, 0.2], dtype=torch.float64)
    bias_grad = shift - counts / 8
    assert torch.allclose(lc.published_rlu_estimate(bias_grad, shift, 8), counts)
    # A confident model: the classes the batch holds have p_y near 1, not s_y, so their
    # gradient entry is near 0 and the estimator sees (almost) none of them.
    confident = torch.tensor([0.02, 0.0, 0.01, 0.0], dtype=torch.float64)
    estimate = lc.published_rlu_estimate(confident, shift, 8)
    assert float(estimate.sum()) == pytest.approx(8) and estimate[1] > estimate[0]


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "fedprox"])
def test_mean_gradient_undoes_one_local_step_exactly(optimizer):
    """One step of any supported optimiser is theta_1 - theta_0 = -eta (g + wd theta_0):
    mean_gradient gives g back to round-off, momentum and the proximal term included."""
    from gitool.attacks.label_counts import mean_gradient

    generator = torch.Generator().manual_seed(0)
    theta0, g = torch.randn(7, 5, generator=generator, dtype=torch.float64), torch.randn(7, 5, generator=generator,
                                                                                           dtype=torch.float64)
    lr, wd = 0.05, 0.01
    delta = -lr * (g + wd * theta0)
    recovered = mean_gradient(delta, theta0, 1, lr, optimizer, momentum=0.9, prox_mu=0.1, weight_decay=wd)
    assert float((recovered - g).abs().max()) < 1e-14
