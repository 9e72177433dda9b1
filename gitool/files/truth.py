"""Truth files: what the client really used (only ``score`` reads them), written as a pair
with their update so that a truth never points at another update than the one beside it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gitool.errors import GitoolError
from gitool.files.container import RawFile, _require_finite, _require_tensors, _write, encode_file, file_sha256, read_raw
from gitool.files.update import Update, update_tensors_and_meta


@dataclass
class Truth:
    """What the client really used (only ``score`` may read it). N = B x m rows.

    ``targets`` is N x 2: the two classes of a mixup sample (y = (1 - c) e_a + c e_b with
    c = ``mix_coef``); for hard and smoothed labels both columns hold the one class.
    ``label_smoothing`` is each sample's eps. ``counts`` (K) histograms the dominant
    class of every sample. ``step`` says which local step used the sample.
    """

    images: torch.Tensor
    inputs: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    mix_coef: torch.Tensor
    label_smoothing: torch.Tensor
    features: torch.Tensor
    counts: torch.Tensor
    step: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha256: str | None = None

    TENSORS = (
        "images",
        "inputs",
        "labels",
        "targets",
        "mix_coef",
        "label_smoothing",
        "features",
        "counts",
        "step",
    )


def save_truth(truth: Truth, path: str | Path) -> Path:
    tensors = {name: getattr(truth, name) for name in Truth.TENSORS}
    written = _write(path, "truth", tensors, truth.meta)
    truth.path, truth.sha256 = written, file_sha256(written)
    return written


def save_capture(update: Update, truth: Truth, update_path: str | Path, truth_path: str | Path) -> None:
    """Write a client round: the update, then its truth with a pointer (path, sha256) to it.

    The pair is written by :func:`gitool.atomic.write_pair`, so a run killed at any
    moment never leaves a truth that points at another update than the one beside it."""
    from gitool.atomic import write_pair

    tensors, meta = update_tensors_and_meta(update)
    update_bytes = encode_file("update", tensors, meta)
    update_sha = hashlib.sha256(update_bytes).hexdigest()
    truth.meta["update"] = {"path": str(update_path), "sha256": update_sha}
    truth_bytes = encode_file("truth", {name: getattr(truth, name) for name in Truth.TENSORS}, truth.meta)
    write_pair(update_path, update_bytes, truth_path, truth_bytes)
    update.path, update.sha256 = Path(update_path), update_sha
    truth.path, truth.sha256 = Path(truth_path), hashlib.sha256(truth_bytes).hexdigest()


# Each truth tensor: its dimensions (letters shared between tensors must agree) and
# whether it holds floats (else int64).
TRUTH_LAYOUT = {
    "images": ("NCHW", True), "inputs": ("NCHW", True), "labels": ("NK", True), "targets": ("N2", False),
    "mix_coef": ("N", True), "label_smoothing": ("N", True), "features": ("Nd", True), "counts": ("K", False),
    "step": ("N", False),
}


# Truth metadata fields and their JSON types ("ints": a list of integers).
TRUTH_META = {"indices": "ints", "seed": int, "data": str, "family": str, "update_kind": str,
              "replay_error": (int, float)}


def _is(value: Any, kind: Any) -> bool:
    if kind == "ints":
        return isinstance(value, list) and all(type(v) is int for v in value)
    return isinstance(value, kind) and not isinstance(value, bool)


def load_truth(path: str | Path) -> Truth:
    """Read and validate a truth: exactly its tensors, with shapes that agree (N rows,
    K classes, ...) and dtypes checked from the header before reading; classes in range."""

    def expect(raw: RawFile):
        _require_tensors(raw, Truth.TENSORS)
        extra = sorted(set(raw.entries) - set(Truth.TENSORS))
        if extra:
            raise GitoolError(f"{raw.path}: unexpected tensors {', '.join(n[:60] for n in extra[:6])}")
        sizes: dict[str, int] = {"2": 2}
        for name, (dims, floating) in TRUTH_LAYOUT.items():
            entry = raw.entries[name]
            if len(entry.shape) != len(dims):
                raise GitoolError(f"{raw.path}: tensor '{name}' has shape {entry.shape}, expected {len(dims)} "
                                  f"dimensions ({' x '.join(dims)})")
            for letter, size in zip(dims, entry.shape):
                if sizes.setdefault(letter, size) != size:
                    raise GitoolError(f"{raw.path}: tensor '{name}' has {size} along {letter}, other tensors "
                                      f"{sizes[letter]}")
            if floating != (entry.dtype in ("F32", "F64")):
                raise GitoolError(f"{raw.path}: tensor '{name}' is {entry.dtype}, expected "
                                  f"{'float32 or float64' if floating else 'int64'}")
        for key, kind in TRUTH_META.items():
            value = raw.meta.get(key)
            if value is not None and not _is(value, kind):
                raise GitoolError(f"{raw.path}: metadata {key} has the wrong type ({type(value).__name__})")
        for key in ("update", "private"):
            pointer = raw.meta.get(key)
            if pointer is not None and not (isinstance(pointer, dict)
                                            and all(isinstance(pointer.get(k), str) for k in ("path", "sha256"))):
                raise GitoolError(f"{raw.path}: metadata {key} must be an object with a path and a sha256")
        return None

    raw = read_raw(path, ("truth",), expect=expect)
    _require_finite(raw, Truth.TENSORS)
    classes = raw.tensors["labels"].shape[1]
    targets = raw.tensors["targets"]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= classes):
        raise GitoolError(f"{raw.path}: tensor 'targets' holds classes outside 0..{classes - 1}")
    for name in ("counts", "step"):
        if raw.tensors[name].numel() and int(raw.tensors[name].min()) < 0:
            raise GitoolError(f"{raw.path}: tensor '{name}' holds negative values")
    return Truth(**{name: raw.tensors[name] for name in Truth.TENSORS}, meta=raw.meta, path=raw.path,
                 sha256=file_sha256(raw.path))
