"""Known-answer tests of the single-sample soft-label math on hand-built last layers.

A case is (W, b, x, y) with p = softmax(W x + b), G = (p - y) x^T and g = p - y, so the true
lambda for row r is 1 / (p_r - y_r) and the true feature is x."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gitool.attacks import soft_label as sl
from gitool.attacks.errors import AttackError, InputError


def make_case(label: torch.Tensor, *, bias: bool = False, confident: float = 0.0, seed: int = 0, d: int = 24,
              dtype=torch.float64, boost: int | None = None):
    """A last layer and one sample's gradient. ``confident`` > 0 mimics a trained model: the
    largest class of the label (or class ``boost``) gets a logit margin of about that size."""
    generator = torch.Generator().manual_seed(seed)
    k = label.numel()
    weight = torch.rand(k, d, generator=generator, dtype=torch.float64) - 0.5
    feature = torch.rand(d, generator=generator, dtype=torch.float64)
    b = (torch.rand(k, generator=generator, dtype=torch.float64) - 0.5) if bias else None
    if confident:
        weight[int(label.argmax()) if boost is None else boost] += confident * feature / (feature @ feature)
    logits = weight @ feature + (b if b is not None else 0)
    probs = torch.softmax(logits, dim=0)
    weight_grad = torch.outer(probs - label, feature).to(dtype).to(torch.float64)
    bias_grad = (probs - label).to(dtype).to(torch.float64)
    return {"weight": weight, "bias": b, "feature": feature, "label": label, "probs": probs,
            "weight_grad": weight_grad, "bias_grad": bias_grad}


def smoothed(k: int, target: int, eps: float) -> torch.Tensor:
    return (1 - eps) * torch.eye(k, dtype=torch.float64)[target] + eps / k


def mixed(k: int, a: int, b: int, coef: float) -> torch.Tensor:
    eye = torch.eye(k, dtype=torch.float64)
    return (1 - coef) * eye[a] + coef * eye[b]


def true_lambda(case, row: int) -> float:
    return 1.0 / float(case["probs"][row] - case["label"][row])


CASES = [
    ("hard", smoothed(10, 3, 0.0)),
    ("smoothing", smoothed(10, 7, 0.1)),
    ("smoothing", smoothed(10, 0, 0.5)),
    ("smoothing", smoothed(100, 42, 0.3)),
    ("mixup", mixed(10, 2, 5, 0.2)),
    ("mixup", mixed(10, 9, 1, 0.5)),
    ("mixup", mixed(10, 4, 6, 0.7)),
    ("mixup", mixed(100, 10, 90, 0.35)),
]


@pytest.mark.parametrize("confident", [0.0, 14.0], ids=["untrained", "trained"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("family,label", CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_lambda_search_recovers_label_lambda_and_feature(family, label, bias, confident):
    case = make_case(label, bias=bias, confident=confident, seed=len(family))
    result = sl.recover_soft_label(case["weight"], case["weight_grad"], case["bias"])
    assert float((result.label - label).abs().max()) < 1e-10
    assert result.lam == pytest.approx(true_lambda(case, result.row), rel=1e-9)
    assert float((result.feature - case["feature"]).norm() / case["feature"].norm()) < 1e-10
    assert result.residual < 1e-9 and result.converged and not result.ambiguous  # p_t - y_t cancels when confident
    description = result.description
    if family == "mixup":
        coef = float(label.sort(descending=True).values[1])
        assert result.prior == "mixup" and description["family"] == "mixup"
        assert set(description["mixup_classes"]) == set(torch.nonzero(label > 0).flatten().tolist())
        assert description["mixup_coef"] == pytest.approx(coef, abs=1e-10)
    else:
        assert result.prior == "smoothing" and description["family"] == family
        assert description["target"] == int(label.argmax())
        assert description["label_smoothing"] == pytest.approx(float(label.min()) * label.numel(), abs=1e-10)


def test_trained_confidence_puts_lambda_far_out_and_the_scan_still_finds_it():
    case = make_case(smoothed(10, 3, 0.0), confident=25.0)
    lam = true_lambda(case, 3)
    assert abs(lam) > 1e5  # p_t = 1 - 1e-5: the published search (|s| <= 70) cannot reach it
    result = sl.recover_soft_label(case["weight"], case["weight_grad"], family="hard")
    assert result.lam == pytest.approx(lam, rel=1e-9)
    assert result.description["family"] == "hard"


def test_float32_gradient_degrades_to_float32_precision_only():
    label = mixed(10, 1, 8, 0.3)
    case = make_case(label, dtype=torch.float32)
    result = sl.recover_soft_label(case["weight"], case["weight_grad"])
    error = float((result.label - label).abs().max())
    assert 1e-12 < error < 1e-5
    assert result.converged  # loss at float32 round-off, below FIT_TOLERANCE


def test_lambda_of_exactly_one_survives_float32_round_off():
    # the model puts all its mass on class 0, the label is class 3: p_3 - y_3 = -1, |lambda| = 1
    label = smoothed(10, 3, 0.0)
    case = make_case(label, confident=40.0, boost=0, dtype=torch.float32)
    result = sl.recover_soft_label(case["weight"], case["weight_grad"])
    assert abs(abs(result.lam) - 1) < 1e-5
    assert float((result.label - label).abs().max()) < 1e-5


def test_the_asymptote_scores_worst_and_is_not_accepted():
    case = make_case(smoothed(10, 2, 0.0), seed=3)
    family = sl.lambda_family(case["weight"], case["weight_grad"])
    lam = true_lambda(case, family.row)
    far = np.array([lam * 100, lam * 1e4])
    # the paper's absolute variance is tiny out there, the scale-free loss is ~1 (its maximum)
    paper_variance = np.sort(sl.labels_at(family, far), axis=1)[:, :-1].var(axis=1)
    assert paper_variance.max() < 1e-3
    assert sl.structure_loss(family, far, 1).min() > 0.9
    edge = sl.assess(family, 0.9995 * 1e4, 1, bound=1e4)
    assert not edge.valid and "asymptote" in edge.why_not
    result = sl.scan_lambda(family, (1,))[1]
    assert all(abs(c.lam) < 1e3 for c in result.candidates if c.valid)


def test_valley_walls_stay_visible_on_confident_models():
    # 0.1% off lambda*: the paper's variance is ~1e-14 on a confident model (no valley to see
    # against an absolute threshold), the scale-free loss stays well above round-off
    for confident, paper_max in ((0.0, 1.0), (20.0, 1e-12)):
        case = make_case(smoothed(10, 5, 0.0), confident=confident, seed=4)
        family = sl.lambda_family(case["weight"], case["weight_grad"])
        near = true_lambda(case, family.row) * np.array([0.999, 1.001])
        paper_variance = np.sort(sl.labels_at(family, near), axis=1)[:, :-1].var(axis=1)
        assert paper_variance.max() < paper_max
        assert sl.structure_loss(family, near, 1).min() > 1e-4


def test_zero_gradient_is_a_clear_error():
    case = make_case(smoothed(10, 1, 0.1))
    with pytest.raises(AttackError, match="p = y, nothing to recover"):
        sl.recover_soft_label(case["weight"], torch.zeros_like(case["weight_grad"]))
    with pytest.raises(AttackError, match="nothing to recover"):
        sl.recover_with_bias(case["weight"], torch.zeros(10, dtype=torch.float64),
                             torch.zeros_like(case["weight_grad"]), torch.zeros(10, dtype=torch.float64))


def test_a_label_of_neither_family_is_reported():
    label = torch.tensor([0.45, 0.25, 0.15, 0.1, 0.05, 0, 0, 0, 0, 0], dtype=torch.float64)
    case = make_case(label, seed=5)
    with pytest.raises(AttackError, match="fits neither label family"):
        sl.recover_soft_label(case["weight"], case["weight_grad"])


def test_too_few_classes_for_a_prior_is_a_usage_error():
    case = make_case(mixed(3, 0, 1, 0.3))
    with pytest.raises(InputError, match="at least 4 classes"):
        sl.recover_soft_label(case["weight"], case["weight_grad"], family="mixup")


def test_saturated_softmax_is_flagged_not_guessed():
    # logits of size ~1e4: p is one-hot on class 0, the sample is a mixup of 0 and 4, so every
    # lambda >= 1 explains the gradient with the mixup prior (methods.md: the family is flat)
    case = make_case(mixed(10, 0, 4, 0.43), confident=1e4)
    with pytest.raises(AttackError, match="does not determine the label"):
        sl.recover_soft_label(case["weight"], case["weight_grad"], family="mixup")
    result = sl.recover_soft_label(case["weight"], case["weight_grad"], family="auto")
    assert result.ambiguous and any("ambiguous" in w for w in result.warnings)


def test_bias_path_is_exact():
    label = smoothed(10, 6, 0.25)
    case = make_case(label, bias=True, confident=8.0)
    recovered, feature, residual = sl.recover_with_bias(case["weight"], case["bias"], case["weight_grad"],
                                                        case["bias_grad"])
    assert float((recovered - label).abs().max()) < 1e-12
    assert float((feature - case["feature"]).norm() / case["feature"].norm()) < 1e-12
    assert residual < 1e-13


def test_feature_for_a_given_label_finds_the_lambda_that_explains_it():
    label = smoothed(10, 4, 0.2)
    case = make_case(label)
    feature, lam = sl.feature_for_label(case["weight"], case["weight_grad"], label)
    assert float((feature - case["feature"]).norm() / case["feature"].norm()) < 1e-10
    residual = sl.gradient_residual(case["weight"], None, case["weight_grad"], feature, label)
    assert residual < 1e-12
    wrong = smoothed(10, 4, 0.4)
    feature, _ = sl.feature_for_label(case["weight"], case["weight_grad"], wrong)
    assert sl.gradient_residual(case["weight"], None, case["weight_grad"], feature, wrong) > 1e-3


def test_pso_in_the_papers_manner_finds_an_untrained_label(tmp_path, monkeypatch):
    import logging

    monkeypatch.chdir(tmp_path)
    handlers = list(logging.getLogger().handlers)
    label = mixed(10, 3, 8, 0.3)
    case = make_case(label, seed=2)
    result = sl.recover_soft_label(case["weight"], case["weight_grad"], family="mixup", search="pso", seed=0)
    assert float((result.label - label).abs().max()) < 1e-3
    assert sl.pso_intervals(2.0, 1e3)[:4] == [(0.7, 6.0), (-6.3, -1.0), (5.7, 10.0), (-10.3, -6.0)]
    # pyswarms' reporter would add a root handler and write report.log into the working folder
    assert logging.getLogger().handlers == handlers and not (tmp_path / "report.log").exists()


def test_describe_label():
    assert sl.describe_label(smoothed(5, 2, 0.5).numpy(), "smoothing") == pytest.approx(
        {"family": "smoothing", "target": 2, "label_smoothing": 0.5, "confidence": 0.6})
    described = sl.describe_label(mixed(5, 1, 3, 0.25).numpy(), "mixup")
    assert described["mixup_classes"] == [1, 3] and described["mixup_coef"] == pytest.approx(0.25)


@pytest.mark.parametrize("noise", [1e-4, 1e-2])
def test_noisy_gradient_degrades_gracefully_and_says_so(noise):
    label = smoothed(10, 3, 0.1)
    case = make_case(label, seed=1)
    gradient = case["weight_grad"]
    generator = torch.Generator().manual_seed(0)
    scale = noise * gradient.norm() / gradient.numel() ** 0.5
    noisy = gradient + scale * torch.randn(gradient.shape, generator=generator, dtype=torch.float64)
    result = sl.recover_soft_label(case["weight"], noisy)
    assert float((result.label - label).abs().max()) < noise  # least squares over all rows averages noise out
    assert result.residual == pytest.approx(noise, rel=0.2)
    assert not result.converged and any("approximate fit" in w for w in result.warnings)
