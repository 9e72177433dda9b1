"""Per-sample labels, softmax outputs and features of a one-step batch gradient.

Symbols (docs/analytic.md, "Per-sample labels and features of a batch"): the classifier is
z = W x + b with W (K x d) and bias b (K, or none); the client's batch has B samples with
last-layer inputs X (B x d, row n is x_n), labels Y (B x K, row y_n) and softmax outputs
P (B x K, p_n = softmax(W x_n + b)). The mean cross-entropy of one step gives

    G = dL/dW = Delta^T X,   g = dL/db = Delta^T 1,   Delta = (P - Y) / B   (B x K).

Every row of Delta sums to zero, so rank(Delta) <= K - 1, and when Delta and X have rank B
the row space of G is the span of the B features. With the SVD G = U S V^T truncated to
rank B, X = C V^T for one unknown B x B matrix C (row n: the coordinates c_n of x_n), and

    M = G V = Delta^T C = (P(C) - Y)^T C / B,   p_n = softmax(W V c_n + b).

Given the labels this is K B equations (K more with the bias) in the B^2 entries of C; the
one scalar per sample that the single-sample lambda method searches (x_n scaled by s_n,
delta_n by 1/s_n) is fixed here too by the label prior, because softmax is not scale-free.
The labels themselves: the orthogonal complement T of col(G) = span{delta_n} contains the
all-ones vector and, for hard distinct labels, e_k has (nearly) no component in T minus 1
exactly for the classes k of the batch (instance-wise label restoration in the manner of
iLRG, Wang et al. 2023); with a bias, g ranks the classes as well. Each candidate label set
is seeded by a fixed point (P from the current C, then C by least squares) and finished by
Levenberg-Marquardt on all equations; a candidate counts only when its relative residual
reaches the data's precision, so a wrong label set is refused, never returned.

Refusals (:class:`AttackError`, naming the condition): B > K - 1, rank(G) < B (two samples
with equal label and parallel feature, or d < B), rank(G) > B (not one step of B samples),
no label set among the candidates reaches the residual limit (repeated labels that cannot
be separated, mixup, or a soft label of another kind).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from gitool.attacks.errors import AttackError, InputError

FAMILIES = ("hard", "smoothing")
SCREEN_ITERATIONS = 30  # Levenberg-Marquardt steps per candidate before the closest are run to the end
RESIDUAL_FACTOR = 1e4  # a candidate is accepted at a relative residual <= this x the data's precision


@dataclass
class PerSampleRecovery:
    labels: torch.Tensor  # B x K, rows in the order of ``features`` and ``softmax``
    softmax: torch.Tensor  # B x K
    features: torch.Tensor  # B x d
    classes: list[int]
    label_smoothing: float
    rank: int
    singular_values: list[float]
    residual: float  # ||(P - Y)^T X / B - G|| / ||G|| (and the bias equations when there is a bias)
    residual_limit: float
    iterations: int
    candidates_tried: int
    repeated: list[int] = field(default_factory=list)
    tried: list[dict] = field(default_factory=list)


def numerical_rank(singular: torch.Tensor, precision: float, shape: tuple[int, int]) -> int:
    """Singular values above max(K, d) x precision x the largest one count."""
    if singular.numel() == 0 or float(singular[0]) == 0.0:
        return 0
    limit = float(singular[0]) * precision * max(shape) * 10
    return int((singular > limit).sum())


def class_scores(weight_grad: torch.Tensor, batch: int) -> torch.Tensor:
    """||Pi_T' e_k||^2 per class k, T' the complement of col(G) without the all-ones
    direction: about 0 for the batch's classes, about (K - B - 1)/(K - B) for the others."""
    k = weight_grad.shape[0]
    u, _, _ = torch.linalg.svd(weight_grad, full_matrices=True)
    complement = u[:, batch:]
    return (complement ** 2).sum(1) - 1.0 / k


