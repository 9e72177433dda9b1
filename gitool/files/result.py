"""Result files (labels, features, reconstruction): what an attack step recovered, with
its method, options, diagnostics and a pointer to the update it came from; and the checks
that tie a result or a truth to that update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch

from gitool.errors import GitoolError
from gitool.files.container import RESULT_KINDS, RawFile, _require_finite, _without_timings, _write, file_sha256, read_raw
from gitool.files.update import Update, load_update

if TYPE_CHECKING:
    from gitool.files.truth import Truth


# Which tensors each result kind must hold (at least one of each tuple).
RESULT_TENSORS = {
    "labels": ("labels", "counts"),
    "features": ("features",),
    "reconstruction": ("images",),
}
# Tensors a result kind may also hold (never alone): a per-sample labels file (format 1.1)
# keeps each sample's softmax output p_n beside its label, rows in the same order.
OPTIONAL_TENSORS = {"labels": ("softmax",), "features": (), "reconstruction": ()}


@dataclass
class Result:
    """What an attack step recovered: ``labels`` (B x K) and/or ``counts`` (K),
    ``features`` (B x d) or ``images`` (B x C x H x W in [0, 1]), with the method, its
    options, diagnostics, wall time, and a pointer to the update it came from."""

    kind: str
    tensors: dict[str, torch.Tensor]
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0
    source: dict[str, Any] = field(default_factory=dict)  # {"path", "sha256"} of the update
    path: Path | None = None
    sha256: str | None = None

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def require(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise GitoolError(f"{self.path or 'the ' + self.kind + ' file'} holds no '{name}' tensor")
        return self.tensors[name]

    def check_source(self, update: Update) -> None:
        """Refuse a result that was computed from another update than ``update``."""
        theirs = self.source.get("sha256")
        if theirs and update.sha256 and theirs != update.sha256:
            raise GitoolError(
                f"{self.path} was made from another update ({self.source.get('path')}), not {update.path}"
            )

    def other_update_than(self, truth: "Truth") -> str | None:
        """A warning when this result and ``truth`` point to different updates (a
        mismatched pair scores garbage); None when they agree or either cannot say
        (imported updates, truths written before the pointer existed)."""
        ours, theirs = self.source.get("sha256"), (truth.meta.get("update") or {}).get("sha256")
        if ours and theirs and ours != theirs:
            return (f"{self.path} was made from {self.source.get('path')}, but {truth.path} is the truth of "
                    f"{truth.meta['update'].get('path')} (sha256 {ours[:12]} against {theirs[:12]})")
        return None


def new_result(kind: str, tensors: dict[str, torch.Tensor], *, method: str, update: Update | None,
               options: dict[str, Any] | None = None, diagnostics: dict[str, Any] | None = None,
               wall_time: float = 0.0) -> Result:
    """A result object with its pointer back to the update it was computed from."""
    source = {}
    if update is not None and update.path is not None:
        source = {"path": str(update.path), "sha256": update.sha256}
    return Result(kind=kind, tensors=tensors, method=method, options=options or {},
                  diagnostics=diagnostics or {}, wall_time=wall_time, source=source)


def save_result(result: Result, path: str | Path) -> Path:
    """Write a result. Wall-clock times stay out of the file (see :data:`TIMING_KEYS`):
    the same update, options and seed give the same bytes."""
    if result.kind not in RESULT_TENSORS:
        raise GitoolError(f"unknown result kind {result.kind!r}")
    if not any(name in result.tensors for name in RESULT_TENSORS[result.kind]):
        raise GitoolError(f"a {result.kind} result needs one of: {', '.join(RESULT_TENSORS[result.kind])}")
    meta = {
        "method": result.method,
        "options": _without_timings(result.options),
        "diagnostics": _without_timings(result.diagnostics),
        "source": result.source,
    }
    written = _write(path, result.kind, result.tensors, meta)
    result.path, result.sha256 = written, file_sha256(written)
    return written


# Each result tensor: its number of dimensions and whether it holds floats (else int64),
# and the range its values must lie in (soft labels are probabilities, images in [0, 1];
# a small slack admits round-off of the analytic methods).
RESULT_LAYOUT = {"labels": (2, True), "counts": (1, False), "features": (2, True), "images": (4, True),
                 "softmax": (2, True)}
RESULT_RANGES = {"labels": (-1e-6, 1 + 1e-6), "counts": (0, float("inf")), "images": (-1e-6, 1 + 1e-6),
                 "softmax": (0, 1 + 1e-6)}
RESULT_META = {"method": str, "options": dict, "diagnostics": dict, "source": dict, "wall_time": (int, float)}


def load_result(path: str | Path, kinds: Iterable[str] = RESULT_KINDS) -> Result:
    def expect(raw: RawFile):
        if not any(name in raw.entries for name in RESULT_TENSORS[raw.kind]):
            raise GitoolError(f"{raw.path}: a {raw.kind} file needs one of: {', '.join(RESULT_TENSORS[raw.kind])}")
        extra = sorted(set(raw.entries) - set(RESULT_TENSORS[raw.kind]) - set(OPTIONAL_TENSORS[raw.kind]))
        if extra:
            raise GitoolError(f"{raw.path}: unexpected tensors {', '.join(n[:60] for n in extra[:6])}")
        for name, entry in raw.entries.items():
            dims, floating = RESULT_LAYOUT[name]
            if len(entry.shape) != dims or (floating != (entry.dtype in ("F32", "F64"))):
                raise GitoolError(f"{raw.path}: tensor '{name}' is {entry.dtype} {entry.shape}; expected {dims} "
                                  f"dimensions of {'floats' if floating else 'int64'}")
            if name != "counts" and entry.shape[0] < 1:
                raise GitoolError(f"{raw.path}: tensor '{name}' has no rows")
        if "softmax" in raw.entries and ("labels" not in raw.entries
                                         or raw.entries["softmax"].shape != raw.entries["labels"].shape):
            raise GitoolError(f"{raw.path}: softmax outputs {raw.entries['softmax'].shape} need labels of the same "
                              "shape")
        if "labels" in raw.entries and "counts" in raw.entries \
                and raw.entries["labels"].shape[1] != raw.entries["counts"].shape[0]:
            raise GitoolError(f"{raw.path}: labels of {raw.entries['labels'].shape[1]} classes but counts of "
                              f"{raw.entries['counts'].shape[0]}")
        for key, kind in RESULT_META.items():
            value = raw.meta.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise GitoolError(f"{raw.path}: metadata {key} has the wrong type ({type(value).__name__})")
        source = raw.meta.get("source") or {}
        if not all(isinstance(source.get(k, ""), str) for k in ("path", "sha256")):
            raise GitoolError(f"{raw.path}: metadata source must hold a path and a sha256 as text")
        return None

    raw = read_raw(path, kinds, expect=expect)
    _require_finite(raw, raw.tensors)
    for name, (low, high) in RESULT_RANGES.items():
        tensor = raw.tensors.get(name)
        if tensor is not None and tensor.numel() and (float(tensor.min()) < low or float(tensor.max()) > high):
            raise GitoolError(f"{raw.path}: tensor '{name}' holds values outside [{low:g}, {high:g}]")
    return Result(
        kind=raw.kind,
        tensors=raw.tensors,
        method=str(raw.meta.get("method", "")),
        options=raw.meta.get("options") or {},
        diagnostics=raw.meta.get("diagnostics") or {},
        wall_time=float(raw.meta.get("wall_time") or 0.0),
        source=raw.meta.get("source") or {},
        path=raw.path,
        sha256=file_sha256(raw.path),
    )


def pointed_update(pointer: Any, beside: Path | None) -> Update | None:
    """The update a result's ``source`` or a truth's ``update`` pointer names, when it can
    be found (as recorded, or by name beside the pointing file) and its sha256 matches;
    only its classifier is read. None otherwise: the pointer is information, not a must."""
    if not isinstance(pointer, dict) or not isinstance(pointer.get("path"), str):
        return None
    recorded = Path(pointer["path"])
    for candidate in (recorded, (beside.parent / recorded.name) if beside is not None else None):
        if candidate is None or not candidate.is_file():
            continue
        if pointer.get("sha256") and file_sha256(candidate) != pointer["sha256"]:
            continue
        from gitool.models import UntrustedFactory

        try:
            return load_update(candidate, tensors="classifier")
        except UntrustedFactory:  # checking the fit would run the user's code, which nobody named here
            return None
    return None


def check_fits_update(kind: str, tensors: dict[str, torch.Tensor], update: Update, where: Path | None) -> None:
    """A result's or truth's tensors against the update they belong to: N samples, K
    classes, the classifier's feature size d, the input shape."""
    layer = update.last_layer()
    k, d = layer.weight.shape
    n = update.num_samples
    shapes = {"labels": (None, k), "softmax": (None, k), "counts": (k,), "features": (None, d),
              "images": (None, *update.input.shape),
              "inputs": (None, *update.input.shape)}
    for name, want in shapes.items():
        tensor = tensors.get(name)
        if tensor is None:
            continue
        got = tuple(tensor.shape)
        rows_ok = len(want) == 1 or got[:1] == (n,)  # one row per sample of the round
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want)) or not rows_ok:
            raise GitoolError(f"{where}: '{name}' of shape {got} does not fit its update {update.path} "
                              f"({n} samples, K = {k}, d = {d}, input {tuple(update.input.shape)})")
