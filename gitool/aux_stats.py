"""Auxiliary statistics for the label-count methods: ``--aux SOURCE --aux-per-class N``.

Several methods (LLG+, ZLG, RLU) need to know how the *global* model behaves on data
like the client's. The server holds a small labelled auxiliary set: N items per class
drawn with a seed from a data source (opened at the model's input shape and normalised
as the update says). Running the global model on it once gives the last-layer
features, softmax outputs and feature sums every method derives its statistics from.

The statistics depend only on the global model and the auxiliary spec, so they are
memoised in-process under (hash of the global weights, aux spec, per-class count,
seed, device): ``gitool labels DIR --out-dir`` over many updates of one global model
computes them once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from gitool.errors import GitoolError, UsageError


@dataclass
class AuxStats:
    """The global model on the auxiliary set (n items, K classes, feature dimension d).

    features (n x d) and probs (n x K) at the global model, labels (n), feature_sums
    O_n (n); confidence S (K x K), S_{c,j} = mean softmax_j over class c;
    expected_softmax p_bar (K); mean_feature_sum O_bar; llg_impact = -O_bar (what one sample of class j
    adds to N g_j besides its softmax) and llg_offsets o_j = mean of p_j O (what every
    sample adds to g_j), so that g_j ~ o_j + n_j impact / N."""

    spec: str
    per_class: int
    labels: torch.Tensor
    inputs: torch.Tensor
    features: torch.Tensor
    probs: torch.Tensor
    feature_sums: torch.Tensor
    confidence: torch.Tensor
    expected_softmax: torch.Tensor
    mean_feature_sum: float
    llg_impact: float
    llg_offsets: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.labels.numel())


_MEMO: dict[tuple, AuxStats] = {}


def global_weights_hash(update) -> str:
    """SHA-256 of the global state's tensors (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name in sorted(update.global_state):
        tensor = update.global_state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def choose_aux_items(labels: np.ndarray, num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """``per_class`` items of every class 0..K-1 (fewer where the source has fewer)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in range(num_classes):
        items = np.flatnonzero(labels == cls)
        if len(items) == 0:
            raise GitoolError(f"the auxiliary data has no items of class {cls}; the model has {num_classes} classes")
        chosen.append(rng.choice(items, size=min(per_class, len(items)), replace=False))
    return np.concatenate(chosen)


def model_outputs(model, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax, last-layer features) of ``inputs``, without gradients and without dropout."""
    from gitool.models import dropout_off, forward_with_features

    with torch.no_grad(), dropout_off(model):
        logits, features = forward_with_features(model, inputs)
    return torch.softmax(logits, dim=1), features


def aux_statistics(update, spec: str, per_class: int, seed: int = 0, device: str = "cpu",
                   model=None) -> AuxStats:
    """The auxiliary statistics of ``update``'s global model (memoised)."""
    if per_class < 1:
        raise UsageError("--aux-per-class must be at least 1")
    key = (global_weights_hash(update), update.model.to_dict().__repr__(), repr(update.input), spec, per_class,
           seed, str(device))
    if key in _MEMO:
        return _MEMO[key]
    from gitool.attacks.rlu import class_confidence
    from gitool.data import open_source

    num_classes = update.model.num_classes
    source = open_source(spec, update.input.shape, num_classes=num_classes, seed=seed)
    items = choose_aux_items(np.asarray(source.labels), num_classes, per_class, seed)
    labels = torch.as_tensor(np.asarray(source.labels)[items], dtype=torch.int64, device=device)
    inputs = update.input.normalize(source.images(items.tolist()).to(torch.float64)).to(device)
    model = model if model is not None else update.build_model(dtype=torch.float64, device=device)
    probs, features = model_outputs(model, inputs)
    sums = features.sum(dim=1)
    # Row sum of one sample's gradient: (p_j - y_j) O. Every sample adds p_j O to every
    # row (the offset, averaged over the set); a sample of class j also subtracts O
    # from row j (the impact), so g_j ~ offset_j + n_j * impact / N.
    stats = AuxStats(
        spec=spec,
        per_class=per_class,
        labels=labels,
        inputs=inputs,
        features=features,
        probs=probs,
        feature_sums=sums,
        confidence=class_confidence(probs, labels, num_classes),
        expected_softmax=probs.mean(dim=0),
        mean_feature_sum=float(sums.mean()),
        llg_impact=float(-sums.mean()),
        llg_offsets=(probs * sums[:, None]).mean(dim=0),
    )
    _MEMO[key] = stats
    return stats


def clear_cache() -> None:
    _MEMO.clear()
