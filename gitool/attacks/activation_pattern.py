"""The activation pattern of a piecewise-linear activation, decided from a recovered output
and, where round-off leaves it ambiguous, solved for from the layer's own gradient.

Symbols (as in analytic_conv / analytic_fc): a layer's output A = sigma(Z) is the input
that the layer above recovered, U = dL/dA comes from above, and delta = U * s with the
pattern s = sigma'(Z): ReLU s in {0, 1}, LeakyReLU s in {slope, 1}. G is the layer's
weight gradient, rows(X, delta) the model of it (Delta^T X for a linear layer,
conv2d_weight(X, delta) for a convolution).

Why a pattern needs care: a recovered A carries the round-off of everything above it. In
float64 that is ~1e-14 of the sample's largest output, far below any real activation; in
float32 it is ~1e-6, and true activations of that size occur (one 77-channel 16x16 layer of
a CIFAR photo had six below 1e-4 of its largest). One wrong entry of s puts U_a times an
input patch into the gradient model, which no X can absorb: the layer's residual jumps to
~1e-2 and every layer below inherits the error.

1. Threshold from the data: true ReLU outputs are >= 0, so a recovered NEGATIVE value is the
   round-off of a true zero; the largest of them, times a margin, is the noise floor of that
   sample (never below ``zero_tol`` of its largest output). LeakyReLU keeps the sign rule.
2. Solve for the rest: when the layer's residual exceeds what the precision explains, the
   entries near zero are tested. Flipping entry a changes delta by e_a = (s'_a - s_a) U_a
   and the gradient model by e_a V_a, V_a = the input patch that entry reads (linear: the
   sample's input). Correlating the residual R = G - rows(X, delta) with V_a,
   t_a = <R, V_a> / (e_a ||V_a||^2), is ~1 for a wrong entry and ~0 for a right one (the
   least-squares solve absorbs a part, so wrong entries show 0.5 to 1), and the predicted
   drop of ||R||^2, e_a^2 ||V_a||^2 (2 t_a - 1), orders the candidates. Every flip is verified
   by solving the layer again and is kept only if the residual falls.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from gitool.attacks.errors import AttackError

PIECEWISE = ("relu", "leakyrelu")

# Margin between the largest round-off of a true zero (a recovered negative) and the
# smallest output counted as active.
NOISE_MARGIN = 4.0


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.view(-1, *([1] * (like.ndim - 1)))


def relu_threshold(output: torch.Tensor, zero_tol: float, margin: float = NOISE_MARGIN) -> torch.Tensor:
    """Per sample: the level below which a recovered ReLU output counts as zero,
    max(zero_tol * largest output, margin * largest |negative output|)."""
    flat = output.flatten(1)
    scale = flat.abs().amax(dim=1)
    noise = (-flat).clamp(min=0).amax(dim=1)
    return _per_sample(torch.maximum(zero_tol * scale, margin * noise), output)


def decide_pattern(name: str | None, output: torch.Tensor, leaky_slope: float, zero_tol: float,
                   margin: float = NOISE_MARGIN) -> torch.Tensor:
    """s = sigma'(Z) as a tensor like ``output`` for ReLU (0/1 with the data's threshold)
    and LeakyReLU (1 where A >= 0, else the slope)."""
    if name == "relu":
        return (output > relu_threshold(output, zero_tol, margin)).to(output.dtype)
    if name == "leakyrelu":
        return torch.where(output >= 0, torch.ones_like(output), torch.full_like(output, leaky_slope))
    raise ValueError(f"{name!r} is not a piecewise-linear activation")


def flip_scores(kind: str, inputs: torch.Tensor, residual: torch.Tensor, change: torch.Tensor,
                stride=(1, 1), padding=(0, 0)) -> torch.Tensor:
    """Predicted drop of ||R||^2 for flipping each pattern entry (shape of delta).

    ``change`` is e = (s' - s) U per entry. Linear: V_a is sample n's input, so
    <R, V_a> = (X R^T)[n, k]; conv: <R, V_a> = conv2d(X, R)[n, f, i, j] and
    ||V_a||^2 = conv2d(sum_c X^2, ones).
    """
    if kind == "linear":
        correlation = inputs @ residual.T  # B x d_out
        norms = (inputs * inputs).sum(dim=1, keepdim=True).expand_as(correlation)
    else:
        kh, kw = residual.shape[2:]
        correlation = F.conv2d(inputs, residual, None, stride, padding)
        ones = torch.ones(1, 1, kh, kw, dtype=inputs.dtype, device=inputs.device)
        norms = F.conv2d((inputs * inputs).sum(dim=1, keepdim=True), ones, None, stride, padding)
        norms = norms.expand_as(correlation)
    return 2 * change * correlation - change * change * norms


def repair_pattern(pattern: torch.Tensor, upstream: torch.Tensor, low: float,
                   candidates: torch.Tensor, solve: Callable[[torch.Tensor], tuple[torch.Tensor, float]],
                   model_residual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                   start: tuple[torch.Tensor, float], limit: float, tries: int = 3, rounds: int = 2
                   ) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Flip entries of ``pattern`` (values 1 or ``low``) among ``candidates`` while that
    lowers the layer's residual, until it is within ``limit``.

    ``solve(pattern)`` returns (inputs, relative residual) or raises AttackError; ``model_residual(inputs,
    deltas)`` returns G - rows(X, delta); ``score(inputs, residual, change)`` the predicted
    drops (flip_scores). Each round tries the entries with a positive predicted drop together,
    then the ``tries`` best one at a time, and keeps the best verified answer.
    Returns (pattern, inputs, residual, entries flipped).
    """
    inputs, residual = start
    flipped = 0
    for _ in range(rounds):
        if residual <= limit:
            break
        other = torch.where(pattern == 1, torch.full_like(pattern, low), torch.ones_like(pattern))
        change = (other - pattern) * upstream
        drops = score(inputs, model_residual(inputs, upstream * pattern), change)
        drops = torch.where(candidates & (change != 0), drops, torch.full_like(drops, -torch.inf)).flatten()
        order = drops.argsort(descending=True)
        positive = order[drops[order] > 0]
        trials = []
        if positive.numel() > 1:
            trials.append(positive)
        trials.extend(order[i:i + 1] for i in range(min(tries, int((drops > -torch.inf).sum()))))
        best = None
        for entries in trials:
            trial = pattern.flatten().clone()
            trial[entries] = other.flatten()[entries]
            trial = trial.view_as(pattern)
            try:
                answer, value = solve(trial)
            except AttackError:  # a flip that makes the layer unsolvable is simply not kept
                continue
            if best is None or value < best[2]:
                best = (trial, answer, value, entries.numel())
        if best is None or best[2] >= 0.5 * residual:
            break
        pattern, inputs, residual = best[0], best[1], best[2]
        flipped += best[3]
    return pattern, inputs, residual, flipped
