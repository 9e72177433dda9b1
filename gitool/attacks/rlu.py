"""RLU: Recovering Labels from Local Updates (Chen & Vikalo, ICML 2024), done cleanly.

Symbols (as in `gitool.attacks.label_counts`): K classes, N = B x m samples over m
local steps of B, counts n (K) with sum_j n_j = N, learning rate eta, optimiser
coefficients c_s (`optimizer_response`), S (K x K) the erroneous confidence
S_{c,j} = E[softmax_j | true class c].

One SGD step on a batch with counts n^(s) changes the output bias by
(eta / B) A^(s) n^(s), with A^(s) = I - S^(s)^T (A_jj = 1 - S_jj, A_jc = -S_{c,j}):
a sample of class c adds y - p to the bias. Over m steps with the client's optimiser,

    u := -N g_b = sum_s c_s A^(s) n^(s) * m / sum_s c_s ~ A_eff n,
    A_eff = sum_s c_s A^(s) / sum_s c_s         (n^(s) ~ n / m),

where g_b is the equivalent mean bias gradient (`gitool.labels_batch.output_layer`).
The columns of A sum to zero, so the sum constraint sum_j n_j = N is added and the
system is solved by non-negative least squares. S^(s) is measured on a small labelled
auxiliary set. The server sees neither the client's data nor the intermediate models:

1. first estimate: step s sits at fraction w_s (from the optimiser's response) of the
   way from the global model to the received one; the auxiliary features and the
   classifier are interpolated between both ends (`drifted_system`);
2. refinement rounds: from the global model, simulate the m local steps on the
   auxiliary set, weighted so that every step sees the class mix n / m of the current
   estimate, with the client's optimiser (`simulate_drift`); compare the simulated end
   with the received model (the auxiliary statistics at the received model are known
   exactly) and spread the end-point discrepancy along the simulated path in
   proportion to progress (`calibrate`); solve again. Stop when a round moves
   almost no labels. The client's batches are a random split of its labels and the
   path is not linear in them, so the system is averaged over a few random splits of
   the current counts into m batches of B (`batch_mixes`, `expected_system`).
   The simulation uses at most a couple of hundred auxiliary samples (it is the
   costly part); both ends are pinned to the statistics of the whole set.

Assumes hard labels, known eta, B, m and optimiser (SGD, momentum gamma, FedProx mu,
weight decay) and that the auxiliary data resemble the client's classes.
"""

from __future__ import annotations

import copy

import numpy as np
import torch


