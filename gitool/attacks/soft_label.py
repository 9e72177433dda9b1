"""Single-sample soft-label and feature recovery (Wang, Liang, He, ICLR 2024; methods.md section 1).

Symbols, for one sample under softmax cross-entropy:
    W (K x d), b (K)   the classifier (b = 0 when it has no bias)
    x (d)              its input, the last-layer "feature"
    p = softmax(W x + b), y (K) the soft label (sums to 1)
    G = dL/dW = (p - y) x^T (K x d),  g = dL/db = p - y

With a bias (exact, no search): x = G^T g / <g, g> (the least-squares ratio of the rows
of G to g, i.e. G_i / g_i averaged with weights g_i^2), y = softmax(W x + b) - g.

Without a bias: take r, the row of G with the largest norm. G_r = (p_r - y_r) x, so
    x = lam G_r,  lam = 1 / (p_r - y_r),  |lam| >= 1.
With u = W G_r (so the logits are lam u + b) and c_i = <G_i, G_r> / <G_r, G_r> (least
squares over all rows: c_i = (p_i - y_i) / (p_r - y_r) on a clean gradient),
    y_hat(lam) = softmax(lam u + b) - c / lam
sums to 1 for every lam (the paper's Theorem 1): the gradient fixes a one-parameter family
of (feature, label) pairs and a prior on the label's structure must pick lam.

Structure priors: the ``free`` largest entries of the label are unconstrained and the
others equal (free = 1: label smoothing, hard labels being eps = 0; free = 2: mixup).
Write S(lam) for the other K - free entries of y_hat(lam), A = lam p(lam), B = c (so
lam y_hat = A - B) and P for centring over S. The loss is

    loss(lam) = ||P(A - B)|| / (||P A|| + ||P B||)      (in [0, 1])

- zero exactly when the entries of y_hat over S are equal;
- scale-free: the same for a gradient scaled by any factor, whatever |lam| is;
- at most 1 (triangle inequality), and it tends to 1 as |lam| -> infinity, where the
  spread of A over S dies exponentially while B's stays: the asymptote that satisfies
  the paper's absolute variance threshold (var(y_hat over S) ~ p^2 -> 0) scores worst here;
- near the solution loss ~ |d lam / lam| x (spread of the logits) / 2: a V whose width
  is a fixed *fraction* of lam. On trained models the paper's variance is a dip of a
  quantity that is ~p_j^2 <= 1e-8 everywhere, at |lam| ~ 50+ and a width of ~1e-3 in
  absolute terms, which its L-BFGS steps in s = c lam jump over. On a log-spaced grid
  the V spans many points for any |lam|.

The scan evaluates the loss on a dense log-spaced grid of |lam| for both signs (one
K-vector softmax per point, vectorised), brackets every local minimum and refines each
by Gauss-Newton on the residual vector P(A - B) (zero at the solution, so convergence is
quadratic, to round-off), with backtracking inside the bracket. A candidate is kept only
if it is a valid label (entries in [0, 1] within a small tolerance) and |lam| >= 1.
The search works on K-vectors on the CPU; the K x d products run where the tensors are.

The PSO search reproduces the published code's strategy for comparison (pyswarms instead
of scikit-opt): global-best PSO with 500 particles, 40 iterations, inertia w = 0.8 and
c1 = c2 = 0.5, on s = scale x lam (scale 4 for smoothing, 2 for mixup), in intervals of
alternating sign [0.7, 6], [-6.3, -1], [5.7, 10], [-10.3, -6], [9.7, 30], [-30.3, -10],
[29.7, 50], [-50.3, -30] (the published sequence), then, beyond the published bound, in
intervals doubling in width up to the scan's bound; it stops at the first interval whose
best point is a valid label with loss <= ``PSO_ACCEPT``. It uses the scale-free loss.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gitool.attacks.errors import AttackError, InputError

FREE_ENTRIES = {"hard": 1, "smoothing": 1, "mixup": 2}
FAMILIES = ("auto", "hard", "smoothing", "mixup")
SEARCHES = ("scan", "pso")

ZERO_GRADIENT = "the last-layer gradient is zero: p = y, nothing to recover"

FIT_TOLERANCE = 1e-6  # loss at or below: the prior fits (clean float32 captures reach ~1e-7)
APPROXIMATE_TOLERANCE = 0.05  # above FIT and at or below: an approximate fit (noisy gradient), with a warning
LABEL_TOLERANCE = 1e-4  # entries may leave [0, 1] by this much (round-off, float32 captures)
LAMBDA_FLOOR_TOLERANCE = 1e-5  # |lam| >= 1 up to round-off: |lam| = 1 (p_r = 0 or 1) happens, float32 blurs it
HARD_TOLERANCE = 1e-5  # a smoothing fit with eps below this is reported as a hard label
CLEARLY_BETTER = 100.0  # family auto: the other prior must beat a failing one by this factor

SCAN_START = 0.98  # a little below |lam| = 1 so that a valley at exactly 1 is interior
SCAN_BOUND = 10.0  # first bound of |lam| per sign; extended by decades while the tail still matters
SCAN_LIMIT = 1e12
POINTS_PER_DECADE = 400  # relative spacing 0.6%: the V at the solution spans many points
REFINE_BELOW = 0.5  # sampled local minima above this cannot become fits
MAX_BRACKETS = 64  # per sign, lowest sampled loss first

PSO_PARTICLES = 500
PSO_ITERATIONS = 40
PSO_OPTIONS = {"c1": 0.5, "c2": 0.5, "w": 0.8}
PSO_SCALE = {"hard": 4.0, "smoothing": 4.0, "mixup": 2.0}
PSO_PUBLISHED = [(0.7, 6.0), (-6.3, -1.0), (5.7, 10.0), (-10.3, -6.0), (9.7, 30.0), (-30.3, -10.0),
                 (29.7, 50.0), (-50.3, -30.0)]
PSO_ACCEPT = 1e-4


# --------------------------------------------------------------------------- the lambda family


@dataclass
class LambdaFamily:
    """The one-parameter family y_hat(lam) = softmax(lam u + b) - c / lam of a bias-free
    (or bias-ignoring) single-sample gradient; vectors are float64 numpy on the CPU."""

    row: int  # r
    row_grad: torch.Tensor  # G_r (d), where the gradient lives
    direction: np.ndarray  # u = W G_r
    offset: np.ndarray  # b, zeros without a bias
    ratios: np.ndarray  # c
    rank_one_residual: float  # ||G - c G_r^T|| / ||G||: 0 for one clean sample

    @property
    def num_classes(self) -> int:
        return len(self.ratios)


def lambda_family(weight: torch.Tensor, weight_grad: torch.Tensor, bias: torch.Tensor | None = None) -> LambdaFamily:
    weight_grad = weight_grad.to(torch.float64)
    norms = weight_grad.norm(dim=1)
    if float(norms.max()) == 0.0:
        raise AttackError(ZERO_GRADIENT)
    row = int(norms.argmax())
    row_grad = weight_grad[row]
    ratios = weight_grad @ row_grad / (row_grad @ row_grad)
    rank_one = weight_grad - ratios[:, None] * row_grad[None, :]
    direction = weight.to(weight_grad) @ row_grad
    offset = torch.zeros_like(direction) if bias is None else bias.to(weight_grad)
    return LambdaFamily(row=row, row_grad=row_grad, direction=_np(direction), offset=_np(offset),
                        ratios=_np(ratios), rank_one_residual=float(rank_one.norm() / weight_grad.norm()))


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=-1, keepdims=True)


def labels_at(family: LambdaFamily, lambdas: np.ndarray | float) -> np.ndarray:
    """y_hat(lam) for one lam (K) or many (n x K)."""
    lam = np.asarray(lambdas, dtype=np.float64)
    column = lam[..., None]
    return _softmax_rows(column * family.direction + family.offset) - family.ratios / column


# --------------------------------------------------------------------------- the loss


def _free_mask(labels: np.ndarray, free: int) -> np.ndarray:
    """True on the entries the prior constrains: all but the ``free`` largest of each row."""
    mask = np.ones(labels.shape, dtype=bool)
    if free == 1:
        np.put_along_axis(mask, labels.argmax(axis=-1)[..., None], False, axis=-1)
    elif free > 1:
        top = np.argpartition(-labels, free - 1, axis=-1)[..., :free]
        np.put_along_axis(mask, top, False, axis=-1)
    return mask


def grid_losses(family: LambdaFamily, lambdas: np.ndarray, frees: tuple[int | None, ...] = (1,),
                reference: np.ndarray | None = None) -> dict[int | None, np.ndarray]:
    """The scale-free loss at each lam (module docstring) for each prior in ``frees``, from
    one softmax per lam; ``reference`` (a known label y, ``frees == (None,)``) scores
    ||lam (p - y) - c|| / (||lam (p - y)|| + ||c||) instead, with nothing centred."""
    column = lambdas[:, None]
    probs = _softmax_rows(column * family.direction + family.offset)
    ratios = family.ratios
    if reference is not None:
        scaled = column * (probs - reference)
        return {None: _safe_ratio(np.linalg.norm(scaled - ratios, axis=1),
                                  np.linalg.norm(scaled, axis=1) + np.linalg.norm(ratios))}
    scaled = column * probs
    residual = scaled - ratios  # lam y_hat
    ranks = residual * np.sign(column)  # the order of y_hat
    out = {}
    for free in frees:
        count = family.num_classes - free
        keep = _free_mask(ranks, free)
        kept = np.where(keep, residual, 0.0)
        centred = np.where(keep, kept - kept.sum(axis=1, keepdims=True) / count, 0.0)
        numerator = np.sqrt(np.einsum("ij,ij->i", centred, centred))
        kept = np.where(keep, scaled, 0.0)
        total = kept.sum(axis=1)
        spread_a = np.sqrt(np.maximum(np.einsum("ij,ij->i", kept, kept) - total**2 / count, 0.0))
        top = np.where(keep, 0.0, ratios)
        total = ratios.sum() - top.sum(axis=1)
        spread_c = np.sqrt(np.maximum(ratios @ ratios - np.einsum("ij,ij->i", top, top) - total**2 / count, 0.0))
        out[free] = _safe_ratio(numerator, spread_a + spread_c)
    return out


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    # denominator 0: both terms are constant over S, so the structure holds exactly (loss 0);
    # a saturated softmax does this for a whole range of lam, which the scan reports as flat
    with np.errstate(invalid="ignore", divide="ignore"):
        loss = numerator / denominator
    return np.where(denominator > 0, np.minimum(loss, 1.0), 0.0)


def structure_loss(family: LambdaFamily, lambdas: np.ndarray, free: int | None = 1,
                   reference: np.ndarray | None = None, chunk_elements: int = 1 << 19) -> np.ndarray:
    """The scale-free loss of one prior (or a known label) at each lam, in chunks."""
    return _chunked(family, np.asarray(lambdas, dtype=np.float64), (free,), reference, chunk_elements)[free]


def _chunked(family: LambdaFamily, lambdas: np.ndarray, frees: tuple[int | None, ...],
             reference: np.ndarray | None, chunk_elements: int = 1 << 19) -> dict[int | None, np.ndarray]:
    lambdas = np.atleast_1d(lambdas)
    rows = max(1, chunk_elements // max(1, family.num_classes))
    parts = [grid_losses(family, lambdas[i:i + rows], frees, reference) for i in range(0, len(lambdas), rows)]
    return {free: np.concatenate([part[free] for part in parts]) for free in frees}


# --------------------------------------------------------------------------- refinement


def _residual_and_jacobian(family: LambdaFamily, lam: float, constrained: np.ndarray | None,
                           reference: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """P(A - B) and its derivative in lam at one lam, on the entries ``constrained`` (a prior,
    centred) or on all entries against a known label ``reference`` (not centred). Lean on
    purpose: this runs in the refinement loop, where numpy's per-call overhead dominates."""
    probs = np.exp(lam * family.direction + family.offset - np.max(lam * family.direction + family.offset))
    probs /= probs.sum()
    # d(lam (p - ref))/d lam = (p - ref) + lam p (u - <p, u>)
    slope = lam * probs * (family.direction - probs @ family.direction)
    if reference is None:
        residual = lam * probs[constrained] - family.ratios[constrained]
        jacobian = probs[constrained] + slope[constrained]
        return residual - residual.mean(), jacobian - jacobian.mean()
    shifted = probs - reference
    return lam * shifted - family.ratios, shifted + slope


