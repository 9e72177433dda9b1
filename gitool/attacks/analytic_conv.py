"""Analytic inversion of convolutional networks from gradient constraints (Eltaras et al.,
R-CONV and its extension; methods.md section 2).

Symbols: a conv layer takes X (B x C x H x W), kernel K (F x C x kh x kw), stride s,
zero padding p, bias b; Z = conv(X, K) + b, A = sigma(Z) feeds the next layer and
delta = dL/dZ (per sample, already divided by B for the client's mean loss).

Gradient constraints: dL/dK[f, c, u, v] = sum_n sum_{i,j} delta_n[f, i, j] Xpad_n[c, s i + u, s j + v].
For one input channel c this is D vec(X_c) = vec(dL/dK[:, c]) with D of size
(F kh kw) x (B H W) built from the deltas alone; D is the same for every channel, so one
factorisation solves all C channels. Padded positions are known zeros and drop out.

Weight (forward) constraints: conv(X, K) = Z - b on the outputs where sigma can be inverted
from A (everywhere for LeakyReLU/sigmoid/tanh, where A > 0 for ReLU). They couple channels
and are added to the gradient rows in one least-squares system when the gradient rows
alone are rank-deficient.

delta of a layer comes from the next layer without its pre-activation:
delta_l = (dL/dA_l) * sigma'(A_l), sigma' written in terms of A_l (the recovered input of
layer l + 1); dL/dA_l is the transposed convolution of delta_{l+1} with K_{l+1} (or
delta_{l+1} W_{l+1} for a linear layer).

Solvers: ``dense`` forms the normal matrix (structured: one (BHW)^2 Gram for the gradient
rows, per stride class; the forward rows' M^T M band by band), factorises its lower triangle
once with a blocked Cholesky made of matrix products and refines the answer with the true
residual, applied as convolutions; ``iterative`` runs CGLS with convolution and transposed
convolution as the operator, so memory stays linear in the image size.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from gitool.attacks.activation_pattern import (NOISE_MARGIN, PIECEWISE, decide_pattern, flip_scores,
                                               repair_pattern)
from gitool.attacks.analytic_fc import RELU_ZERO_TOL, activation_derivative, activation_inverse, invert_linear
from gitool.attacks.errors import AttackError


@dataclass
class ConvLayerData:
    """What the server knows about one conv layer (weights, bias, gradient, geometry)."""

    weight: torch.Tensor  # F x C x kh x kw
    bias: torch.Tensor | None
    weight_grad: torch.Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]
    activation: str | None
    leaky_slope: float
    input_shape: tuple[int, int, int]  # C, H, W

    @property
    def output_hw(self) -> tuple[int, int]:
        _, height, width = self.input_shape
        kh, kw = self.weight.shape[2:]
        return ((height + 2 * self.padding[0] - kh) // self.stride[0] + 1,
                (width + 2 * self.padding[1] - kw) // self.stride[1] + 1)


@dataclass
class Stage:
    """One weight layer of a plain stack, with its input and output shapes (per sample)."""

    name: str
    kind: str  # "linear" | "conv"
    layer: object  # LinearLayerData | ConvLayerData
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


# Largest dense normal matrix gitool will form even when asked to (2 GiB in float64).
DENSE_HARD_LIMIT = 16384

# A gradient-only iterative answer must satisfy the forward equations at least this well.
FORWARD_CHECK_TOL = 1e-6


@dataclass
class SolveOptions:
    solver: str = "auto"  # auto | dense | iterative
    constraints: str = "auto"  # auto | gradient | both
    tol: float = 1e-13  # CGLS stops when the relative residual of the normal equations is below
    max_iter: int = 3000
    condition_limit: float = 1e8  # above this the system counts as rank-deficient
    dense_limit: int = 4096  # unknowns per dense system; above it the iterative solver is used
    # Machine epsilon of the update's numbers (float32 for what real clients send): a layer
    # whose residual exceeds RESIDUAL_FACTOR times it is not explained by round-off.
    precision: float = 2.0 ** -52

    @property
    def residual_limit(self) -> float:
        return RESIDUAL_FACTOR * self.precision


# Round-off of a one-step gradient and of the solve stays within a few hundred epsilon in
# every benchmark row (float32 and float64); a wrong activation pattern or a wrong label
# gives 1e-3 and more.
RESIDUAL_FACTOR = 1e3

# ReLU noise-floor margins tried when the first pattern leaves a residual above the limit.
RETRY_MARGINS = (1.0, 16.0, 1.0 / 16, 256.0, 1.0 / 256)


# ----------------------------------------------------------------------------- structure


def tap_pixel_index(height: int, width: int, kernel: tuple[int, int], stride: tuple[int, int],
                    padding: tuple[int, int], device=None) -> torch.Tensor:
    """(kh kw) x L map: which input pixel (1-based; 0 = padding) tap t of output position l reads."""
    pixels = torch.arange(1, height * width + 1, dtype=torch.float64, device=device).view(1, 1, height, width)
    return F.unfold(pixels, kernel, padding=padding, stride=stride)[0].round().long()


def structural_counts(layer: ConvLayerData, batch: int, forward_rows: int) -> dict:
    """Counts before any numbers are known: unknowns, gradient and weight equations, and
    whether the gradient rows can reach full rank given the stride (per pixel class).
    ``forward_rows`` counts the outputs whose pre-activation is known (weight equations)."""
    channels, height, width = layer.input_shape
    filters, _, kh, kw = layer.weight.shape
    out_h, out_w = layer.output_hw
    # Pixels no output ever reads (cut off by the stride) are lost to every kind of equation.
    read_h = {layer.stride[0] * i + u - layer.padding[0] for i in range(out_h) for u in range(kh)}
    read_w = {layer.stride[1] * j + v - layer.padding[1] for j in range(out_w) for v in range(kw)}
    unread = height * width - len(read_h & set(range(height))) * len(read_w & set(range(width)))
    # With stride s, input pixels split into s_h * s_w classes by (position + padding) mod s;
    # a class is only seen by the taps u with u = r mod s, so each class needs its own rows.
    enough = unread == 0
    for r_h in range(layer.stride[0]):
        for r_w in range(layer.stride[1]):
            pixels = sum(1 for i in range(height) if (i + layer.padding[0]) % layer.stride[0] == r_h) * \
                sum(1 for j in range(width) if (j + layer.padding[1]) % layer.stride[1] == r_w)
            taps = len(range(r_h, kh, layer.stride[0])) * len(range(r_w, kw, layer.stride[1]))
            if pixels and filters * taps < batch * pixels:
                enough = False
    gradient_rows = filters * kh * kw
    weight_rows = forward_rows
    unknowns = batch * channels * height * width
    gradient_ok = enough and gradient_rows >= batch * height * width
    combined_ok = unread == 0 and channels * gradient_rows + weight_rows >= unknowns
    return {
        "unknowns": unknowns,
        "gradient_equations": channels * gradient_rows,
        "weight_equations": weight_rows,
        "gradient_sufficient": gradient_ok,
        "combined_sufficient": combined_ok,
        "unread_pixels": unread,
    }


def gradient_matrix(deltas: torch.Tensor, index: torch.Tensor, pixels: int) -> torch.Tensor:
    """D of size (F kh kw) x (B H W): row (f, t), column (n, pixel) holds delta_n[f, l] for the
    output l whose tap t reads that pixel. The same D serves every input channel."""
    batch, filters = deltas.shape[:2]
    taps, positions = index.shape
    full = torch.zeros(filters, taps, batch, pixels + 1, dtype=deltas.dtype, device=deltas.device)
    tap_ids = torch.arange(taps, device=deltas.device).view(taps, 1).expand(taps, positions)
    flat = deltas.reshape(batch, filters, 1, positions).expand(batch, filters, taps, positions)
    for sample in range(batch):
        # Within one row each pixel is read by at most one output, so assignment is exact.
        full[:, tap_ids, sample, index] = flat[sample]
    return full[..., 1:].reshape(filters * taps, batch * pixels)


def gradient_gram(matrix: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                  height: int, width: int) -> torch.Tensor:
    """D^T D of :func:`gradient_matrix`, one product per stride class: with stride s, tap (u, v)
    only reads pixels (i, j) with i + p_h = u and j + p_w = v (mod s), so D^T D vanishes between
    pixels of different classes and s_h s_w small products replace one (stride 2: a quarter of
    the work)."""
    if stride == (1, 1):
        return matrix.T @ matrix
    kh, kw = kernel
    filters, batch = matrix.shape[0] // (kh * kw), matrix.shape[1] // (height * width)
    rows = matrix.view(filters, kh, kw, batch, height, width)
    gram = matrix.new_zeros(batch, height, width, batch, height, width)
    for u in range(min(stride[0], kh)):
        for v in range(min(stride[1], kw)):
            i, j = (u - padding[0]) % stride[0], (v - padding[1]) % stride[1]  # first pixel of the class
            block = rows[:, u::stride[0], v::stride[1], :, i::stride[0], j::stride[1]]
            columns = block.shape[3:]
            block = block.reshape(-1, columns[0] * columns[1] * columns[2])
            gram[:, i::stride[0], j::stride[1], :, i::stride[0], j::stride[1]] = (block.T @ block).view(*columns,
                                                                                                      *columns)
    return gram.view(matrix.shape[1], matrix.shape[1])


def forward_band(weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int], width: int) -> torch.Tensor:
    """The forward rows of one output row i: (F W_out) x (C kh W), row (f, j_out), column (c, u, j),
    holding K[f, c, u, v] where j = stride_w j_out + v - padding_w. Output row i reads input rows
    stride_h i + u - padding_h (u < kh), so every output row has this same matrix on its own
    window of input rows (rows u that fall in the zero padding are dropped by the caller)."""
    filters, channels, kh, kw = weight.shape
    out_w = (width + 2 * padding[1] - kw) // stride[1] + 1
    band = weight.new_zeros(filters, out_w, channels, kh, width + 2 * padding[1])
    positions = torch.arange(out_w, device=weight.device)
    for v in range(kw):
        band[:, positions, :, :, stride[1] * positions + v] = weight[:, :, :, v]
    return band[..., padding[1]:padding[1] + width].reshape(filters * out_w, channels * kh * width)


def add_forward_normal(normal: torch.Tensor, weight: torch.Tensor, row_weights: torch.Tensor,
                       stride: tuple[int, int], padding: tuple[int, int], input_shape: tuple[int, int, int],
                       lower: bool = False) -> None:
    """Add M^T diag(r^2) M to ``normal`` ((C H W) x (C H W), one sample), M the forward rows
    (M vec(X) = vec(conv(X, K))) and r (F x H_out x W_out) each row's weight (0: no row).
    With ``lower`` only the channel blocks on and below the diagonal (c' <= c) are added, all
    that a factorisation reading the lower triangle needs.

    Output row i contributes B^T diag(r_i^2) B (B: :func:`forward_band`) on the window of input
    rows it reads, so the sum is H_out small products instead of a sparse (F L) x (C H W) product;
    where every row has the same weight (LeakyReLU, tanh without saturation weighting) all
    output rows share one product."""
    channels, height, width = input_shape
    kh = weight.shape[2]
    out_h = row_weights.shape[1]
    band = forward_band(weight, stride, padding, width)
    squares = (row_weights * row_weights).permute(1, 0, 2).reshape(out_h, -1)  # per output row, (f, j_out)
    uniform = bool((squares == squares[0, 0]).all())
    shared = (band.T @ band) * squares[0, 0] if uniform else None
    blocks = normal.view(channels, height, width, channels, height, width)
    for row in range(out_h):
        first = stride[0] * row - padding[0]
        low, high = max(0, -first), min(kh, height - first)
        if low >= high or not (uniform or bool(squares[row].any())):
            continue
        product = shared if uniform else (band.T * squares[row]) @ band
        window = product.view(channels, kh, width, channels, kh, width)[:, low:high, :, :, low:high, :]
        span = slice(first + low, first + high)
        if not lower:
            blocks[:, span, :, :, span, :] += window
            continue
        for channel in range(channels):
            blocks[channel, span, :, :channel + 1, span, :] += window[channel, :, :, :channel + 1]


def forward_frobenius_squared(weight: torch.Tensor, index: torch.Tensor) -> float:
    """||M||_F^2 of the (unweighted) forward rows: tap t's weights appear once per output whose
    tap t reads a pixel inside the image (index > 0)."""
    filters, channels = weight.shape[:2]
    inside = (index > 0).sum(dim=1).to(weight.dtype)  # outputs per tap
    return float((weight.reshape(filters, channels, -1) ** 2).sum(dim=(0, 1)) @ inside)


# ----------------------------------------------------------------------------- dense solver

# Block size of the blocked Cholesky factorisation (columns per step); matrices up to twice
# this size go to LAPACK directly.
CHOLESKY_BLOCK = 256


def cholesky_lower(matrix: torch.Tensor, block: int = CHOLESKY_BLOCK) -> tuple[torch.Tensor, int]:
    """Lower Cholesky factor L (L L^T = matrix) of a symmetric positive definite matrix, computed
    in place: the result is ``matrix`` itself, whose strict upper triangle keeps its old values
    and must not be read (triangular solves never do). Returns (L, info): info 0, or the 1-based
    order of the first leading minor that is not positive definite (as cholesky_ex).

    Left-looking by column blocks: a block column is brought up to date by one matrix product
    with the finished columns, its diagonal block is factorised by LAPACK, and the panel below
    is solved against that small triangular block. Nearly all of the n^3/3 flops are then
    matrix products, which MKL runs much closer to peak than its own potrf: at n = 3072,
    float32, one thread, 0.09 s instead of 0.29 s. Other devices use their library."""
    size = matrix.shape[0]
    if size <= 2 * block or matrix.device.type != "cpu":
        lower, info = torch.linalg.cholesky_ex(matrix)
        return lower, int(info)
    for start in range(0, size, block):
        end = min(start + block, size)
        if start:
            matrix[start:, start:end].addmm_(matrix[start:, :start], matrix[start:end, :start].T, alpha=-1)
        diagonal, info = torch.linalg.cholesky_ex(matrix[start:end, start:end])
        if int(info):
            return matrix, start + int(info)
        matrix[start:end, start:end] = diagonal
        if end < size:  # L21 = A21 L11^-T, as L11 X = A21^T on the transposed view (MKL's fast side)
            matrix[end:, start:end] = torch.linalg.solve_triangular(diagonal, matrix[end:, start:end].mT,
                                                                    upper=False).mT
    return matrix, 0


def lower_block_matrix(size: int, dtype: torch.dtype, device, block: int = CHOLESKY_BLOCK) -> torch.Tensor:
    """A size x size matrix whose block lower triangle (every row up to the end of its block of
    :func:`cholesky_lower`) is zero; the rest is left unwritten, never read by the factorisation
    or the triangular solves, and so never paged in: half of the memory a dense matrix
    touches, whose first touch costs as much as the rest of the assembly."""
    matrix = torch.empty(size, size, dtype=dtype, device=device)
    for start in range(0, size, block):
        matrix[start:start + block, :start + block].zero_()
    return matrix


def add_lower_block(matrix: torch.Tensor, values: torch.Tensor, row: int, column: int,
                    block: int = CHOLESKY_BLOCK) -> None:
    """matrix[row:row + h, column:column + w] += values (h x w), restricted to the block lower
    triangle of :func:`lower_block_matrix` (the part a lower Cholesky factorisation reads)."""
    height, width = values.shape
    for start in range(row - row % block, row + height, block):
        top, bottom = max(start, row), min(start + block, row + height)
        right = min(column + width, start + block)
        if right > column:
            matrix[top:bottom, column:right] += values[top - row:bottom - row, :right - column]


def _cholesky_solve(factors: tuple[torch.Tensor, torch.Tensor], rhs: torch.Tensor) -> torch.Tensor:
    """L L^T u = rhs by two triangular solves with (L, L^T); L^T is a transposed view, which
    LAPACK reads in place (torch.cholesky_solve copies L on every call)."""
    lower, upper = factors
    half = torch.linalg.solve_triangular(lower, rhs, upper=False)
    return torch.linalg.solve_triangular(upper, half, upper=True)


def _largest_eigenvalue(apply: Callable, start: torch.Tensor, steps: int) -> float:
    """Largest eigenvalue of a symmetric positive (semi)definite operator by ``steps`` Lanczos
    steps with full reorthogonalisation: the top Ritz value, a lower bound that after k steps
    is as close as power iteration gets after about 2k."""
    basis, diagonal, offdiagonal = [], [], []
    vector = start / start.norm()
    for _ in range(steps):
        basis.append(vector)
        image = apply(vector)
        diagonal.append(float((vector * image).sum()))
        previous = torch.cat(basis, dim=1)
        for _ in range(2):  # twice is enough (Kahan, Parlett)
            image = image - previous @ (previous.T @ image)
        norm = float(image.norm())
        if norm <= 1e-12 * max(abs(diagonal[-1]), 1e-300):
            break
        offdiagonal.append(norm)
        vector = image / norm
    count = len(diagonal)
    tridiagonal = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
    if count > 1:
        couplings = torch.tensor(offdiagonal[:count - 1], dtype=torch.float64)
        tridiagonal += torch.diag(couplings, 1) + torch.diag(couplings, -1)
    return float(torch.linalg.eigvalsh(tridiagonal)[-1])


# Lanczos steps per end of the spectrum: 6 come within 2% of cond(A) on the benchmark's
# layers, closer than the 10 power-iteration steps used before, at 60% of the solves.
CONDITION_STEPS = 6


def _condition_estimate(apply_normal: Callable, cholesky: tuple[torch.Tensor, torch.Tensor], size: int,
                        dtype: torch.dtype, steps: int = CONDITION_STEPS) -> float:
    """cond(A) = sqrt(lambda_max / lambda_min) of N = A^T A: Lanczos on N applied as an operator
    (``apply_normal``, in ``dtype``) and on N^-1 applied with the Cholesky factor."""
    lower = cholesky[0]
    generator = torch.Generator(device="cpu").manual_seed(0)
    start = torch.randn(size, 1, dtype=torch.float64, generator=generator).to(lower.device)
    lam_max = _largest_eigenvalue(apply_normal, start.to(dtype), steps)
    lam_min_inv = _largest_eigenvalue(lambda vector: _cholesky_solve(cholesky, vector), start.to(lower.dtype), steps)
    return math.sqrt(max(lam_max * lam_min_inv, 1.0))


def _numerical_rank(normal: torch.Tensor, limit: float) -> int | None:
    """Rank of A from the eigenvalues of A^T A (singular values above largest / limit);
    None where the matrix is too big to decompose on the error path.

    The eigenvalues of A^T A carry round-off of about n eps lambda_max, so singular values
    below sqrt(n eps) sigma_max are noise whatever ``limit`` says: counting them reported
    ranks above the number of rows on some CPUs' kernels."""
    size = normal.shape[0]
    if size > 6000:
        return None
    eigen = torch.linalg.eigvalsh(normal).clamp(min=0).sqrt()
    floor = max(1.0 / limit, math.sqrt(size * torch.finfo(normal.dtype).eps))
    return int((eigen > eigen[-1] * floor).sum())


# Mixed precision (float32 factor, float64 refinement) for normal matrices at least this big,
# when cond(A) is at most MIXED_CONDITION_LIMIT: each refinement step then shrinks the error
# by about eps32 cond(A)^2 <= 0.12, and the answer is the float64 least-squares solution.
MIXED_MIN_SIZE = 1024
MIXED_CONDITION_LIMIT = 1e3
MIXED_MAX_REFINEMENTS = 40


def _solve_mixed(low: torch.Tensor, rhs: torch.Tensor, apply_normal_residual: Callable, apply_normal: Callable):
    """N u = rhs with a float32 Cholesky factor of ``low`` (N in float32, overwritten) and
    float64 iterative refinement against the true least-squares residual (``apply_normal``:
    u -> N u in float64, for the condition estimate). Returns (u, condition) or None where
    float32 cannot carry the system (singular or cond too high)."""
    lower, info = cholesky_lower(low)
    if info != 0:
        return None
    factors = (lower, lower.mT)
    condition = _condition_estimate(apply_normal, factors, rhs.shape[0], rhs.dtype)
    if condition > MIXED_CONDITION_LIMIT:
        return None

    def solve(vector):  # scaled so that tiny residuals do not underflow float32
        scale = float(vector.norm())
        if scale == 0:
            return torch.zeros_like(vector)
        return _cholesky_solve(factors, (vector / scale).to(lower.dtype)).to(vector.dtype) * scale

    # float64 residuals carry eps64 ||N|| ||u|| of round-off, so corrections level off near
    # eps64 cond(A)^2 ||u||: stop there, or when a step no longer halves the correction.
    floor = 10 * torch.finfo(rhs.dtype).eps * condition ** 2
    solution = solve(rhs)
    previous = math.inf
    for _ in range(MIXED_MAX_REFINEMENTS):
        correction = solve(apply_normal_residual(solution))
        solution = solution + correction
        size = float(correction.norm()) / max(float(solution.norm()), 1e-300)
        if size <= floor or size > 0.5 * previous:
            return (solution, condition) if size <= max(floor, 1e-10) else None
        previous = size
    return None


def _solve_normal(build: Callable, rhs: torch.Tensor, apply_normal_residual: Callable, apply_normal: Callable,
                  limit: float, refinements: int = 2) -> tuple[torch.Tensor | None, dict]:
    """Cholesky solve of N u = rhs plus refinement with the true least-squares residual.
    ``build(dtype)`` returns a new dense N (the factorisation overwrites it), ``apply_normal``
    applies N in rhs's dtype. Returns (u, {rank, condition estimate, factor precision}); u is
    None (with the numerical rank) when N is (numerically) singular."""
    size = rhs.shape[0]
    if size >= MIXED_MIN_SIZE and rhs.dtype == torch.float64:
        mixed = _solve_mixed(build(torch.float32), rhs, apply_normal_residual, apply_normal)
        if mixed is not None:
            return mixed[0], {"rank": size, "condition": mixed[1], "factor": "float32"}
    lower, info = cholesky_lower(build(rhs.dtype))
    cholesky = (lower, lower.mT)
    condition = math.inf
    factor = str(rhs.dtype).replace("torch.", "")
    if info == 0:
        condition = _condition_estimate(apply_normal, cholesky, size, rhs.dtype)
    if info != 0 or condition > limit:
        return None, {"rank": _numerical_rank(build(rhs.dtype), limit), "condition": condition, "factor": factor}
    solution = _cholesky_solve(cholesky, rhs)
    for _ in range(refinements):
        solution = solution + _cholesky_solve(cholesky, apply_normal_residual(solution))
    return solution, {"rank": size, "condition": condition, "factor": factor}


def solve_conv_dense(layer: ConvLayerData, deltas: torch.Tensor, targets: torch.Tensor | None,
                     known: torch.Tensor | None, limit: float) -> tuple[torch.Tensor | None, dict]:
    """Least squares of the gradient rows (and, with ``targets``, the forward rows).

    Unknown order (n, c, pixel). Gradient rows: kron(I_C, D); their Gram matrix is
    D^T D placed on every channel's diagonal block, so one Gram serves all channels. Forward
    rows (one sample's block, weighted by ``known``): M^T M built band by band
    (:func:`add_forward_normal`); the residuals that refine the answer apply both row blocks
    as convolutions. Returns (X or None when rank-deficient, diagnostics).
    """
    batch = deltas.shape[0]
    channels, height, width = layer.input_shape
    pixels = height * width
    kernel = tuple(layer.weight.shape[2:])
    index = tap_pixel_index(height, width, kernel, layer.stride, layer.padding, deltas.device)
    matrix = gradient_matrix(deltas, index, pixels)  # (F kk) x (B HW)
    filters = layer.weight.shape[0]
    rhs_grad = layer.weight_grad.permute(0, 2, 3, 1).reshape(filters * index.shape[0], channels)

    def gram_of(rows):
        return gradient_gram(rows, kernel, layer.stride, layer.padding, height, width)

    if targets is None:
        gram = gram_of(matrix)

        def residual_rhs(solution):
            return matrix.T @ (rhs_grad - matrix @ solution)

        solution, info = _solve_normal(lambda dtype: gram.to(dtype, copy=True), matrix.T @ rhs_grad, residual_rhs,
                                       lambda vector: gram @ vector, limit)
        info["unknowns_per_channel"] = batch * pixels
        if solution is None:
            return None, info
        images = solution.reshape(batch, pixels, channels).permute(0, 2, 1).reshape(batch, channels, height, width)
        return images, info

    size = batch * channels * pixels
    shape = (batch, channels, height, width)
    # Balance the two blocks so neither dominates the least-squares weighting.
    forward_weight = math.sqrt(float((matrix * matrix).sum()) * channels /
                               max(forward_frobenius_squared(layer.weight, index) * batch, 1e-300))
    rows = known * forward_weight  # each forward row's weight (0: no row; sigma' for sigmoid / tanh)
    weighted_targets = targets * rows

    def forward(solution):
        return F.conv2d(solution.reshape(shape), layer.weight, None, layer.stride, layer.padding) * rows

    def forward_adjoint(values):
        return conv2d_input(shape, layer.weight, values * rows, layer.stride, layer.padding).reshape(size, 1)

    def to_channels(solution):  # (n, c, p) vector -> (n p) x c matrix of the gradient rows
        return solution.reshape(batch, channels, pixels).permute(0, 2, 1).reshape(batch * pixels, channels)

    def from_channels(columns):
        return columns.reshape(batch, pixels, channels).permute(0, 2, 1).reshape(size, 1)

    def apply_normal(solution):
        return from_channels(matrix.T @ (matrix @ to_channels(solution))) + forward_adjoint(forward(solution))

    def normal_rhs(solution):
        return (from_channels(matrix.T @ (rhs_grad - matrix @ to_channels(solution)))
                + forward_adjoint(weighted_targets - forward(solution)))

    def build(dtype):  # N's lower (block) triangle, all that cholesky_lower and eigvalsh read
        normal = lower_block_matrix(size, dtype, deltas.device)
        gram = gram_of(matrix.to(dtype)).view(batch, pixels, batch, pixels)
        for first in range(batch):
            for second in range(first + 1):
                for channel in range(channels):
                    add_lower_block(normal, gram[first, :, second], (first * channels + channel) * pixels,
                                    (second * channels + channel) * pixels)
        samples = normal.view(batch, channels * pixels, batch, channels * pixels)
        for sample in range(batch):
            add_forward_normal(samples[sample, :, sample, :], layer.weight.to(dtype), rows[sample].to(dtype),
                               layer.stride, layer.padding, layer.input_shape, lower=True)
        if normal.device.type != "cpu":  # other libraries may read the upper triangle too
            normal = torch.tril(normal) + torch.tril(normal, -1).mT
        return normal

    zero = torch.zeros(size, 1, dtype=deltas.dtype, device=deltas.device)
    solution, info = _solve_normal(build, normal_rhs(zero), normal_rhs, apply_normal, limit)
    info["unknowns"] = size
    if solution is None:
        return None, info
    return solution.reshape(batch, channels, height, width), info


# ----------------------------------------------------------------------------- iterative solver


def solve_conv_iterative(layer: ConvLayerData, deltas: torch.Tensor, targets: torch.Tensor | None,
                         known: torch.Tensor | None, tol: float, max_iter: int) -> tuple[torch.Tensor, dict]:
    """CGLS on the same least-squares problem, matrix-free: the gradient rows are
    X -> conv2d_weight(X, delta) (adjoint: transposed conv of delta with the residual
    kernel), the forward rows are X -> conv(X, K) on the known outputs (adjoint:
    transposed conv). Memory is a few copies of X and of the layer output."""
    batch = deltas.shape[0]
    shape = (batch, *layer.input_shape)
    weight_shape = tuple(layer.weight.shape)
    stride, padding = layer.stride, layer.padding
    mask = known.to(deltas.dtype) if targets is not None else None
    # Scale the forward rows like the dense solver: equal Frobenius weight per block.
    grad_norm = float(deltas.norm())
    forward_weight = grad_norm / max(float(layer.weight.norm()), 1e-300) if targets is not None else 0.0

    def apply(images):
        parts = [conv2d_weight(images, weight_shape, deltas, stride, padding)]
        if mask is not None:
            parts.append(F.conv2d(images, layer.weight, None, stride, padding) * mask * forward_weight)
        return parts

    def adjoint(parts):
        images = conv2d_input(shape, parts[0], deltas, stride, padding)
        if mask is not None:
            images = images + conv2d_input(shape, layer.weight, parts[1] * mask * forward_weight, stride, padding)
        return images

    rhs = [layer.weight_grad.clone()]
    if mask is not None:
        rhs.append(targets * mask * forward_weight)
    solution = torch.zeros(shape, dtype=deltas.dtype, device=deltas.device)
    residual = [part.clone() for part in rhs]
    gradient = adjoint(residual)
    direction = gradient.clone()
    gamma = float((gradient * gradient).sum())
    start = math.sqrt(gamma)
    rhs_norm = math.sqrt(sum(float((part * part).sum()) for part in rhs))
    iterations = 0
    while iterations < max_iter and math.sqrt(gamma) > tol * start and gamma > 0:
        image = apply(direction)
        alpha = gamma / sum(float((part * part).sum()) for part in image)
        solution += alpha * direction
        for part, step in zip(residual, image):
            part -= alpha * step
        gradient = adjoint(residual)
        gamma_new = float((gradient * gradient).sum())
        direction = gradient + (gamma_new / gamma) * direction
        gamma = gamma_new
        iterations += 1
    res_norm = math.sqrt(sum(float((part * part).sum()) for part in residual))
    return solution, {"iterations": iterations, "normal_residual": math.sqrt(gamma) / max(start, 1e-300),
                      "converged": math.sqrt(gamma) <= tol * start or gamma == 0,
                      "rhs_residual": res_norm / max(rhs_norm, 1e-300)}


# ----------------------------------------------------------------------------- one conv layer


def invert_conv_layer(layer: ConvLayerData, deltas: torch.Tensor, output: torch.Tensor, options: SolveOptions,
                      name: str, pattern: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Recover a conv layer's input from its gradient (plus forward rows where needed).
    ``pattern`` (ReLU's decided 0/1 pattern) says which outputs give forward rows."""
    batch = deltas.shape[0]
    pre_activation, known = activation_inverse(layer.activation, output, layer.leaky_slope)
    if pattern is not None and layer.activation == "relu":
        known = pattern > 0
    forward_available = bool(known.any())
    counts = structural_counts(layer, batch, int(known.sum()))
    targets = pre_activation - (layer.bias.view(1, -1, 1, 1) if layer.bias is not None else 0.0)
    weights = known.to(output.dtype)
    if layer.activation in ("sigmoid", "tanh"):
        # Forward rows in the output's units: an error d in A is d / sigma' in Z, so a saturated
        # output's row (sigma' -> 0) would carry the round-off of A amplified without bound.
        slope = activation_derivative(layer.activation, output).clamp(min=0)
        weights = weights * slope / max(float(slope.max()), 1e-300)
    channels, height, width = layer.input_shape
    diag = {"layer": name, "kind": "conv", **counts}

    def solver_for(mode: str) -> str:
        # The gradient rows' dense system has B H W unknowns (shared by all channels); the
        # combined one couples channels: B C H W.
        size = batch * height * width * (channels if mode == "both" else 1)
        if options.solver == "dense" and size > DENSE_HARD_LIMIT:
            raise AttackError(f"{name}: a dense system of {size} unknowns needs {size * size * 8 / 2**30:.1f} GiB; "
                              "use --solver iterative (or auto)")
        if options.solver != "auto":
            return options.solver
        return "dense" if size <= options.dense_limit else "iterative"

    def refuse(detail: str) -> AttackError:
        return AttackError(
            f"{name}: cannot recover its input ({counts['unknowns']} unknowns; {counts['gradient_equations']} "
            f"gradient equations, {counts['weight_equations']} weight equations{detail}); "
            "more filters, a stride of 1 or an invertible activation would make it solvable"
        )

    modes = {"gradient": ["gradient"], "both": ["both"]}.get(options.constraints, ["gradient", "both"])
    if options.constraints == "auto" and not counts["gradient_sufficient"]:
        modes = ["both"]
    if "both" in modes and not forward_available:
        modes = [m for m in modes if m != "both"]
        if not modes:
            raise refuse("; the activation gives no forward equations")
    if counts["unread_pixels"]:
        raise refuse(f"; {counts['unread_pixels']} of {height * width} pixels are never read by the convolution")
    started = time.perf_counter()
    for mode in modes:
        use_forward = mode == "both"
        if mode == "both" and not counts["combined_sufficient"]:
            raise refuse(", too few equations in all")
        solver = solver_for(mode)
        diag["solver"] = solver
        if solver == "dense":
            images, info = solve_conv_dense(layer, deltas, targets if use_forward else None,
                                            weights if use_forward else None, options.condition_limit)
            if images is None:
                diag.setdefault("attempts", []).append({"constraints": mode, **info})
                continue
        else:
            images, info = solve_conv_iterative(layer, deltas, targets if use_forward else None,
                                                weights if use_forward else None, options.tol, options.max_iter)
            if not info["converged"] and mode != modes[-1]:
                diag.setdefault("attempts", []).append({"constraints": mode, **info})
                continue
        gradient_residual = _relative(conv2d_weight(images, tuple(layer.weight.shape), deltas, layer.stride,
                                                    layer.padding), layer.weight_grad)
        produced = F.conv2d(images, layer.weight, None, layer.stride, layer.padding)
        forward_residual = _relative(produced * weights, targets * weights) if forward_available else None
        if (solver == "iterative" and mode == "gradient" and mode != modes[-1] and forward_residual is not None
                and forward_residual > FORWARD_CHECK_TOL):
            # CGLS gives no rank: a gradient-only answer that breaks the independent forward
            # equations came from a rank-deficient system, so add those equations.
            diag.setdefault("attempts", []).append({"constraints": mode, **info,
                                                    "forward_residual": forward_residual})
            continue
        diag.update(info)
        diag.update(constraints=mode, seconds=time.perf_counter() - started, gradient_residual=gradient_residual,
                    forward_residual=forward_residual)
        return images, diag
    ranks = [a.get("rank") for a in diag.get("attempts", [])]
    rank_text = f", numerical rank {ranks[-1]}" if ranks and ranks[-1] is not None else ""
    raise refuse(f"{rank_text}, condition above {options.condition_limit:.0e}")


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / max(float(reference.norm()), 1e-300))


# ----------------------------------------------------------------------------- the network


def invert_network(stages: list[Stage], classifier_weight: torch.Tensor, classifier_delta: torch.Tensor,
                   features: torch.Tensor, options: SolveOptions,
                   progress: Callable[[int, int, dict], None] | None = None) -> tuple[torch.Tensor, list[dict]]:
    """Walk a plain stack top-down from the classifier to the input.

    ``stages`` run from the input upwards; ``features`` (B x d) is the classifier's input,
    ``classifier_delta`` (B x K) its per-sample delta. Returns the network input
    (B x input shape of the first stage) and per-layer diagnostics (top layer first).
    """
    batch = features.shape[0]
    output = features
    upstream = classifier_delta @ classifier_weight  # dL/dA of the top stage's output
    diagnostics = []
    for done, position in enumerate(range(len(stages) - 1, -1, -1)):
        stage = stages[position]
        layer = stage.layer
        output = output.reshape(batch, *stage.output_shape)
        upstream = upstream.reshape(output.shape)
        inputs, deltas, diag = _invert_stage(stage, output, upstream, options)
        if stage.kind == "linear":
            upstream = deltas @ layer.weight
        else:
            upstream = conv2d_input(inputs.shape, layer.weight, deltas, layer.stride, layer.padding)
        diagnostics.append(diag)
        output = inputs.reshape(batch, *stage.input_shape)
        if progress is not None:
            progress(done + 1, len(stages), {"layer": stage.name})
    return output, diagnostics


def _invert_stage(stage: Stage, output: torch.Tensor, upstream: torch.Tensor, options: SolveOptions
                  ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One layer: decide the activation pattern, solve, and where the residual exceeds what the
    precision explains, solve for the pattern entries near zero (activation_pattern.py)."""
    layer = stage.layer
    piecewise = layer.activation in PIECEWISE
    pattern = (decide_pattern(layer.activation, output, layer.leaky_slope, RELU_ZERO_TOL) if piecewise
               else activation_derivative(layer.activation, output, layer.leaky_slope))

    def solve(pattern):
        deltas = upstream * pattern
        started = time.perf_counter()
        if stage.kind == "linear":
            solved = invert_linear(layer.weight_grad, deltas, what=stage.name)
            diag = {"layer": stage.name, "kind": "linear", "unknowns": solved.unknowns,
                    "gradient_equations": solved.equations, "weight_equations": 0, "rank": solved.rank,
                    "condition": solved.condition, "gradient_residual": solved.residual, "solver": "dense",
                    "constraints": "gradient", "seconds": time.perf_counter() - started}
            return solved.inputs, diag
        return invert_conv_layer(layer, deltas, output, options, stage.name, pattern=pattern)

    inputs, diag = solve(pattern)
    limit = options.residual_limit
    if diag.get("solver") == "iterative":
        # CGLS stops at --tol on the normal equations, not at round-off.
        limit = max(limit, RESIDUAL_FACTOR * options.tol)
    if layer.activation in ("sigmoid", "tanh"):
        # delta = U sigma'(A): a relative error e of A moves it by e A U sigma''(A), so the
        # residual round-off explains grows by ||A sigma''(A) U|| / ||sigma'(A) U||, large
        # where outputs saturate (sigma' in terms of A: tanh 1 - A^2, sigmoid A (1 - A)).
        second = -2 * output if layer.activation == "tanh" else 1 - 2 * output
        amplification = float((output * second * upstream).norm()) / max(float((pattern * upstream).norm()), 1e-300)
        diag["activation_amplification"] = amplification
        limit *= max(1.0, amplification)
    if piecewise and diag["gradient_residual"] > limit:
        started = time.perf_counter()
        first = diag["gradient_residual"]
        low = 0.0 if layer.activation == "relu" else layer.leaky_slope
        scale = output.flatten(1).abs().amax(dim=1).view(-1, *([1] * (output.ndim - 1)))
        # Entries whose recovered output is within the round-off the layer above can explain.
        band = max(1e4 * options.precision, 1e-9)
        candidates = output.abs() <= band * scale
        kind = stage.kind
        stride = getattr(layer, "stride", (1, 1))
        padding = getattr(layer, "padding", (0, 0))

        def trial(pattern):
            answer, info = solve(pattern)
            return answer, info["gradient_residual"]

        def model_residual(inputs, deltas):
            if kind == "linear":
                return layer.weight_grad - deltas.T @ inputs
            return layer.weight_grad - conv2d_weight(inputs, tuple(layer.weight.shape), deltas, stride, padding)

        def score(inputs, residual, change):
            return flip_scores(kind, inputs, residual, change, stride, padding)

        best = (pattern, inputs, first, NOISE_MARGIN)
        if layer.activation == "relu":
            # First the threshold itself: a noise floor misjudged by the negatives' spread.
            for margin in RETRY_MARGINS:
                other = decide_pattern("relu", output, 0.0, RELU_ZERO_TOL, margin)
                if torch.equal(other, best[0]):
                    continue
                try:
                    answer, value = trial(other)
                except AttackError:
                    continue
                if value < best[2]:
                    best = (other, answer, value, margin)
                if value <= limit:
                    break
        pattern, inputs, value, margin = best
        flipped = 0
        if value > limit:
            pattern, inputs, value, flipped = repair_pattern(pattern, upstream, low, candidates, trial,
                                                             model_residual, score, (inputs, value), limit)
        inputs, diag = solve(pattern)
        diag["pattern"] = {"margin": margin, "flipped": flipped, "candidates": int(candidates.sum()),
                           "residual_before": first, "seconds": time.perf_counter() - started}
    diag["residual_limit"] = limit
    diag["within_precision"] = bool(diag["gradient_residual"] <= limit)
    return inputs, upstream * pattern, diag