def class_confidence(probs: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """S (K x K): S_{c,j} = mean over samples of class c of weights_n * softmax_j.

    ``weights`` None is the paper's S; feature sums O_n give the bias-free variant's
    matrix. A class without samples gets a zero row (callers refuse that case)."""
    values = probs if weights is None else probs * weights[:, None]
    total = torch.zeros(num_classes, num_classes, dtype=probs.dtype, device=probs.device)
    total.index_add_(0, labels, values)
    count = torch.bincount(labels, minlength=num_classes).to(probs.dtype).clamp_min(1)
    return total / count[:, None]


def bias_system(confidence: torch.Tensor, diagonal: torch.Tensor | None = None) -> torch.Tensor:
    """A (K x K): A_jj = diagonal_j - S_jj, A_jc = -S_{c,j} (diagonal 1: the bias system,
    whose columns sum to zero; the bias-free variant passes E[O | c])."""
    ones = torch.ones(confidence.shape[0], dtype=confidence.dtype, device=confidence.device)
    return torch.diag(ones if diagonal is None else diagonal) - confidence.T


def step_system(probs: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                use_feature_sums: bool = False) -> torch.Tensor:
    """A of one model state from the auxiliary softmax outputs (and features).

    With ``use_feature_sums`` (a classifier without bias) the observed signal is the
    weight rows' sums g_j = sum_d G_{j,d}, in which a sample of class c counts with its
    feature sum O: A_jc = 1[j=c] E[O | c] - E[p_j O | c]."""
    if not use_feature_sums:
        return bias_system(class_confidence(probs, labels, num_classes))
    sums = features.sum(dim=1)
    per_class = torch.bincount(labels, minlength=num_classes).to(sums.dtype).clamp_min(1)
    diagonal = torch.zeros(num_classes, dtype=sums.dtype, device=sums.device).index_add_(0, labels, sums) / per_class
    return bias_system(class_confidence(probs, labels, num_classes, sums), diagonal)


def weighted_system(systems: list[torch.Tensor], coefficients: torch.Tensor) -> torch.Tensor:
    """A_eff = sum_s c_s A^(s) / sum_s c_s."""
    stacked = torch.stack(systems)
    weights = coefficients.to(stacked) / coefficients.sum()
    return (weights[:, None, None] * stacked).sum(dim=0)


def solve_counts_nnls(system: torch.Tensor, observed: torch.Tensor, total: int) -> tuple[torch.Tensor, float]:
    """min ||A n - u|| over n >= 0 with sum_j n_j = N appended as one heavily weighted
    row (A's columns sum to zero, so that row carries the scale). Returns (real n,
    relative residual ||A n - u|| / ||u||)."""
    from scipy.optimize import nnls

    a = system.detach().cpu().double().numpy()
    u = observed.detach().cpu().double().numpy()
    scale = max(float(np.abs(a).max()), 1e-12) * 10.0
    stacked = np.vstack([a, np.full((1, a.shape[1]), scale)])
    rhs = np.concatenate([u, [scale * total]])
    estimate, _ = nnls(stacked, rhs, maxiter=50 * a.shape[1])
    residual = float(np.linalg.norm(a @ estimate - u) / max(np.linalg.norm(u), 1e-300))
    return torch.as_tensor(estimate, dtype=torch.float64), residual


def path_fractions(response: torch.Tensor) -> torch.Tensor:
    """w_s (m): where the weights are before step s, as a fraction of the whole update,
    if every step's gradient were the same: w_s = sum_{t<s} R[s, t] / sum_t R[m, t]."""
    steps = response.shape[1]
    return response[:steps].sum(dim=1) / response[steps].sum().clamp_min(1e-300)


def drifted_system(features0: torch.Tensor, features1: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, weight_delta: torch.Tensor, bias_delta: torch.Tensor | None,
                   fractions: torch.Tensor, coefficients: torch.Tensor, num_classes: int,
                   use_feature_sums: bool = False) -> torch.Tensor:
    """First estimate of A_eff: step s at fraction w_s between the global model and the
    received one, auxiliary features x_s = x_0 + w_s (x_m - x_0), classifier
    W + w_s dW and b + w_s db."""
    systems = []
    for fraction in fractions.tolist():
        features = features0 + fraction * (features1 - features0)
        logits = features @ (weight + fraction * weight_delta).T
        if bias is not None:
            logits = logits + bias + fraction * bias_delta
        systems.append(step_system(torch.softmax(logits, dim=1), features, labels, num_classes, use_feature_sums))
    return weighted_system(systems, coefficients)


def simulate_drift(model, inputs: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, *, steps: int,
                   batch_size: int, lr: float, optimizer: str, momentum: float = 0.0, prox_mu: float = 0.0,
                   weight_decay: float = 0.0, use_feature_sums: bool = False,
                   dtype: torch.dtype = torch.float32,
                   points: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Simulate the client's m local steps on the auxiliary set from the global model.

    Every step's loss weights an auxiliary sample of class c by n_c / (m B |aux_c|), so
    that the step sees the class mix n / m of the estimate (the expected gradient of a
    batch with those counts); with batch norm in train mode, whose statistics depend on
    the batch, each step trains on one batch of B samples with that mix instead.
    ``counts`` may also be m x K, the class counts of each step's batch (`batch_mixes`):
    step s then sees the mix n^(s) (weights n^(s)_c / (B |aux_c|)).
    Returns the m + 1 systems A at theta_0 .. theta_m and the progress of the
    classifier, ||theta_s - theta_0|| / ||theta_m - theta_0||, s = 0..m.
    The simulation is an approximation anyway, so it runs in ``dtype`` (float32: twice
    as fast as float64); the systems come back in float64. ``model`` is not modified.

    ``points`` (batch norm only): measure the system at that many evenly spaced steps
    (0 and m always) and interpolate linearly in between. With batch statistics every
    measurement is an extra forward pass over the auxiliary samples, and the simulated
    path (an expected gradient) is smooth."""
    from gitool.models import DROPOUT_TYPES, forward_with_features, last_linear

    model = copy.deepcopy(model).to(dtype)
    dropouts = [m for m in model.modules() if isinstance(m, DROPOUT_TYPES)]
    for dropout in dropouts:
        dropout.eval()  # the expected path: dropout's masks are the client's own randomness
    inputs = inputs.to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    velocity = [torch.zeros_like(p) for p in params]
    classifier = [p for p in last_linear(model).parameters()]
    classifier_start = [p.detach().clone() for p in classifier]
    num_classes = counts.shape[-1]
    per_class = torch.bincount(labels, minlength=num_classes).to(torch.float64).clamp_min(1)
    mixes = counts.to(per_class) / steps if counts.dim() == 1 else counts.to(per_class)
    mixes = mixes.expand(steps, num_classes)
    sample_weights = (mixes / (batch_size * per_class))[:, labels].to(inputs.dtype)
    gamma = momentum if optimizer == "momentum" else 0.0
    mu = prox_mu if optimizer == "fedprox" else 0.0
    batch_norm = has_batch_statistics(model)
    if batch_norm:
        # Batch norm in train mode: train on a batch of B auxiliary samples with the
        # estimated class mix, as the client does, and evaluate every sample with that
        # batch's statistics (momentum 1 makes the running statistics the batch's).
        batches = [mixed_batch(labels, mix, batch_size) for mix in mixes]
        for norm in model.modules():
            if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
                norm.momentum = 1.0
    measured = measured_steps(steps, points if batch_norm else None)
    systems, progress = [], []
    for step in range(steps + 1):
        if batch_norm:
            batch = batches[min(step, steps - 1)]
            train_logits, _ = forward_with_features(model, inputs[batch])
            if step in measured:
                model.eval()
                with torch.no_grad():
                    logits, features = forward_with_features(model, inputs)
                model.train()
                for dropout in dropouts:
                    dropout.eval()
        else:
            logits, features = forward_with_features(model, inputs)
        if step in measured:
            probs = torch.softmax(logits.detach().double(), dim=1)
            systems.append(step_system(probs, features.detach().double(), labels, num_classes, use_feature_sums))
        else:
            systems.append(None)
        progress.append(float(torch.sqrt(sum(((p.detach() - p0) ** 2).sum()
                                             for p, p0 in zip(classifier, classifier_start)))))
        if step == steps:
            break
        if batch_norm:
            loss = torch.nn.functional.cross_entropy(train_logits, labels[batch])
        else:
            log_probs = torch.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
            loss = -(sample_weights[step] * log_probs).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for p, g, v, p0 in zip(params, grads, velocity, start):
                direction = torch.zeros_like(p) if g is None else g.clone()
                direction.add_(p - p0, alpha=mu).add_(p, alpha=weight_decay)
                v.mul_(gamma).add_(direction)
                p.sub_(v, alpha=lr)
    progress_t = torch.tensor(progress, dtype=torch.float64)
    return interpolate_systems(systems), progress_t / progress_t[-1].clamp_min(1e-300)


def batch_mixes(counts: torch.Tensor, steps: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """n^(s) (m x K): the class counts of the m batches of B when the client's N = B m
    labels, ``counts`` (integers, K), are shuffled and cut into batches, as a client
    drawing its batches at random does. Each row sums to B (when N < B m the last
    batches hold what is left)."""
    labels = torch.repeat_interleave(torch.arange(counts.numel()), counts.to(torch.int64).cpu())
    labels = labels[torch.randperm(len(labels), generator=generator)]
    return torch.stack([torch.bincount(labels[s * batch_size:(s + 1) * batch_size], minlength=counts.numel())
                        for s in range(steps)])


def expected_system(systems: list[torch.Tensor]) -> torch.Tensor:
    """The mean of the effective systems A_eff of several simulated paths (one per draw
    of the batches, `batch_mixes`): a Monte Carlo estimate of E[A_eff | n].

    A_eff is not linear in the batches: with a long path (momentum 0.9 and m = 10 move
    the weights sum_s c_s = 41 learning-rate steps, against 10 for SGD) a batch rich in one
    class bends the rest of the path, so the path of the mean batch n / m is not the mean
    path. Measured on LeNet-5 at 52% held-out accuracy, momentum, B = 32, m = 10, the true
    counts, the paths run on the whole auxiliary set without calibration: iAcc 0.915 with
    the mean batch, 0.960 with the mean over 4 draws (the bound with the client's own
    path: 0.951; 6 updates)."""
    return torch.stack(systems).mean(dim=0)


def measured_steps(steps: int, points: int | None) -> set[int]:
    """The steps 0..m where `simulate_drift` measures the system: all of them, or
    ``points`` evenly spaced ones (at least the two ends)."""
    if points is None or points >= steps + 1:
        return set(range(steps + 1))
    points = max(points, 2)
    return {round(i * steps / (points - 1)) for i in range(points)}


def interpolate_systems(systems: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Fill the unmeasured (None) entries linearly between their measured neighbours
    (the first and last entries are always measured)."""
    known = [i for i, system in enumerate(systems) if system is not None]
    filled = list(systems)
    for left, right in zip(known, known[1:]):
        for i in range(left + 1, right):
            weight = (i - left) / (right - left)
            filled[i] = (1 - weight) * systems[left] + weight * systems[right]
    return filled


def effective_fraction(response: torch.Tensor, coefficients: torch.Tensor) -> float:
    """t* = sum_s c_s w_s / sum_s c_s: the point of the straight path from the global to
    the received model whose statistics stand for all m steps in the midpoint drift
    model (0.45 for plain SGD with m = 10; 0 for one step). To first order in the drift,
    A(theta_0 + t* delta) equals A_eff = sum_s c_s A(theta_s) / sum_s c_s."""
    return float((coefficients * path_fractions(response)).sum() / coefficients.sum())


def calibrate(simulated: list[torch.Tensor], progress: torch.Tensor, start: torch.Tensor,
              end: torch.Tensor) -> list[torch.Tensor]:
    """Per-step systems of the simulated path, pinned to the measured ends: the system
    of the global model (``start``) and of the received model (``end``) on the whole
    auxiliary set. A^(s) + (1 - progress_s) (start - A_sim(0)) + progress_s (end -
    A_sim(m)) for s = 0..m-1: the simulation gives the shape of the path, the received
    model where it really ends."""
    start_gap, end_gap = start - simulated[0], end - simulated[-1]
    return [system + (1 - float(progress[s])) * start_gap + float(progress[s]) * end_gap
            for s, system in enumerate(simulated[:-1])]


def has_batch_statistics(model) -> bool:
    """True when the model normalises with the statistics of the batch (batch norm in
    train mode): its outputs on a sample then depend on the rest of the batch."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def outputs_with_batch_mix(model, inputs: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor,
                           batch_size: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax, features) of every auxiliary sample when batch norm uses the statistics
    of a batch of ``batch_size`` auxiliary samples with the class mix of ``counts``.

    A client in train mode normalises each step with its own batch, whose class mix is
    what we are estimating; a balanced auxiliary batch has other statistics. The mixed
    batch sets the normalisation statistics (momentum 1), then all samples are
    evaluated with them (in ``dtype``; the outputs come back in float64)."""
    from gitool.models import forward_with_features

    model = copy.deepcopy(model).to(dtype).eval()
    inputs = inputs.to(dtype)
    batch = inputs[mixed_batch(labels, counts, batch_size)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for norm in norms:
            norm.momentum = 1.0
            norm.train()  # only the batch norms: no dropout in this measuring pass
        model(batch)
        model.eval()
        logits, features = forward_with_features(model, inputs)
    return torch.softmax(logits.double(), dim=1), features.double()


def mixed_batch(labels: torch.Tensor, counts: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Indices of ``batch_size`` auxiliary samples whose class mix follows ``counts``
    (largest-remainder rounding; a class's items are reused when it has too few)."""
    from gitool.attacks.label_counts import largest_remainder

    chosen = []
    for cls, k in enumerate(largest_remainder(counts, batch_size).tolist()):
        items = torch.nonzero(labels == cls).flatten()
        if k and len(items):
            chosen.append(items[torch.arange(k, device=items.device) % len(items)])
    return torch.cat(chosen) if chosen else torch.arange(len(labels), device=labels.device)