def refine_lambda(family: LambdaFamily, lam: float, low: float, high: float, free: int | None = 1,
                  reference: np.ndarray | None = None, max_iterations: int = 40) -> tuple[float, int]:
    """Gauss-Newton on the residual vector from ``lam``, staying inside (low, high), with
    backtracking; the constrained set S is the one at ``lam``. At a clean solution the
    residual is zero and convergence quadratic; at a spurious minimum (non-zero residual) it
    is linear and the iteration cap ends it. Returns (lam, iterations)."""
    constrained = None
    if reference is None:
        constrained = np.flatnonzero(_free_mask(labels_at(family, lam), free))
    residual, jacobian = _residual_and_jacobian(family, lam, constrained, reference)
    cost = float(residual @ residual)
    round_off = 4 * np.finfo(float).eps
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        curvature = float(jacobian @ jacobian)
        if curvature == 0.0 or cost == 0.0:
            break
        step = -float(residual @ jacobian) / curvature
        accepted = False
        while abs(step) > round_off * abs(lam):
            trial = lam + step
            if low < trial < high:
                new_residual, new_jacobian = _residual_and_jacobian(family, trial, constrained, reference)
                new_cost = float(new_residual @ new_residual)
                if new_cost < cost:
                    accepted = True
                    break
            step *= 0.25
        if not accepted:
            break  # converged to round-off, or no descent left inside the bracket
        lam, residual, jacobian, cost = trial, new_residual, new_jacobian, new_cost
    return lam, iterations