def candidate_sets(scores: torch.Tensor | None, bias_grad: torch.Tensor | None, batch: int, k: int,
                   limit: int) -> list[tuple[int, ...]]:
    """Label multisets to try, most plausible first: the B best-ranked classes (subspace
    scores, then the bias gradient), then sets with one class repeated."""
    rankings = []
    if scores is not None and k - batch >= 2:
        rankings.append(torch.argsort(scores, stable=True).tolist())
    if bias_grad is not None:
        rankings.append(torch.argsort(bias_grad, stable=True).tolist())
    if not rankings:
        rankings.append(list(range(k)))
    seen: list[tuple[int, ...]] = []

    def add(classes):
        key = tuple(sorted(classes))
        if len(key) == batch and key not in seen:
            seen.append(key)

    for ranking in rankings:
        add(ranking[:batch])
    if bias_grad is not None:  # g_k < 0 only for a class some sample has: those, the rest from the subspace ranking
        certain = [c for c in rankings[-1] if float(bias_grad[c]) < 0][:batch]
        missing = batch - len(certain)
        pool = [c for c in rankings[0] if c not in certain][:missing + 3]
        for fill in itertools.combinations(pool, missing):
            add(certain + list(fill))
        for fill in itertools.combinations_with_replacement(certain + pool[:2], missing):
            add(certain + list(fill))
    if bias_grad is not None:  # one class of the bias ranking's B swapped for one of the next three
        ranking = rankings[-1]
        for out in reversed(ranking[:batch]):
            for inn in ranking[batch:batch + 3]:
                add([c for c in ranking[:batch] if c != out] + [inn])
    for ranking in rankings:  # one repeated class, then two
        for repeat in ranking[:batch - 1]:
            add(ranking[:batch - 1] + [repeat])
        for a, b in itertools.combinations(ranking[:batch - 2], 2) if batch > 2 else ():
            add(ranking[:batch - 2] + [a, b])
    if k - batch == 1 and scores is not None and bias_grad is None:  # every set of K - 1 classes fits T alike
        for missing in range(k):
            add([c for c in range(k) if c != missing])
    return seen[:limit]


def _targets(classes: tuple[int, ...], k: int, eps: torch.Tensor, dtype) -> torch.Tensor:
    onehot = torch.zeros(len(classes), k, dtype=dtype)
    onehot[torch.arange(len(classes)), torch.tensor(classes)] = 1.0
    return (1 - eps) * onehot + eps / k


