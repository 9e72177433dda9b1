"""Known-answer tests of the per-sample batch math on hand-built last layers.

A case is (W, b, X, Y) with P = softmax(X W^T + b), Delta = (P - Y)/B, G = Delta^T X and
g = Delta^T 1: what one step of the mean cross-entropy on B samples sends."""

from __future__ import annotations

import pytest
import torch

from gitool.attacks import per_sample as ps
from gitool.attacks.errors import AttackError, InputError


def make_batch(classes, k=20, d=64, *, bias=True, eps=0.0, seed=0, mixup=None, repeat_feature=False):
    generator = torch.Generator().manual_seed(seed)
    batch = len(classes)
    weight = torch.randn(k, d, generator=generator, dtype=torch.float64) / d ** 0.5
    b = torch.randn(k, generator=generator, dtype=torch.float64) * 0.1 if bias else None
    features = torch.relu(torch.randn(batch, d, generator=generator, dtype=torch.float64))
    if repeat_feature:
        features[1] = features[0]
    labels = torch.nn.functional.one_hot(torch.tensor(classes), k).to(torch.float64) * (1 - eps) + eps / k
    if mixup is not None:  # sample n mixes with sample n + 1 (mod B), coefficient mixup
        labels = mixup * labels + (1 - mixup) * labels.roll(-1, 0)
    probs = torch.softmax(features @ weight.T + (b if bias else 0), 1)
    delta = (probs - labels) / batch
    return weight, b, delta.T @ features, (delta.sum(0) if bias else None), features, labels


def matched_errors(found, features, labels):
    """Max errors after matching each recovered row to its nearest true feature."""
    order = [int((features - row).norm(dim=1).argmin()) for row in found.features]
    assert sorted(order) == list(range(len(order)))
    return (float((found.features - features[order]).abs().max()),
            float((found.labels - labels[order]).abs().max()))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("classes", [[3, 7], [0, 2, 5, 11, 13, 19, 4, 8], list(range(1, 17))],
                         ids=["B2", "B8", "B16"])
def test_distinct_hard_labels_and_features_are_exact(classes, bias):
    weight, b, grad, bias_grad, features, labels = make_batch(classes, bias=bias)
    found = ps.recover_per_sample(weight, b, grad, bias_grad, len(classes))
    feature_error, label_error = matched_errors(found, features, labels)
    assert feature_error < 1e-11 and label_error == 0.0
    assert found.rank == len(classes) and found.residual < 1e-13 and found.candidates_tried == 1
    assert sorted(found.classes) == sorted(classes) and found.repeated == []
    # the softmax outputs are the model's on the recovered features
    recomputed = torch.softmax(found.features @ weight.T + (b if bias else 0), 1)
    assert float((recomputed - found.softmax).abs().max()) < 1e-14


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_a_repeated_label_is_separated_when_the_features_differ(bias):
    weight, b, grad, bias_grad, features, labels = make_batch([5, 5, 9, 14], bias=bias, seed=2)
    found = ps.recover_per_sample(weight, b, grad, bias_grad, 4)
    feature_error, label_error = matched_errors(found, features, labels)
    assert feature_error < 1e-10 and label_error == 0.0
    assert found.repeated == [5] and found.candidates_tried > 1


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_label_smoothing_is_fitted_with_one_eps(bias):
    weight, b, grad, bias_grad, features, labels = make_batch([1, 6, 12, 17], bias=bias, eps=0.1, seed=3)
    found = ps.recover_per_sample(weight, b, grad, bias_grad, 4, family="smoothing")
    feature_error, label_error = matched_errors(found, features, labels)
    assert feature_error < 1e-11 and label_error < 1e-13
    assert abs(found.label_smoothing - 0.1) < 1e-13
    with pytest.raises(AttackError, match="no hard label set"):  # the hard prior cannot fit them
        ps.recover_per_sample(weight, b, grad, bias_grad, 4, family="hard")


def test_mixup_is_refused_not_answered_wrongly():
    weight, b, grad, bias_grad, _, _ = make_batch([1, 6, 12, 17], mixup=0.7, seed=4)
    with pytest.raises(AttackError, match="no smoothing label set .* mixup"):
        ps.recover_per_sample(weight, b, grad, bias_grad, 4, family="smoothing")


def test_refusals_name_the_condition():
    weight, b, grad, bias_grad, _, _ = make_batch(list(range(10)), k=10)
    with pytest.raises(AttackError, match=r"B = 10 > K - 1 = 9"):
        ps.recover_per_sample(weight, b, grad, bias_grad, 10)
    weight, b, grad, bias_grad, _, _ = make_batch([2, 2, 7], repeat_feature=True)
    with pytest.raises(AttackError, match=r"rank deficient: dL/dW has rank 2 < B = 3"):
        ps.recover_per_sample(weight, b, grad, bias_grad, 3)
    weight, b, grad, bias_grad, _, _ = make_batch([2, 4, 7])
    with pytest.raises(AttackError, match=r"rank 3 > B = 2: not the gradient of one step"):
        ps.recover_per_sample(weight, b, grad, bias_grad, 2)
    weight, b, grad, bias_grad, _, _ = make_batch([2, 4, 7], d=2)
    with pytest.raises(AttackError, match=r"B = 3 > d = 2"):
        ps.recover_per_sample(weight, b, grad, bias_grad, 3)
    with pytest.raises(InputError, match="family"):
        ps.recover_per_sample(weight, b, grad, bias_grad, 3, family="mixup")


def test_features_from_labels_and_softmax():
    weight, b, grad, bias_grad, features, labels = make_batch([0, 3, 9])
    probs = torch.softmax(features @ weight.T + b, 1)
    recovered, residual = ps.features_from_labels(grad, labels, probs)
    assert float((recovered - features).abs().max()) < 1e-12 and residual < 1e-14
    with pytest.raises(AttackError, match="rank 0 < B = 3"):
        ps.features_from_labels(grad, labels, labels)  # P = Y: every delta is zero