# --------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    """One refined local minimum of the loss."""

    lam: float
    loss: float
    label: np.ndarray
    valid: bool
    why_not: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"lambda": self.lam, "loss": self.loss, "valid": self.valid, "why_not": self.why_not}


def assess(family: LambdaFamily, lam: float, free: int | None, reference: np.ndarray | None = None,
           bound: float | None = None, label_tolerance: float = LABEL_TOLERANCE) -> Candidate:
    loss = float(structure_loss(family, np.array([lam]), free, reference)[0])
    label = labels_at(family, lam)
    why = ""
    if abs(lam) < 1.0 - LAMBDA_FLOOR_TOLERANCE:
        why = f"|lambda| = {abs(lam):.6g} < 1 is impossible (|p_r - y_r| <= 1)"
    elif bound is not None and abs(lam) >= 0.999 * bound:
        why = "the lambda -> infinity asymptote (edge of the search range)"
    elif label.min() < -label_tolerance or label.max() > 1 + label_tolerance:
        why = f"not a valid label (entries in [{label.min():.3g}, {label.max():.3g}])"
    return Candidate(lam=float(lam), loss=loss, label=label, valid=not why, why_not=why)


@dataclass
class SearchResult:
    """Every candidate a search produced, best valid first, with what it cost."""

    candidates: list[Candidate]
    bound: float
    evaluations: int
    grid: tuple[np.ndarray, np.ndarray] | None = None  # (lam, loss) for plots
    notes: list[str] = field(default_factory=list)
    flat: list[tuple[float, float]] = field(default_factory=list)  # lam ranges where every lam fits

    @property
    def best(self) -> Candidate | None:
        valid = [c for c in self.candidates if c.valid]
        return min(valid, key=lambda c: c.loss) if valid else None


