"""Pure math of the fully-connected inversion (gitool.attacks.analytic_fc), float64."""

import pytest
import torch

from gitool.attacks.analytic_fc import (
    activation_derivative,
    activation_inverse,
    classifier_deltas,
    invert_linear,
)
from gitool.attacks.errors import AttackError

F64 = torch.float64


def test_one_sample_input_is_exact_from_the_outer_product():
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(1, 50, dtype=F64, generator=generator)
    delta = torch.randn(1, 7, dtype=F64, generator=generator)
    delta[0, :3] = 0  # rows without signal are simply left out of the least squares
    solve = invert_linear(delta.T @ x, delta)
    assert (solve.inputs - x).abs().max() < 1e-14
    assert solve.rank == 1 and solve.equations == 4 and solve.unknowns == 50


def test_batch_with_independent_deltas_is_separated_exactly():
    generator = torch.Generator().manual_seed(2)
    inputs = torch.rand(3, 40, dtype=F64, generator=generator)
    deltas = torch.randn(3, 9, dtype=F64, generator=generator)
    solve = invert_linear(deltas.T @ inputs, deltas)
    assert (solve.inputs - inputs).abs().max() < 1e-12
    assert solve.residual < 1e-14


def test_dependent_deltas_refuse_with_the_counts():
    deltas = torch.tensor([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0]], dtype=F64)
    gradient = deltas.T @ torch.rand(2, 5, dtype=F64)
    with pytest.raises(AttackError, match=r"layer 3: the 2 sample delta\(s\) have rank 1 \(2 nonzero rows for 2 x 5"):
        invert_linear(gradient, deltas, what="layer 3")


@pytest.mark.parametrize("name,module", [
    ("relu", torch.nn.ReLU()),
    ("leakyrelu", torch.nn.LeakyReLU(0.2)),
    ("sigmoid", torch.nn.Sigmoid()),
    ("tanh", torch.nn.Tanh()),
])
def test_derivative_from_the_output_matches_autograd(name, module):
    z = torch.linspace(-3, 3, 41, dtype=F64).requires_grad_()
    z_values = z.detach().clone()
    z_values[20] = 0.5  # keep away from the ReLU kink at exactly 0
    z = z_values.requires_grad_()
    output = module(z)
    (autograd,) = torch.autograd.grad(output.sum(), z)
    derived = activation_derivative(name, output.detach().unsqueeze(0), 0.2)[0]
    assert torch.allclose(derived, autograd, atol=1e-15)
    pre, known = activation_inverse(name, output.detach().unsqueeze(0), 0.2)
    assert torch.allclose(pre[0][known[0]], z_values[known[0]], atol=1e-12)
    assert int(known.sum()) == (int((z_values > 0).sum()) if name == "relu" else 41)


def test_relu_mask_ignores_round_off_around_zero():
    output = torch.tensor([[2.0, 1e-16, -1e-16, 0.0, 0.5]], dtype=F64)
    assert activation_derivative("relu", output).tolist() == [[1.0, 0.0, 0.0, 0.0, 1.0]]


def test_classifier_delta_is_the_gradient_of_the_mean_soft_cross_entropy():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(4, 6, dtype=F64, generator=generator)
    bias = torch.randn(4, dtype=F64, generator=generator)
    features = torch.rand(2, 6, dtype=F64, generator=generator)
    labels = torch.tensor([[0.9, 0.1, 0, 0], [0, 0, 0.25, 0.75]], dtype=F64)
    logits = (features @ weight.T + bias).requires_grad_()
    loss = -(labels * torch.log_softmax(logits, dim=1)).sum(1).mean()
    (expected,) = torch.autograd.grad(loss, logits)
    assert torch.allclose(classifier_deltas(weight, bias, features, labels), expected, atol=1e-16)
