"""What `gitool inspect` shows: a file's header, its tensors' statistics, and whether the
commands that read it would accept it.

Statistics are accumulated over pieces of each tensor (gitool.codec.TensorFile.chunks),
so a file with a huge tensor is shown in bounded memory. The full validator of the
file's kind runs too; its refusal is reported as the file's ``problem`` rather than
raised, because showing a suspicious file is exactly what inspect is for.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from gitool.errors import GitoolError


STATS_LIMIT = 256 << 20  # bytes: larger tensors are listed, not read


def tensor_stats(handle, name: str) -> dict[str, Any]:
    """Shape, dtype, L2 norm, min and max of one tensor, read piece by piece (None for
    a tensor over :data:`STATS_LIMIT`, which inspect lists without reading)."""
    entry = handle.entries[name]
    if entry.nbytes > STATS_LIMIT:
        return {"name": name, "shape": list(entry.shape), "dtype": str(entry.torch_dtype).replace("torch.", ""),
                "norm": None, "min": None, "max": None, "not_read": f"{entry.nbytes} bytes, over the "
                f"{STATS_LIMIT >> 20} MiB inspect reads"}
    squares, low, high = 0.0, math.inf, -math.inf
    for piece in handle.chunks(name):
        values = piece.to(torch.float64)
        squares += float((values * values).sum())
        if values.numel():
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    empty = entry.numel == 0
    return {"name": name, "shape": list(entry.shape), "dtype": str(entry.torch_dtype).replace("torch.", ""),
            "norm": math.sqrt(squares), "min": None if empty else low, "max": None if empty else high}


VALIDATORS = {
    "update": "load_update",
    "truth": "load_truth",
    "labels": "load_result",
    "features": "load_result",
    "reconstruction": "load_result",
    "checkpoint": "load_checkpoint",
}


def inspect_file(path: str | Path) -> dict[str, Any]:
    """The document `gitool inspect --json` prints for ``path``."""
    from gitool import files
    from gitool.codec import TensorFile

    with TensorFile(path, "a gitool file") as handle:
        raw = files.check_header(handle, None)
        rows = [tensor_stats(handle, name) for name in sorted(handle.entries)]
    from gitool.models import UntrustedFactory

    problem = unchecked = None
    try:
        loaded = getattr(files, VALIDATORS[raw.kind])(path)
        _check_against_its_update(files, raw.kind, loaded)
    except UntrustedFactory as exc:  # the file may be fine: checking it needs the user's model code
        unchecked = (f"not checked against its model: {exc.factory} is a user factory, which gitool runs only "
                     f"when the command line names it (--model {exc.factory}); the attack commands need that too")
    except GitoolError as exc:
        problem = str(exc)
    meta = raw.meta
    if raw.kind == "update":
        meta = _mark_unknown(meta)
    return {"path": str(raw.path), "kind": raw.kind, "version": raw.version, "producer": raw.producer,
            "metadata": meta, "tensors": rows, "problem": problem, "unchecked": unchecked}


def _check_against_its_update(files, kind: str, loaded) -> None:
    """A result or a truth whose update can be found must fit it."""
    if kind in files.RESULT_KINDS:
        update = files.pointed_update(loaded.source, loaded.path)
        if update is not None:
            files.check_fits_update(kind, loaded.tensors, update, loaded.path)
    elif kind == "truth":
        update = files.pointed_update(loaded.meta.get("update"), loaded.path)
        if update is not None:
            files.check_fits_update(kind, {n: getattr(loaded, n) for n in loaded.TENSORS}, update, loaded.path)


def _mark_unknown(meta: dict[str, Any]) -> dict[str, Any]:
    """The update's metadata with each field of an unknown fact shown as "unknown"
    (its stored value is a placeholder nobody vouched for)."""
    from gitool.facts import FACTS

    provenance = meta.get("provenance") if isinstance(meta.get("provenance"), dict) else {}
    unknown = provenance.get("unknown_facts") if isinstance(provenance.get("unknown_facts"), list) else []
    shown = {key: (dict(value) if isinstance(value, dict) else value) for key, value in meta.items()}
    for fact in unknown:
        for key in (FACTS[fact][0] if fact in FACTS else ()):
            section, _, name = key.partition(".")
            if isinstance(shown.get(section), dict) and name in shown[section]:
                shown[section][name] = "unknown"
    return shown