def tail_mass(family: LambdaFamily, lam: float, free: int) -> float:
    """|lam| x the probability outside the ``free`` largest entries of p(lam): once this is
    negligible next to c, larger |lam| (same sign) cannot bring the loss down any more,
    because the spread of lam p over S must match that of c at a solution."""
    probs = np.sort(_softmax_rows(lam * family.direction + family.offset))
    return abs(lam) * float(probs[: len(probs) - free].sum())


def search_bound(family: LambdaFamily, free: int, sign: float, start: float = SCAN_BOUND,
                 limit: float = SCAN_LIMIT) -> float:
    """The scan's |lam| bound for one sign: ``start``, times 10 while the tail still matters."""
    scale = float(np.linalg.norm(family.ratios))
    bound = start
    while bound < limit and tail_mass(family, sign * bound, free) > 1e-9 * scale:
        bound *= 10.0
    return bound


def scan_lambda(family: LambdaFamily, frees: tuple[int | None, ...] = (1,), reference: np.ndarray | None = None, *,
                points_per_decade: int = POINTS_PER_DECADE, label_tolerance: float = LABEL_TOLERANCE,
                keep_grid: bool = False) -> dict[int | None, SearchResult]:
    """Dense log-spaced scan of both signs, every local minimum refined and assessed, for each
    prior in ``frees`` from the same softmax evaluations."""
    found: dict[int | None, list[Candidate]] = {free: [] for free in frees}
    notes: dict[int | None, list[str]] = {free: [] for free in frees}
    grids: dict[int | None, list] = {free: [] for free in frees}
    flats: dict[int | None, list] = {free: [] for free in frees}
    evaluations = {free: 0 for free in frees}
    bounds = []
    tail_free = min((f for f in frees if f is not None), default=1)
    for sign in (1.0, -1.0):
        bound = search_bound(family, tail_free, sign)
        bounds.append(bound)
        decades = math.log10(bound / SCAN_START)
        count = max(16, int(decades * points_per_decade))
        lambdas = sign * np.logspace(math.log10(SCAN_START), math.log10(bound), count)
        losses = _chunked(family, lambdas, frees, reference)
        for free in frees:
            loss = losses[free]
            evaluations[free] += count
            if keep_grid:
                grids[free].append((lambdas, loss))
            flats[free] += _flat_ranges(lambdas, loss)
            inner = loss[1:-1]
            minima = np.flatnonzero((inner < loss[:-2]) & (inner <= loss[2:]) & (inner < REFINE_BELOW)) + 1
            if len(minima) > MAX_BRACKETS:
                notes[free].append(f"{len(minima)} local minima for lambda {'>' if sign > 0 else '<'} 0; refined "
                                   f"the {MAX_BRACKETS} lowest")
                minima = minima[np.argsort(loss[minima])[:MAX_BRACKETS]]
            for i in minima:
                low, high = sorted((lambdas[i - 1], lambdas[i + 1]))
                lam, iterations = refine_lambda(family, float(lambdas[i]), float(low), float(high), free, reference)
                evaluations[free] += iterations
                found[free].append(assess(family, lam, free, reference, bound, label_tolerance))
    results = {}
    for free in frees:
        grid = None
        if keep_grid:
            (pos_lam, pos_loss), (neg_lam, neg_loss) = grids[free]
            grid = (np.concatenate([neg_lam[::-1], pos_lam]), np.concatenate([neg_loss[::-1], pos_loss]))
        candidates = sorted(found[free], key=lambda c: (not c.valid, c.loss))
        results[free] = SearchResult(candidates, max(bounds), evaluations[free], grid, notes[free], flats[free])
    return results


