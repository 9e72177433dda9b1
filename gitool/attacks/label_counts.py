"""Label counts of a batch (or of m local steps) from the output layer's gradient/update.

Symbols (methods.md sections 0 and 3), used by every function below:

- K classes; the classifier is z = W x + b with W (K x d), x the last-layer feature.
- N = B x m samples: B per step, m local steps (m = 1 for a gradient).
- G (K x d) and g_b (K): the *equivalent mean gradient* of the weight and bias, i.e.
  the mean over all N samples of the per-sample gradients (p_n - y_n) x_n^T and
  (p_n - y_n); for a gradient it is the gradient itself, for an update see
  `equivalent_gradient`.
- g_j = sum_d G_{j,d}: row sums; O_n = sum_d x_{n,d}: the feature sum of sample n.
- n (K): the counts to recover, sum_j n_j = N.
- S (K x K): S_{c,j} = E[softmax_j(z) | true class c], the "erroneous confidence" of
  the model, estimated on labelled auxiliary data.

Everything here is pure float64 tensor math; the adapters in `gitool.labels_batch`
turn an update into these tensors.
"""

from __future__ import annotations

import torch

# --------------------------------------------------------------------------- rounding


def largest_remainder(values: torch.Tensor, total: int) -> torch.Tensor:
    """Non-negative integers summing exactly to ``total``, proportional to ``values``.

    Negative entries are clipped to 0; the scaled values are floored and the missing
    units go to the largest fractional parts (Hamilton's method). All-zero input
    spreads ``total`` as evenly as possible."""
    values = torch.as_tensor(values, dtype=torch.float64).clamp_min(0).cpu()
    if total <= 0:
        return torch.zeros(values.shape, dtype=torch.int64)
    mass = float(values.sum())
    scaled = values * (total / mass) if mass > 0 else torch.full_like(values, total / values.numel())
    counts = scaled.floor().to(torch.int64)
    missing = total - int(counts.sum())
    if missing > 0:
        order = torch.argsort(scaled - counts, descending=True, stable=True)
        counts[order[:missing]] += 1
    return counts


# --------------------------------------------------------------------------- optimiser


def optimizer_response(steps: int, lr: float, optimizer: str, momentum: float = 0.0, prox_mu: float = 0.0,
                       weight_decay: float = 0.0) -> torch.Tensor:
    """R (m+1 x m): R[t, s] = d theta_t / d g_s divided by -eta.

    The client's optimiser (gitool.capture: v_t = gamma v_{t-1} + g_t + mu (theta_t -
    theta_0) + wd theta_t, theta_{t+1} = theta_t - eta v_t) is linear in the
    gradients, so theta_t = (the path without gradients) - eta sum_s R[t, s] g_s.
    Row m gives the coefficients c_s of the final update: 1 for SGD,
    (1 - gamma^(m-s)) / (1 - gamma) for momentum, (1 - eta mu)^(m-1-s) for FedProx."""
    if optimizer not in ("sgd", "momentum", "fedprox"):
        raise ValueError(f"unknown optimizer {optimizer!r}")
    gamma = momentum if optimizer == "momentum" else 0.0
    mu = prox_mu if optimizer == "fedprox" else 0.0
    response = torch.zeros(steps + 1, steps, dtype=torch.float64)
    for s in range(steps):
        # Run the recurrence from theta_0 = 0 with a unit gradient at step s only.
        theta, velocity = 0.0, 0.0
        for t in range(steps):
            direction = (1.0 if t == s else 0.0) + mu * theta + weight_decay * theta
            velocity = gamma * velocity + direction
            theta = theta - lr * velocity
            response[t + 1, s] = -theta / lr
    return response


def drift_without_gradients(theta0: torch.Tensor, steps: int, lr: float, optimizer: str, momentum: float = 0.0,
                            prox_mu: float = 0.0, weight_decay: float = 0.0) -> torch.Tensor:
    """theta_m - theta_0 when every gradient is zero: only weight decay moves the weights
    (FedProx pulls towards theta_0, which is where they already are)."""
    if not weight_decay:
        return torch.zeros_like(theta0)
    gamma = momentum if optimizer == "momentum" else 0.0
    mu = prox_mu if optimizer == "fedprox" else 0.0
    theta, velocity = theta0.clone(), torch.zeros_like(theta0)
    for _ in range(steps):
        velocity = gamma * velocity + mu * (theta - theta0) + weight_decay * theta
        theta = theta - lr * velocity
    return theta - theta0


def mean_gradient(delta: torch.Tensor, theta0: torch.Tensor, steps: int, lr: float, optimizer: str,
                  momentum: float = 0.0, prox_mu: float = 0.0, weight_decay: float = 0.0,
                  coefficient_sum: float | None = None) -> torch.Tensor:
    """The gradient g that, taken at every one of the m local steps, gives the update:
    delta = drift - eta (sum_s c_s) g, so g = -(delta - drift) / (eta sum_s c_s). Exact for
    one step (g = -delta / eta - wd theta_0, momentum and the FedProx term vanish there);
    for m > 1 it is the c-weighted mean of the step gradients."""
    if coefficient_sum is None:
        coefficient_sum = float(optimizer_response(steps, lr, optimizer, momentum, prox_mu, weight_decay)[steps].sum())
    drift = drift_without_gradients(theta0, steps, lr, optimizer, momentum, prox_mu, weight_decay)
    return -(delta - drift) / (lr * coefficient_sum)


