"""Analytic inversion of fully-connected layers (Wang, Liang, He, ICLR 2024; methods.md section 1).

Symbols: a linear layer maps its input x (d_in) to z = W x + b (d_out), then A = sigma(z)
feeds the next layer. delta = dL/dz. For one sample the weight gradient is the outer
product G = delta x^T, so every row k with delta[k] != 0 gives x = G[k, :] / delta[k]. The
least-squares combination of all rows (weighted by delta[k]^2) is x = G^T delta / ||delta||^2.

For a batch of B samples whose loss is the mean, G = sum_n delta_n x_n^T with delta_n already
divided by B. With the per-sample deltas stacked as the rows of Delta (B x d_out), the
unknown inputs X (B x d_in) satisfy Delta^T X = G: a least-squares problem with a B x B
normal matrix Delta Delta^T, solvable when the B deltas are linearly independent.

Going down: delta_l = (W_{l+1}^T delta_{l+1}) * sigma'(A_l), with sigma' written in terms of
the layer's OUTPUT A_l, which is the recovered input of layer l + 1, so no pre-activation
is ever needed (ReLU works). Everything here is pure tensor math in the caller's dtype
(float64 for exactness); no I/O.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from gitool.attacks.errors import AttackError

ACTIVATIONS = ("relu", "leakyrelu", "sigmoid", "tanh")

# A recovered ReLU output counts as zero below this fraction of the sample's largest output:
# exact zeros come back as round-off (~1e-16), and a wrong mask would corrupt every layer below.
RELU_ZERO_TOL = 1e-9


def relu_active(output: torch.Tensor, zero_tol: float = RELU_ZERO_TOL) -> torch.Tensor:
    """Where a recovered ReLU output is really positive (relative to each sample's largest)."""
    scale = output.abs().flatten(1).amax(dim=1).view(-1, *([1] * (output.ndim - 1)))
    return output > zero_tol * scale


def activation_derivative(name: str | None, output: torch.Tensor, leaky_slope: float = 0.2) -> torch.Tensor:
    """sigma'(z) written in terms of the activation's output A = sigma(z).

    ReLU 1[A > 0]; LeakyReLU 1 if A >= 0 else slope; sigmoid A (1 - A); tanh 1 - A^2;
    None (no activation) 1.
    """
    if name is None:
        return torch.ones_like(output)
    if name == "relu":
        return relu_active(output).to(output.dtype)
    if name == "leakyrelu":
        return torch.where(output >= 0, torch.ones_like(output), torch.full_like(output, leaky_slope))
    if name == "sigmoid":
        return output * (1 - output)
    if name == "tanh":
        return 1 - output * output
    raise AttackError(f"activation '{name}' is not supported by the analytic inversion")


def activation_inverse(name: str | None, output: torch.Tensor, leaky_slope: float = 0.2
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-activation z = sigma^-1(A) and a mask of the outputs where it is known.

    ReLU is invertible only where A > 0 (there z = A); the other activations everywhere
    (sigmoid and tanh only strictly inside their range).
    """
    if name is None:
        return output, torch.ones_like(output, dtype=torch.bool)
    if name == "relu":
        return output, relu_active(output)
    if name == "leakyrelu":
        return torch.where(output >= 0, output, output / leaky_slope), torch.ones_like(output, dtype=torch.bool)
    if name == "sigmoid":
        known = (output > 0) & (output < 1)
        safe = output.clamp(1e-300, 1 - 1e-16)
        return torch.log(safe) - torch.log1p(-safe), known
    if name == "tanh":
        known = output.abs() < 1
        return torch.atanh(output.clamp(-1 + 1e-16, 1 - 1e-16)), known
    raise AttackError(f"activation '{name}' is not supported by the analytic inversion")


def classifier_deltas(weight: torch.Tensor, bias: torch.Tensor | None, features: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
    """delta of the classifier for each sample, (p_n - y_n) / B with p_n = softmax(W x_n + b).

    The division by B makes sum_n delta_n x_n^T the gradient of the client's mean batch loss.
    """
    logits = features @ weight.T
    if bias is not None:
        logits = logits + bias
    return (torch.softmax(logits, dim=1) - labels) / features.shape[0]


@dataclass
class LinearSolve:
    """One linear layer's recovered inputs with the numbers that say how trustworthy they are."""

    inputs: torch.Tensor  # B x d_in
    rank: int  # numerical rank of the B deltas
    condition: float  # condition number of Delta (B x d_out)
    residual: float  # ||Delta^T X - G|| / ||G||
    equations: int  # rows with a nonzero delta in some sample
    unknowns: int


def invert_linear(weight_grad: torch.Tensor, deltas: torch.Tensor, rank_tol: float = 1e-10,
                  what: str = "linear layer") -> LinearSolve:
    """Recover the inputs X (B x d_in) of a linear layer from G = Delta^T X (G is d_out x d_in).

    Least squares over every row: X = (Delta Delta^T)^-1 Delta G; for one sample this is
    x = G^T delta / ||delta||^2. Raises AttackError when the deltas are (numerically)
    dependent, naming the layer and the counts.
    """
    batch = deltas.shape[0]
    singular = torch.linalg.svdvals(deltas)
    largest = float(singular[0]) if singular.numel() else 0.0
    rank = int((singular > rank_tol * max(largest, 1e-300)).sum()) if largest > 0 else 0
    equations = int((deltas != 0).any(dim=0).sum())
    if rank < batch:
        raise AttackError(
            f"{what}: the {batch} sample delta(s) have rank {rank} ({equations} nonzero rows for "
            f"{batch} x {weight_grad.shape[1]} unknowns); the inputs cannot be separated"
        )
    condition = largest / float(singular[-1])
    gram = deltas @ deltas.T
    inputs = torch.linalg.solve(gram, deltas @ weight_grad)
    # Residual in row blocks: the full d_out x d_in difference would double the memory peak.
    blocks = (slice(start, start + 1024) for start in range(0, weight_grad.shape[0], 1024))
    squared = sum(float(torch.linalg.vector_norm(torch.addmm(weight_grad[rows], deltas[:, rows].T, inputs,
                                                             alpha=-1))) ** 2 for rows in blocks)
    residual = math.sqrt(squared) / max(float(torch.linalg.norm(weight_grad)), 1e-300)
    return LinearSolve(inputs, rank, condition, residual, equations, batch * weight_grad.shape[1])


@dataclass
class LinearLayerData:
    """What the server knows about one hidden linear layer: W (d_out x d_in), its gradient,
    the activation after it (None: none) and the LeakyReLU slope."""

    weight: torch.Tensor
    weight_grad: torch.Tensor
    activation: str | None
    leaky_slope: float = 0.2


MAX_PAIRING_SEARCH = 6  # samples up to which every label-feature pairing is tried


def pair_labels_with_features(weight: torch.Tensor, bias: torch.Tensor | None, weight_grad: torch.Tensor,
                              features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Order the label rows so that sum_n delta_n x_n^T best matches the classifier gradient.

    Labels and features are recovered separately, so their row orders need not agree; the
    update itself decides (no truth involved). Small batches try every order.
    """
    batch = labels.shape[0]

    def residual(order):
        deltas = classifier_deltas(weight, bias, features, labels[list(order)])
        return float((deltas.T @ features - weight_grad).norm() / max(float(weight_grad.norm()), 1e-300))

    orders = itertools.permutations(range(batch)) if batch <= MAX_PAIRING_SEARCH else [tuple(range(batch))]
    best = min(orders, key=residual)
    return labels[list(best)], residual(best)