def _flat_ranges(lambdas: np.ndarray, loss: np.ndarray, run: int = 3) -> list[tuple[float, float]]:
    """lam ranges where at least ``run`` consecutive grid points fit: a continuum of solutions
    (a saturated softmax), not an isolated minimum; the label is then not identifiable."""
    fits = np.concatenate([[False], loss <= FIT_TOLERANCE, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(fits))
    ranges = []
    for start, stop in zip(edges[::2], edges[1::2]):
        if stop - start >= run:
            low, high = sorted((float(lambdas[start]), float(lambdas[stop - 1])))
            ranges.append((low, high))
    return ranges


# --------------------------------------------------------------------------- PSO (the paper's manner)


@contextmanager
def _quiet_pyswarms():
    """pyswarms' Reporter runs logging.config.dictConfig when pyswarms is imported and whenever
    an optimiser is built, adding a stderr handler to the root logger and creating report.log
    in the working directory. Pointing its LOG_CFG variable at an empty incremental config
    makes that a no-op, so the user's logging and folder stay as they were."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        config = os.path.join(folder, "logging.yaml")
        with open(config, "w") as handle:
            handle.write("version: 1\nincremental: true\n")
        previous = os.environ.get("LOG_CFG")
        os.environ["LOG_CFG"] = config
        try:
            yield
        finally:
            if previous is None:
                del os.environ["LOG_CFG"]
            else:
                os.environ["LOG_CFG"] = previous


def pso_intervals(scale: float, bound: float) -> list[tuple[float, float]]:
    """The published intervals in s = scale x lam, then doubling widths up to |lam| = bound."""
    intervals = list(PSO_PUBLISHED)
    high = PSO_PUBLISHED[-2][1]
    while high < scale * bound:
        low, high = high, min(2 * high, scale * bound)
        intervals += [(low - 0.3, high), (-high - 0.3, -low)]
    return intervals


def pso_lambda(family: LambdaFamily, free: int, prior: str, *, seed: int = 0, bound: float | None = None,
               label_tolerance: float = LABEL_TOLERANCE) -> SearchResult:
    """Particle swarm search in the published code's manner (module docstring)."""
    scale = PSO_SCALE[prior]
    bound = bound or max(search_bound(family, free, 1.0), search_bound(family, free, -1.0))
    candidates: list[Candidate] = []
    evaluations = 0
    state = np.random.get_state()  # pyswarms draws from numpy's global generator
    np.random.seed(seed)
    try:
        with _quiet_pyswarms():
            from pyswarms.single import GlobalBestPSO

            for low, high in pso_intervals(scale, bound):
                optimiser = GlobalBestPSO(n_particles=PSO_PARTICLES, dimensions=1, options=dict(PSO_OPTIONS),
                                          bounds=(np.array([low]), np.array([high])))
                _, position = optimiser.optimize(
                    lambda s: structure_loss(family, s[:, 0] / scale, free), iters=PSO_ITERATIONS, verbose=False)
                evaluations += PSO_PARTICLES * PSO_ITERATIONS
                candidate = assess(family, float(position[0]) / scale, free, None, None, label_tolerance)
                candidates.append(candidate)
                if candidate.valid and candidate.loss <= PSO_ACCEPT:
                    break
    finally:
        np.random.set_state(state)
    candidates.sort(key=lambda c: (not c.valid, c.loss))
    return SearchResult(candidates, bound, evaluations)


# --------------------------------------------------------------------------- describing a label


def describe_label(label: np.ndarray, family: str) -> dict[str, Any]:
    """Target class and eps (smoothing / hard) or both classes and the coefficient (mixup)."""
    label = np.asarray(label, dtype=np.float64)
    k = len(label)
    order = np.argsort(-label)
    if family == "mixup":
        first, second = int(order[0]), int(order[1])
        return {"family": "mixup", "mixup_classes": [first, second], "mixup_coef": float(label[second]),
                "mixup_weights": [float(label[first]), float(label[second])],
                "confidence": float(label[first])}
    target = int(order[0])
    off = np.delete(label, target)
    eps = float(k * off.mean()) if k > 1 else 0.0
    return {"family": "hard" if abs(eps) <= HARD_TOLERANCE else "smoothing", "target": target,
            "label_smoothing": eps, "confidence": float(label[target])}


def structure_spread(label: np.ndarray, free: int) -> float:
    """max - min of the entries a prior constrains, relative to the label's largest entry."""
    label = np.asarray(label, dtype=np.float64)
    kept = label[_free_mask(label, free)]
    return float((kept.max() - kept.min()) / max(abs(label).max(), 1e-300)) if kept.size else 0.0


# --------------------------------------------------------------------------- fitting the priors


@dataclass
class PriorFit:
    prior: str  # smoothing | mixup
    result: SearchResult

    @property
    def best(self) -> Candidate | None:
        return self.result.best

    @property
    def loss(self) -> float:
        return self.best.loss if self.best is not None else math.inf


def fit_priors(family: LambdaFamily, priors: list[str], search: str = "scan", *, seed: int = 0,
               keep_grid: bool = False, label_tolerance: float = LABEL_TOLERANCE) -> dict[str, PriorFit]:
    """Search lam for each structure prior (the scan shares its softmax evaluations)."""
    for prior in priors:
        free = FREE_ENTRIES[prior]
        if family.num_classes - free < 2:
            raise InputError(f"the {prior} prior needs at least {free + 2} classes (K = {family.num_classes}): "
                             "with fewer, every lambda fits")
    if search == "scan":
        results = scan_lambda(family, tuple(FREE_ENTRIES[p] for p in priors), keep_grid=keep_grid,
                              label_tolerance=label_tolerance)
        return {prior: PriorFit(prior, results[FREE_ENTRIES[prior]]) for prior in priors}
    if search == "pso":
        return {prior: PriorFit(prior, pso_lambda(family, FREE_ENTRIES[prior], prior, seed=seed,
                                                  label_tolerance=label_tolerance)) for prior in priors}
    raise InputError(f"unknown search {search!r}; choose one of {', '.join(SEARCHES)}")


@dataclass
class SoftLabelRecovery:
    """What `recover_soft_label` found: the label, lam, the feature and why."""

    label: torch.Tensor  # K
    feature: torch.Tensor  # d
    lam: float | None
    row: int | None
    prior: str  # the structure prior that picked lam (smoothing | mixup), or "bias"
    loss: float
    converged: bool
    residual: float
    description: dict[str, Any]
    reason: str
    warnings: list[str]
    fits: dict[str, dict[str, Any]]
    ambiguous: bool = False
    grid: tuple[np.ndarray, np.ndarray] | None = None
    evaluations: int = 0


def recover_soft_label(weight: torch.Tensor, weight_grad: torch.Tensor, bias: torch.Tensor | None = None, *,
                       family: str = "auto", search: str = "scan", seed: int = 0, keep_grid: bool = False,
                       label_tolerance: float = LABEL_TOLERANCE) -> SoftLabelRecovery:
    """The lambda search: fit the structure prior(s), pick lam, return label and feature.

    ``bias`` (when given) enters the logits lam u + b; its gradient is not used here."""
    if family not in FAMILIES:
        raise InputError(f"unknown label family {family!r}; choose one of {', '.join(FAMILIES)}")
    lam_family = lambda_family(weight, weight_grad, bias)
    priors = ["smoothing", "mixup"] if family == "auto" else ["mixup" if family == "mixup" else "smoothing"]
    if family == "auto" and lam_family.num_classes - FREE_ENTRIES["mixup"] < 2:
        priors = ["smoothing"]
    fits = fit_priors(lam_family, priors, search, seed=seed, keep_grid=keep_grid, label_tolerance=label_tolerance)
    for prior, fit in fits.items():
        if fit.best is None and fit.result.flat and (family != "auto" or all(f.best is None for f in fits.values())):
            raise AttackError(f"the gradient does not determine the label: {_flat_text(fit)}")
    chosen, reason = _choose_prior(fits, family)
    fit = fits[chosen]
    best = fit.best
    if any(low * (1 - 1e-2 * np.sign(low)) <= best.lam <= high * (1 + 1e-2 * np.sign(high))
           for low, high in fit.result.flat):
        raise AttackError(f"the gradient does not determine the label: {_flat_text(fit)}")
    warnings: list[str] = []
    ambiguous = False
    for prior, other in fits.items():
        if other.result.flat:
            ambiguous = True
            warnings.append(f"ambiguous: {_flat_text(other)}; the gradient cannot pin the label down")
    if best.loss > FIT_TOLERANCE:
        warnings.append(f"approximate fit: loss {best.loss:.2e} > {FIT_TOLERANCE:.0e} (a noisy, pruned or "
                        "multi-sample gradient?)")
    rivals = [c for c in fit.result.candidates
              if c.valid and c is not best and c.loss <= max(FIT_TOLERANCE, 10 * best.loss)
              and abs(c.lam - best.lam) > 1e-6 * abs(best.lam)]
    if rivals:
        ambiguous = True
        warnings.append(f"ambiguous: {len(rivals)} other lambda(s) fit as well "
                        f"({', '.join(f'{c.lam:.6g}' for c in rivals[:3])}); kept the lowest loss")
    description = describe_label(best.label, chosen)
    if family == "hard" and description["family"] != "hard":
        warnings.append(f"--family hard, but the label is smoothed (eps = {description['label_smoothing']:.4g})")
    label = torch.as_tensor(best.label, dtype=torch.float64, device=weight_grad.device)
    feature = best.lam * lam_family.row_grad
    residual = gradient_residual(weight, bias, weight_grad, feature, label)
    return SoftLabelRecovery(
        label=label, feature=feature, lam=best.lam, row=lam_family.row, prior=chosen, loss=best.loss,
        converged=best.loss <= FIT_TOLERANCE, residual=residual, description=description, reason=reason,
        warnings=warnings, ambiguous=ambiguous,
        fits={p: {"loss": f.loss, "lambda": f.best.lam if f.best else None,
                  "bound": f.result.bound, "evaluations": f.result.evaluations,
                  "candidates": [c.to_dict() for c in f.result.candidates[:8]], "notes": f.result.notes,
                  "flat": f.result.flat}
              for p, f in fits.items()},
        grid=fit.result.grid, evaluations=sum(f.result.evaluations for f in fits.values()))


def _choose_prior(fits: dict[str, PriorFit], family: str) -> tuple[str, str]:
    """Which prior's lam to keep, and why; raises when nothing fits."""
    if len(fits) == 1:
        (prior, fit), = fits.items()
        if fit.best is None or fit.loss > APPROXIMATE_TOLERANCE:
            raise AttackError(_no_fit_message(fit))
        return prior, f"--family {family}: fitted the {prior} prior (loss {fit.loss:.2e})"
    smooth, mix = fits["smoothing"], fits["mixup"]
    if smooth.best is not None and smooth.loss <= FIT_TOLERANCE:
        # mixup's constraints are a subset of smoothing's, so it always fits as well: keep the simpler prior
        return "smoothing", (f"smoothing fits (loss {smooth.loss:.2e}); mixup ({_loss_text(mix)}) frees one more "
                             "class and is not needed")
    if mix.best is not None and mix.loss <= FIT_TOLERANCE:
        return "mixup", f"mixup fits (loss {mix.loss:.2e}); smoothing does not ({_loss_text(smooth)})"
    if mix.best is not None and mix.loss <= APPROXIMATE_TOLERANCE and mix.loss * CLEARLY_BETTER <= smooth.loss:
        return "mixup", (f"neither prior fits exactly; mixup (loss {mix.loss:.2e}) is clearly better than "
                         f"smoothing ({_loss_text(smooth)})")
    if smooth.best is not None and smooth.loss <= APPROXIMATE_TOLERANCE:
        return "smoothing", (f"neither prior fits exactly; kept smoothing (loss {smooth.loss:.2e}; mixup, "
                             f"{_loss_text(mix)}, is not clearly better)")
    if mix.best is not None and mix.loss <= APPROXIMATE_TOLERANCE:
        return "mixup", (f"neither prior fits exactly; mixup fits approximately (loss {mix.loss:.2e}), smoothing "
                         f"does not ({_loss_text(smooth)})")
    raise AttackError("the gradient fits neither label family: " + _no_fit_message(smooth) + "; "
                      + _no_fit_message(mix))


def _loss_text(fit: PriorFit) -> str:
    return f"loss {fit.loss:.2e}" if fit.best is not None else "no minimum is a valid label"


def _flat_text(fit: PriorFit) -> str:
    low, high = fit.result.flat[0]
    return (f"every lambda in [{low:.6g}, {high:.6g}] fits the {fit.prior} prior (a saturated softmax makes the "
            "label family flat)")


def _no_fit_message(fit: PriorFit) -> str:
    result = fit.result
    if not result.candidates:
        return f"{fit.prior}: no minimum of the loss for 1 <= |lambda| <= {result.bound:.0e}"
    if fit.best is None:
        worst = result.candidates[0]
        return (f"{fit.prior}: {len(result.candidates)} minima for 1 <= |lambda| <= {result.bound:.0e}, none a valid "
                f"label (best at lambda {worst.lam:.6g}: {worst.why_not})")
    return (f"{fit.prior}: best loss {fit.loss:.2e} at lambda {fit.best.lam:.6g} is above {APPROXIMATE_TOLERANCE} "
            "(the label does not have this structure)")


# --------------------------------------------------------------------------- with a bias, and features


def bias_feature(weight_grad: torch.Tensor, bias_grad: torch.Tensor) -> torch.Tensor:
    """x = G^T g / <g, g>: each row's G_i / g_i, averaged with weights g_i^2 (least squares)."""
    weight_grad, bias_grad = weight_grad.to(torch.float64), bias_grad.to(torch.float64)
    power = float(bias_grad @ bias_grad)
    if power == 0.0:
        if float(weight_grad.abs().max()) == 0.0:
            raise AttackError(ZERO_GRADIENT)
        raise AttackError("the bias gradient is zero but the weight gradient is not: not a single-sample gradient "
                          "of this layer (try --method lambda)")
    return weight_grad.T @ bias_grad / power


def recover_with_bias(weight: torch.Tensor, bias: torch.Tensor, weight_grad: torch.Tensor,
                      bias_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Exact label and feature from a last layer with a bias: (y, x, residual)."""
    feature = bias_feature(weight_grad, bias_grad)
    probs = torch.softmax(weight.to(feature) @ feature + bias.to(feature), dim=0)
    label = probs - bias_grad.to(feature)
    return label, feature, gradient_residual(weight, bias, weight_grad, feature, label)


def gradient_residual(weight: torch.Tensor, bias: torch.Tensor | None, weight_grad: torch.Tensor,
                      feature: torch.Tensor, label: torch.Tensor) -> float:
    """||(softmax(W x + b) - y) x^T - G|| / ||G||: does (x, y) reproduce the gradient?"""
    weight_grad = weight_grad.to(torch.float64)
    feature, label = feature.to(weight_grad), label.to(weight_grad)
    logits = weight.to(weight_grad) @ feature + (0 if bias is None else bias.to(weight_grad))
    rebuilt = torch.outer(torch.softmax(logits, dim=0) - label, feature)
    return float((rebuilt - weight_grad).norm() / weight_grad.norm())


def feature_for_label(weight: torch.Tensor, weight_grad: torch.Tensor, label: torch.Tensor,
                      bias: torch.Tensor | None = None, lam_hint: float | None = None) -> tuple[torch.Tensor, float]:
    """Without a bias: the x = lam G_r that best explains a given label y, i.e. the lam that
    minimises ||lam (p(lam) - y) - c|| (refined from ``lam_hint`` when it is given and fits,
    else found by the scan). Returns (x, lam)."""
    lam_family = lambda_family(weight, weight_grad, bias)
    reference = _np(label.to(torch.float64))
    if lam_hint is not None and abs(lam_hint) >= 1.0:
        low, high = sorted((lam_hint * 0.999, lam_hint * 1.001))
        lam, _ = refine_lambda(lam_family, lam_hint, low, high, None, reference)
        if assess(lam_family, lam, None, reference).loss <= FIT_TOLERANCE:
            return lam * lam_family.row_grad, lam
    result = scan_lambda(lam_family, (None,), reference, label_tolerance=math.inf, keep_grid=True)[None]
    if result.candidates:
        lam = min(result.candidates, key=lambda c: c.loss).lam
    else:  # no clear minimum (a label that does not fit): the best grid point, refined; the residual tells
        lambdas, loss = result.grid
        i = int(np.clip(np.argmin(loss), 1, len(loss) - 2))
        low, high = sorted((float(lambdas[i - 1]), float(lambdas[i + 1])))
        lam, _ = refine_lambda(lam_family, float(lambdas[i]), low, high, None, reference)
    return lam * lam_family.row_grad, lam