def _solve(classes, m, a, bias, bias_grad, family, max_iter, limit, seed="uniform"):
    """C (B x B) and eps for one label set: fixed point, then Levenberg-Marquardt.

    ``seed``: ``uniform`` starts from p_n = softmax(b) (untrained models are near it);
    ``ratio`` (needs the bias) from c_n = M[k_n] / g[k_n], the single-sample bias ratio of
    the sample's own class (exact when no other sample puts mass on k_n; confident models)."""
    batch, k = len(classes), m.shape[0]
    dtype = m.dtype
    offset = bias if bias is not None else torch.zeros(k, dtype=dtype)
    scale = float(m.norm()) + (float(bias_grad.norm()) if bias_grad is not None else 0.0)
    eps = torch.zeros((), dtype=dtype)
    targets = _targets(classes, k, eps, dtype)
    index = torch.tensor(classes)
    if seed == "ratio":
        start = m[index] / bias_grad[index].unsqueeze(1)
        spread = float(start.norm()) / batch ** 0.5 + 1e-300
        for row, cls in enumerate(classes):  # copies of a repeated class start apart
            copy = sum(1 for c in classes[:row] if c == cls)
            if copy:
                start[row] = start[row] + 0.3 * spread * torch.eye(batch, dtype=dtype)[copy % batch]
        probs = torch.softmax(start @ a.T + offset, 1)
    else:
        probs = torch.softmax(offset, 0).expand(batch, k).clone()
        # symmetry breaking for repeated classes: the j-th copy of a class is seeded a little apart
        for row, cls in enumerate(classes):
            copy = sum(1 for c in classes[:row] if c == cls)
            if copy:
                direction = a[:, copy % batch] / (a[:, copy % batch].norm() + 1e-300)
                probs[row] = torch.softmax(offset + 0.5 * copy * direction, 0)
    c = torch.linalg.lstsq((probs - targets).T / batch, m).solution
    for _ in range(20):  # fixed point: P from C, then C by least squares
        probs = torch.softmax(c @ a.T + offset, 1)
        c_new = torch.linalg.lstsq((probs - targets).T / batch, m).solution
        if float((c_new - c).norm()) <= 1e-3 * float(c.norm()):
            c = c_new
            break
        c = c_new
    fit_eps = family == "smoothing"

    def residual(theta):
        cc = theta[: batch * batch].view(batch, batch)
        e = theta[-1] if fit_eps else eps
        y = _targets_diff(classes, k, e, dtype)
        p = torch.softmax(cc @ a.T + offset, 1)
        parts = [((p - y).T @ cc / batch - m).reshape(-1)]
        if bias_grad is not None:
            parts.append((p - y).sum(0) / batch - bias_grad)
        return torch.cat(parts) / scale

    onehot = torch.nn.functional.one_hot(index, k).to(dtype)
    eye = torch.eye(batch, dtype=dtype)

    def jacobian(theta):
        """d residual / d theta, by hand: dp_n/dc_n = (diag(p_n) - p_n p_n^T) A."""
        cc = theta[: batch * batch].view(batch, batch)
        e = theta[-1] if fit_eps else eps
        y = _targets_diff(classes, k, e, dtype)
        p = torch.softmax(cc @ a.T + offset, 1)
        pa = p.unsqueeze(2) * a.unsqueeze(0)  # n, k, l: p_nk A_kl
        d = pa - p.unsqueeze(2) * (p @ a).unsqueeze(1)  # n, k, l: (J_n A)_kl
        top = (torch.einsum("nkl,nj->kjnl", d, cc) + torch.einsum("nk,jl->kjnl", p - y, eye)) / batch
        blocks = [top.reshape(k * batch, batch * batch)]
        if bias_grad is not None:
            blocks.append(d.permute(1, 0, 2).reshape(k, batch * batch) / batch)
        jac = torch.cat(blocks)
        if fit_eps:
            h = 1.0 / k - onehot  # dY/d eps
            column = [(-(h.T @ cc) / batch).reshape(-1)]
            if bias_grad is not None:
                column.append(-h.sum(0) / batch)
            jac = torch.cat([jac, torch.cat(column).unsqueeze(1)], 1)
        return jac / scale

    theta = torch.cat([c.reshape(-1), eps.view(1)]) if fit_eps else c.reshape(-1)
    r = residual(theta)
    cost = float(r.norm())
    mu = 1e-6
    iterations = 0
    for iterations in range(1, max_iter + 1):
        if cost <= limit * 1e-2:
            break
        jac = jacobian(theta)
        jtj, jtr = jac.T @ jac, jac.T @ r
        improved = False
        for _ in range(12):
            step = torch.linalg.solve(jtj + mu * torch.diag(jtj.diagonal() + 1e-30), -jtr)
            trial = theta + step
            r_trial = residual(trial)
            cost_trial = float(r_trial.norm())
            if cost_trial < cost:
                theta, r, cost, improved = trial, r_trial, cost_trial, True
                mu = max(mu / 10, 1e-15)
                break
            mu *= 10
        if not improved:
            break
    c = theta[: batch * batch].view(batch, batch)
    e = float(theta[-1]) if fit_eps else 0.0
    return c, e, cost, iterations


def _targets_diff(classes, k, eps, dtype):
    """_targets, differentiable in eps (no in-place writes into a tensor that needs it)."""
    onehot = torch.nn.functional.one_hot(torch.tensor(classes), k).to(dtype)
    return (1 - eps) * onehot + eps / k


