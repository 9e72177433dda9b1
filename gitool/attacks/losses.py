"""The client's loss, shared by the client simulator and the attacks that re-run it.

The soft-label cross-entropy of methods.md section 0: L = -(1/B) sum_n sum_i y_ni log p_ni
with p_n = softmax(z_n). Hard labels are one-hot y; label smoothing and mixup are soft y.
"""

from __future__ import annotations

import torch


def soft_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_i y_i log softmax(z)_i."""
    return -(labels * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def smooth_labels(labels: torch.Tensor, eps: torch.Tensor | float) -> torch.Tensor:
    """Label smoothing, y = (1 - eps) y + eps / K, with one eps for all rows or one per row."""
    eps = torch.as_tensor(eps, dtype=labels.dtype)
    if eps.ndim == 1:
        eps = eps[:, None]
    return (1 - eps) * labels + eps / labels.shape[1]
