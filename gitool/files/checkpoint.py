"""Checkpoints: model weights with the spec that builds the model (``gitool train``), or
plain state dicts as other tools write them (safetensors, or torch files read weights-only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gitool.errors import GitoolError
from gitool.files.container import RawFile, _require_finite, _section, _write, existing_file, read_raw
from gitool.files.foreign import read_torch_state
from gitool.specs import InputSpec, SpecError


@dataclass
class Checkpoint:
    """Model weights with the spec that builds the model (written by ``gitool train``)."""

    model: Any  # ModelSpec
    state: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def save_checkpoint(checkpoint: Checkpoint, path: str | Path) -> Path:
    meta = {"model": checkpoint.model.to_dict(), **checkpoint.meta}
    written = _write(path, "checkpoint", checkpoint.state, meta)
    checkpoint.path = written
    return written


def load_checkpoint(path: str | Path, budget: int | None = None) -> Checkpoint:
    """Weights from a gitool checkpoint, a plain safetensors state dict, or a torch
    ``.pt``/``.pth`` state dict loaded with ``weights_only=True`` (never unpickling
    arbitrary objects). A plain state dict carries no model spec (``model`` is None).

    ``budget`` (bytes), when given, refuses a file whose tensors would take more, before
    any is read."""
    from gitool.codec import TensorFile
    from gitool.models import ModelSpec, check_trusted, expected_tensors

    path = existing_file(path, "a checkpoint")
    if path.suffix in (".pt", ".pth", ".bin"):
        return Checkpoint(model=None, state=read_torch_state(path, budget=budget), path=path)

    def within_budget(raw_or_handle) -> None:
        total = sum(entry.nbytes for entry in raw_or_handle.entries.values())
        if budget is not None and total > budget:
            raise GitoolError(f"{path}: its tensors take {total} bytes, more than the model's weights could need "
                              f"({budget}); refused unread")

    with TensorFile(path, "a checkpoint") as handle:
        if "gitool.kind" not in handle.metadata:  # a plain state dict, as other tools write it
            within_budget(handle)
            return Checkpoint(model=None, state={name: handle.read(name) for name in handle.entries}, path=path)
    parsed = {}

    def expect(raw: RawFile) -> None:
        within_budget(raw)
        try:
            spec = ModelSpec.from_dict(_section(raw, "model"))
        except GitoolError as exc:
            raise GitoolError(f"{raw.path}: {exc}") from None
        check_trusted(spec, str(raw.path))
        normalize = raw.meta.get("normalize")
        if normalize is not None:
            if not isinstance(normalize, dict) or set(normalize) != {"mean", "std"}:
                raise GitoolError(f"{raw.path}: metadata normalize must be an object with mean and std")
            try:
                InputSpec(shape=tuple(spec.input_shape), mean=normalize["mean"], std=normalize["std"])
            except SpecError as exc:
                raise GitoolError(f"{raw.path}: metadata normalize.{exc.name} {exc.message}") from None
        try:
            state, _ = expected_tensors(spec)
        except GitoolError as exc:
            raise GitoolError(f"{raw.path}: {exc}") from None
        missing, extra = sorted(set(state) - set(raw.entries)), sorted(set(raw.entries) - set(state))
        wrong = [f"{n} {raw.entries[n].shape} vs model {state[n].shape}" for n in sorted(set(state) & set(raw.entries))
                 if raw.entries[n].shape != state[n].shape]
        if missing or extra or wrong:
            problems = ([f"missing {', '.join(missing[:6])}"] if missing else []) + \
                       ([f"unexpected {', '.join(n[:60] for n in extra[:6])}"] if extra else []) + wrong[:6]
            raise GitoolError(f"{raw.path}: the weights do not fit the model {spec.name[:80]}: "
                              + " | ".join(problems))
        parsed["spec"] = spec

    raw = read_raw(path, ("checkpoint",), expect=expect)
    _require_finite(raw, raw.tensors)
    spec = parsed["spec"]
    return Checkpoint(model=spec, state=raw.tensors, meta={k: v for k, v in raw.meta.items() if k != "model"},
                      path=raw.path)
