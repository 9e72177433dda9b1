"""Activation patterns decided from recovered outputs with round-off, and solved for where
the decision is wrong (gitool/attacks/activation_pattern.py)."""

import torch

from gitool.attacks.activation_pattern import decide_pattern, flip_scores, relu_threshold, repair_pattern
from gitool.attacks.analytic_fc import RELU_ZERO_TOL, invert_linear, relu_active

F64 = torch.float64


def recovered_relu_output():
    """A float32-like recovered ReLU output: 40 true zeros carrying +-3e-7 round-off (of the
    largest output), 20 activations, the smallest 2e-5 of the largest."""
    generator = torch.Generator().manual_seed(0)
    truth = torch.zeros(1, 60, dtype=F64)
    truth[0, 40:] = torch.rand(20, dtype=F64, generator=generator) + 0.1
    truth[0, 59] = 1.0
    truth[0, 45] = 2e-5
    noise = torch.zeros_like(truth)
    noise[0, :40] = 3e-7 * (2 * torch.rand(40, dtype=F64, generator=generator) - 1)
    return truth, truth + noise


def test_the_relu_threshold_sits_between_the_round_off_of_zeros_and_small_activations():
    truth, recovered = recovered_relu_output()
    pattern = decide_pattern("relu", recovered, 0.0, RELU_ZERO_TOL)
    assert torch.equal(pattern, (truth > 0).to(F64))
    threshold = float(relu_threshold(recovered, RELU_ZERO_TOL))
    largest_negative = float(-recovered.min())
    assert 3.9 * largest_negative < threshold < 4.1 * largest_negative
    # The fixed float64 rule (1e-9 of the largest) counts every positive round-off as active.
    assert int((relu_active(recovered) != (truth > 0)).sum()) == int((recovered[0, :40] > 1e-9).sum()) > 10


def test_exact_zeros_keep_the_float64_rule():
    output = torch.tensor([[0.0, 0.5, 1e-10, 2e-9, 0.0]], dtype=F64)
    assert decide_pattern("relu", output, 0.0, RELU_ZERO_TOL).tolist() == [[0.0, 1.0, 0.0, 1.0, 0.0]]
    assert decide_pattern("leakyrelu", torch.tensor([[-1.0, 0.0, 2.0]], dtype=F64), 0.2,
                          RELU_ZERO_TOL).tolist() == [[0.2, 1.0, 1.0]]


def linear_case(batch=2, d_in=6, d_out=9):
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(batch, d_in, dtype=F64, generator=generator)
    upstream = torch.randn(batch, d_out, dtype=F64, generator=generator)
    pattern = (torch.rand(batch, d_out, generator=generator) > 0.5).to(F64)
    weight_grad = (upstream * pattern).T @ inputs
    return inputs, upstream, pattern, weight_grad


def test_a_wrong_entry_shows_a_positive_predicted_drop_and_a_right_one_does_not():
    inputs, upstream, pattern, weight_grad = linear_case()
    wrong = pattern.clone()
    wrong[1, 3] = 1 - wrong[1, 3]
    solved = invert_linear(weight_grad, upstream * wrong).inputs
    residual = weight_grad - (upstream * wrong).T @ solved
    change = ((1 - wrong) - wrong) * upstream
    drops = flip_scores("linear", solved, residual, change)
    assert int(drops.flatten().argmax()) == 1 * 9 + 3
    assert float(drops[1, 3]) > 0


def test_repair_flips_the_wrong_entry_and_reaches_round_off():
    inputs, upstream, pattern, weight_grad = linear_case()
    wrong = pattern.clone()
    wrong[0, 5] = 1 - wrong[0, 5]

    def solve(trial):
        solved = invert_linear(weight_grad, upstream * trial)
        return solved.inputs, solved.residual

    start = solve(wrong)
    assert start[1] > 1e-3
    fixed, recovered, residual, flipped = repair_pattern(
        wrong, upstream, 0.0, torch.ones_like(wrong, dtype=torch.bool), solve,
        lambda x, deltas: weight_grad - deltas.T @ x, lambda x, r, e: flip_scores("linear", x, r, e),
        start, limit=1e-13)
    assert torch.equal(fixed, pattern) and flipped == 1
    assert residual < 1e-14
    assert float((recovered - inputs).abs().max()) < 1e-12