# --------------------------------------------------------------------------- classic baselines


def idlg_label(row_sums: torch.Tensor) -> int:
    """iDLG (B = 1, non-negative features): the true class is the only row whose
    gradient sum g_j = (p_j - y_j) O is negative, so it is the smallest one."""
    return int(torch.argmin(row_sums))


def yin_counts(weight_grad: torch.Tensor, total: int) -> torch.Tensor:
    """GradInversion (Yin et al. 2021): the ``total`` classes whose most negative weight
    gradient entry min_d G_{j,d} is smallest, one sample each (no repeated labels)."""
    score = weight_grad.min(dim=1).values
    counts = torch.zeros(weight_grad.shape[0], dtype=torch.int64)
    counts[torch.argsort(score)[:total]] = 1
    return counts


def llg_counts(row_sums: torch.Tensor, total: int, impact: float | None = None,
               offsets: torch.Tensor | None = None) -> torch.Tensor:
    """LLG (Wainakh et al. 2022) and, given ``impact`` and ``offsets``, LLG+.

    With offsets o_j removed, g_j - o_j ~ n_j * impact (impact < 0). Every class whose
    corrected sum is negative gets one label, then labels are added greedily to the
    class with the smallest corrected sum, which grows by -impact each time (LLG+
    counts a class as present first only below impact / 2). LLG has no
    auxiliary data: o = 0 and impact = (sum_{g_j<0} g_j / N)(1 + 1/K)."""
    num_classes = row_sums.numel()
    corrected = row_sums.clone() - (offsets if offsets is not None else 0)
    if impact is None:
        negative = corrected < 0
        impact = float(corrected[negative].sum()) / total * (1 + 1 / num_classes)
    else:
        # With offsets removed an absent class sits near 0 on either side: only a
        # deficit of at least half a sample's impact says the class is present.
        negative = corrected < impact / 2
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for j in torch.argsort(corrected)[: min(int(negative.sum()), total)].tolist():
        counts[j] += 1
        corrected[j] -= impact
    for _ in range(total - int(counts.sum())):
        j = int(torch.argmin(corrected))
        counts[j] += 1
        corrected[j] -= impact
    return counts


def zlg_estimate(row_sums: torch.Tensor, total: int, expected_softmax: torch.Tensor,
                 mean_feature_sum: float) -> torch.Tensor:
    """ZLG (Geng et al.): n_j = N (p_bar_j - g_j / O_bar), with p_bar the expected
    softmax and O_bar the mean feature sum on auxiliary data (real valued; clip and
    round with `largest_remainder`)."""
    return total * (expected_softmax - row_sums / mean_feature_sum)


def off_class_mean_logits(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """mu (K): mu_j = mean over the classes c != j of E[z_j | true class c], the mean logit
    of output j on samples of the other classes (each class weighs the same)."""
    total = torch.zeros(num_classes, num_classes, dtype=logits.dtype, device=logits.device)
    total.index_add_(0, labels, logits)
    count = torch.bincount(labels, minlength=num_classes).to(logits.dtype).clamp_min(1)
    mean = total / count[:, None]  # mean[c, j] = E[z_j | c]
    return (mean.sum(dim=0) - mean.diagonal()) / max(num_classes - 1, 1)


def published_rlu_estimate(bias_grad: torch.Tensor, shift: torch.Tensor, total: int) -> torch.Tensor:
    """The count estimator of the published RLU code: n_j proportional to
    max(0, s_j - g_b,j), rescaled to sum N, with s = softmax(mu) the off-class softmax of
    the mean logits (`off_class_mean_logits`). It reads g_b,j = p_bar_j - n_j / N with one
    shared stand-in s_j for every sample's p_j, whatever its class, where RLU solves
    with the per-class confidences S (real valued; round with `largest_remainder`)."""
    score = (shift - bias_grad).clamp_min(0)
    mass = float(score.sum())
    return total * score / mass if mass > 0 else torch.full_like(score, total / score.numel())


def ilrg_estimate(weight: torch.Tensor, bias: torch.Tensor, weight_grad: torch.Tensor, bias_grad: torch.Tensor,
                  total: int) -> tuple[torch.Tensor, float]:
    """iLRG (Ma et al., ICLR 2023). Class-average embedding z_j = G_j / g_b,j (the rows of
    the weight gradient are sums of (p - y) x, the bias gradient of (p - y)); its
    softmax p^(j) = softmax(W z_j + b) stands for every sample of class j. Solve
    N g_b,i = sum_j n_j (p^(j)_i - delta_ij) together with sum_j n_j = N by
    pseudo-inverse. Returns (real-valued n, relative residual)."""
    num_classes = weight.shape[0]
    safe = torch.where(bias_grad.abs() > 1e-300, bias_grad, torch.full_like(bias_grad, 1e-300))
    embeddings = weight_grad / safe[:, None]  # K x d, row j = z_j
    probs = torch.softmax(embeddings @ weight.T + bias, dim=1)  # row j = p^(j)
    like = dict(dtype=probs.dtype, device=probs.device)
    system = torch.cat([(probs - torch.eye(num_classes, **like)).T, torch.ones(1, num_classes, **like)])
    rhs = torch.cat([total * bias_grad, torch.tensor([float(total)], **like)])
    estimate = torch.linalg.pinv(system) @ rhs
    residual = float((system @ estimate - rhs).norm() / rhs.norm().clamp_min(1e-300))
    return estimate, residual