def recover_per_sample(weight: torch.Tensor, bias: torch.Tensor | None, weight_grad: torch.Tensor,
                       bias_grad: torch.Tensor | None, batch: int, *, family: str = "hard",
                       precision: float = 2.0 ** -52, max_candidates: int = 64,
                       max_iter: int = 200) -> PerSampleRecovery:
    """Labels Y, softmax outputs P and features X (rows in one order) of a one-step
    gradient of the mean cross-entropy over ``batch`` samples (module docstring).
    ``precision``: the unit round-off of the update's dtype (float64: 2^-52)."""
    if family not in FAMILIES:
        raise InputError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if weight.dim() != 2 or weight_grad.shape != weight.shape:
        raise InputError(f"W is {tuple(weight.shape)} but dL/dW is {tuple(weight_grad.shape)}")
    k, d = weight.shape
    if (bias is None) != (bias_grad is None):
        raise InputError("the bias and its gradient must both be given or both be absent")
    if batch < 1:
        raise InputError(f"B must be >= 1, got {batch}")
    if batch > k - 1:
        raise AttackError(f"B = {batch} > K - 1 = {k - 1}: every sample delta sums to zero over the K classes, so "
                          f"at most K - 1 of them are independent and the batch cannot be separated")
    if batch > d:
        raise AttackError(f"B = {batch} > d = {d}: the B features cannot be independent in R^d")
    dtype = torch.float64
    weight, weight_grad = weight.to(dtype), weight_grad.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    bias_grad = None if bias_grad is None else bias_grad.to(dtype)
    u, s, vh = torch.linalg.svd(weight_grad, full_matrices=False)
    rank = numerical_rank(s, precision, (k, d))
    shown = [float(v) for v in s[: batch + 1]]
    if rank < batch:
        raise AttackError(f"rank deficient: dL/dW has rank {rank} < B = {batch} (singular values "
                          f"{', '.join(f'{v:.3g}' for v in shown)}): two samples with the same label and parallel "
                          "features, or a zero gradient, leave the batch inseparable")
    if rank > batch:
        raise AttackError(f"dL/dW has rank {rank} > B = {batch}: not the gradient of one step on {batch} samples "
                          "(a multi-step update, added noise, or a wrong batch size)")
    v = vh[:batch].T  # d x B, orthonormal basis of the features' span
    m = weight_grad @ v  # K x B
    a = weight @ v  # K x B: logits are a c_n + b
    scores = class_scores(weight_grad, batch) if k - batch >= 2 else None
    limit = RESIDUAL_FACTOR * precision
    candidates = candidate_sets(scores, bias_grad, batch, k, max_candidates)
    seeds = ("ratio", "uniform") if bias_grad is not None else ("uniform",)
    tried: list[dict] = []

    def attempt(classes, seed, iterations_allowed):
        c, eps, cost, iterations = _solve(classes, m, a, bias, bias_grad, family, iterations_allowed, limit, seed)
        tried.append({"classes": list(classes), "seed": seed, "residual": cost, "iterations": iterations})
        if cost > limit or not torch.isfinite(c).all():
            return None
        offset = bias if bias is not None else torch.zeros(k, dtype=dtype)
        probs = torch.softmax(c @ a.T + offset, 1)
        labels = _targets(classes, k, torch.tensor(eps, dtype=dtype), dtype)
        repeated = sorted({cls for cls in classes if classes.count(cls) > 1})
        return PerSampleRecovery(labels=labels, softmax=probs, features=c @ v.T, classes=list(classes),
                                 label_smoothing=eps, rank=rank, singular_values=shown, residual=cost,
                                 residual_limit=limit, iterations=iterations,
                                 candidates_tried=len({tuple(t["classes"]) for t in tried}), repeated=repeated,
                                 tried=tried)

    for classes in candidates:  # screening: a right label set converges in a few steps
        for seed in seeds:
            found = attempt(classes, seed, SCREEN_ITERATIONS)
            if found is not None:
                return found
    for row in sorted(tried, key=lambda t: t["residual"])[:2]:  # the closest ones, to the end
        found = attempt(tuple(row["classes"]), row["seed"], max_iter)
        if found is not None:
            return found
    best = min(tried, key=lambda row: row["residual"]) if tried else None
    detail = (f"; best: classes {best['classes']} at residual {best['residual']:.2e}" if best else "")
    raise AttackError(f"no {family} label set of B = {batch} samples reproduces the gradient within "
                      f"{limit:.1e} ({len({tuple(t['classes']) for t in tried})} candidate sets tried{detail}): "
                      "repeated labels that cannot be separated, a sample the model already predicts with "
                      "p_y ~ 1 (its delta vanishes), mixup, or soft labels of another kind")


def features_from_labels(weight_grad: torch.Tensor, labels: torch.Tensor, softmax: torch.Tensor
                         ) -> tuple[torch.Tensor, float]:
    """X = (Delta^T)^+ G with Delta = (P - Y) / B: the features of labels and softmax outputs
    recovered together, and the relative residual ||Delta^T X - G|| / ||G||."""
    if labels.shape != softmax.shape or labels.shape[1] != weight_grad.shape[0]:
        raise InputError(f"labels {tuple(labels.shape)} and softmax {tuple(softmax.shape)} do not fit "
                         f"dL/dW {tuple(weight_grad.shape)}")
    batch = labels.shape[0]
    delta = (softmax.to(torch.float64) - labels.to(torch.float64)) / batch
    grad = weight_grad.to(torch.float64)
    rank = int(torch.linalg.matrix_rank(delta))
    if rank < batch:
        raise AttackError(f"the sample deltas (P - Y)/B have rank {rank} < B = {batch}: the features are not "
                          "determined")
    features = torch.linalg.lstsq(delta.T, grad).solution
    residual = float((delta.T @ features - grad).norm() / max(float(grad.norm()), 1e-300))
    return features, residual
