"""How much leaked: metrics comparing what an attack recovered with the truth.

Conventions (methods.md section 4), stated because many tools get them wrong:

- images are denormalised to [0, 1] and clamped, then PSNR uses peak 1, per image,
  averaged over the batch;
- SSIM is the standard Gaussian-window SSIM (11 x 11, sigma 1.5, K1 = 0.01, K2 = 0.03,
  data range 1, statistics over the valid region), per image and channel, averaged;
- batches are matched one-to-one with the Hungarian assignment (on MSE for images, on
  L1 for labels, on 1 - cosine for features) before scoring, never "best of batch";
- label counts: cAcc = mean over classes of 1[(n_hat_j > 0) == (n_j > 0)],
  iAcc = sum_j min(n_hat_j, n_j) / N, LnAcc = fraction of classes counted exactly.

Each scorer takes tensors and returns a flat dict of numbers; ``SCORERS`` maps a
result kind to its scorer, so a new metric is one function plus one registry line.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from gitool.errors import GitoolError

# --------------------------------------------------------------------------- matching


def match_rows(cost: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one assignment minimising the total ``cost`` (recovered x truth)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.detach().cpu().to(torch.float64).numpy())
    return rows, cols


# --------------------------------------------------------------------------- images


def psnr(recovered: torch.Tensor, truth: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of (n, C, H, W) images in [0, 1]; inf where identical."""
    mse = ((recovered.to(torch.float64) - truth.to(torch.float64)) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(peak**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(recovered: torch.Tensor, truth: torch.Tensor, window_size: int = 11, sigma: float = 1.5,
         data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM of (n, C, H, W) images (Wang et al. 2004, Gaussian window).

    Images smaller than the window use a window as large as the smaller side."""
    x = recovered.to(torch.float64)
    y = truth.to(torch.float64)
    n, channels, height, width = x.shape
    size = min(window_size, height, width)
    window = _gaussian_window(size, sigma, torch.float64).to(x.device)
    window = window.expand(channels, 1, size, size).contiguous()

    def blur(img):
        return torch.nn.functional.conv2d(img, window, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


def score_images(recovered: torch.Tensor, truth: torch.Tensor) -> dict:
    """PSNR and SSIM after one-to-one matching on MSE. Both in [0, 1] already."""
    if recovered.shape[1:] != truth.shape[1:]:
        raise GitoolError(f"image shapes differ: recovered {tuple(recovered.shape[1:])} vs truth {tuple(truth.shape[1:])}")
    recovered = recovered.clamp(0, 1).to(torch.float64)
    truth = truth.clamp(0, 1).to(torch.float64)
    cost = ((recovered[:, None] - truth[None]) ** 2).flatten(2).mean(dim=2)
    rows, cols = match_rows(cost)
    p = psnr(recovered[rows], truth[cols])
    s = ssim(recovered[rows], truth[cols])
    finite = torch.where(torch.isinf(p), torch.full_like(p, 300.0), p)  # identical images: cap for the mean
    return {
        "psnr": float(finite.mean()),
        "ssim": float(s.mean()),
        "mse": float(cost[rows, cols].mean()),
        "psnr_per_image": [float(v) for v in finite],
        "ssim_per_image": [float(v) for v in s],
        "matching": [int(c) for c in cols],
    }


# --------------------------------------------------------------------------- labels


def score_labels(recovered: torch.Tensor, truth_labels: torch.Tensor, targets: torch.Tensor,
                 mix_coef: torch.Tensor, label_smoothing: torch.Tensor, family: str) -> dict:
    """Soft-label accuracy: max |y_hat - y|, target / top-2 correctness, and the error of
    eps (smoothing, eps_hat = K x mean off-target entry) or of the mixup coefficient."""
    recovered = recovered.to(torch.float64)
    truth_labels = truth_labels.to(torch.float64)
    if recovered.shape[1] != truth_labels.shape[1]:
        raise GitoolError(f"labels have {recovered.shape[1]} classes, the truth {truth_labels.shape[1]}")
    cost = (recovered[:, None] - truth_labels[None]).abs().sum(dim=2)
    rows, cols = match_rows(cost)
    rec, tru = recovered[rows], truth_labels[cols]
    tg, coef, eps = targets[cols], mix_coef[cols].to(torch.float64), label_smoothing[cols].to(torch.float64)
    k = rec.shape[1]
    max_abs = (rec - tru).abs().amax(dim=1)
    top1_ok = rec.argmax(dim=1) == tru.argmax(dim=1)
    out = {
        "max_abs_error": float(max_abs.max()),
        "max_abs_error_per_sample": [float(v) for v in max_abs],
        "target_accuracy": float(top1_ok.to(torch.float64).mean()),
        "matching": [int(c) for c in cols],
    }
    if family == "mixup":
        top2 = rec.topk(2, dim=1).indices.sort(dim=1).values
        want = tg.sort(dim=1).values
        out["top2_accuracy"] = float((top2 == want).all(dim=1).to(torch.float64).mean())
        coef_hat = rec.gather(1, tg[:, 1:2]).squeeze(1)
        out["mixup_coef_error"] = float((coef_hat - coef).abs().max())
    elif family == "smoothing":
        mask = torch.ones_like(rec, dtype=torch.bool)
        mask[torch.arange(rec.shape[0]), tg[:, 0]] = False
        eps_hat = k * (rec * mask).sum(dim=1) / (k - 1)
        out["eps_error"] = float((eps_hat - eps).abs().max())
    return out


def score_counts(recovered: torch.Tensor, truth: torch.Tensor) -> dict:
    """cAcc (class existence), iAcc (instances) and LnAcc (exact counts per class)."""
    recovered = recovered.to(torch.float64).round()
    truth = truth.to(torch.float64)
    if recovered.shape != truth.shape:
        raise GitoolError(f"counts have {recovered.numel()} classes, the truth {truth.numel()}")
    total = float(truth.sum())
    return {
        "cAcc": float(((recovered > 0) == (truth > 0)).to(torch.float64).mean()),
        "iAcc": float(torch.minimum(recovered, truth).sum() / total) if total else float("nan"),
        "LnAcc": float((recovered == truth).to(torch.float64).mean()),
        "recovered_total": int(recovered.sum()),
        "true_total": int(total),
    }


# --------------------------------------------------------------------------- features


def score_features(recovered: torch.Tensor, truth: torch.Tensor) -> dict:
    """Cosine similarity and relative error ||x_hat - x|| / ||x|| after matching."""
    rec = recovered.to(torch.float64).flatten(1)
    tru = truth.to(torch.float64).flatten(1)
    if rec.shape[1] != tru.shape[1]:
        raise GitoolError(f"features have dimension {rec.shape[1]}, the truth {tru.shape[1]}")
    cosine = torch.nn.functional.cosine_similarity(rec[:, None], tru[None], dim=2)
    rows, cols = match_rows(1 - cosine)
    rec, tru = rec[rows], tru[cols]
    rel = (rec - tru).norm(dim=1) / tru.norm(dim=1).clamp_min(1e-300)
    return {
        "cosine": float(cosine[rows, cols].min()),
        "relative_error": float(rel.max()),
        "relative_error_per_sample": [float(v) for v in rel],
        "matching": [int(c) for c in cols],
    }


# --------------------------------------------------------------------------- registry


def _labels_scorer(result, truth, update_family: str) -> dict:
    out = {}
    labels = result.get("labels")
    if labels is not None:
        out.update(score_labels(labels, truth.labels, truth.targets, truth.mix_coef, truth.label_smoothing,
                                update_family))
    counts = result.get("counts")
    if counts is None and labels is not None and labels.shape[0] == truth.labels.shape[0]:
        counts = torch.bincount(labels.argmax(dim=1), minlength=labels.shape[1])
    if counts is not None:
        out.update(score_counts(counts, truth.counts))
    return out


def _features_scorer(result, truth, update_family: str) -> dict:
    return score_features(result.require("features"), truth.features)


def _images_scorer(result, truth, update_family: str) -> dict:
    return score_images(result.require("images"), truth.images)


SCORERS: dict[str, Callable] = {
    "labels": _labels_scorer,
    "features": _features_scorer,
    "reconstruction": _images_scorer,
}

# Headline numbers per kind, for tables that aggregate many files.
HEADLINE = {
    "labels": ("max_abs_error", "target_accuracy", "top2_accuracy", "eps_error", "mixup_coef_error", "cAcc",
               "iAcc", "LnAcc"),
    "features": ("cosine", "relative_error"),
    "reconstruction": ("psnr", "ssim", "mse", "lpips"),
}


def score(result, truth) -> dict:
    """Metrics of a result object against a truth object (the truth says which label
    family the client used: hard, smoothing or mixup)."""
    if result.kind not in SCORERS:
        raise GitoolError(f"cannot score a {result.kind} file")
    check_pair(result, truth)
    family = truth.meta.get("family", "hard")
    return SCORERS[result.kind](result, truth, family if isinstance(family, str) else "hard")


def check_pair(result, truth) -> None:
    """A result and a truth of the same round: as many samples, classes, feature or
    image sizes (else their scores would be computed on a silent partial match)."""
    n = truth.images.shape[0]
    for name, reference in (("labels", truth.labels), ("features", truth.features), ("images", truth.images)):
        tensor = result.get(name)
        if tensor is None:
            continue
        if tuple(tensor.shape[1:]) != tuple(reference.shape[1:]) or tensor.shape[0] != n:
            raise GitoolError(f"{result.path}: '{name}' of shape {tuple(tensor.shape)} does not fit its truth "
                              f"{truth.path} ({n} samples of {tuple(reference.shape[1:])})")
    counts = result.get("counts")
    if counts is not None and counts.shape != truth.counts.shape:
        raise GitoolError(f"{result.path}: counts of {counts.shape[0]} classes, the truth has {truth.counts.shape[0]}")


def aggregate(rows: list[dict], kind: str) -> dict:
    """Mean (and worst where it matters) of the headline metrics over many files."""
    out: dict = {"files": len(rows)}
    for name in HEADLINE.get(kind, ()):
        values = [r[name] for r in rows if name in r and isinstance(r[name], (int, float)) and not math.isnan(r[name])]
        if values:
            out[name] = float(np.mean(values))
            if name in ("max_abs_error", "relative_error"):
                out[name + "_worst"] = float(np.max(values))
    return out
