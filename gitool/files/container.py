"""The gitool file container: one safetensors file per artefact, metadata as JSON.

A file is a plain safetensors file whose header's ``__metadata__`` holds three keys:
``gitool.kind`` (update, truth, labels, features, reconstruction, checkpoint),
``gitool.version`` (the format version as text, so a newer file is refused clearly
instead of misread) and ``gitool.meta`` (one canonical JSON document with everything
that is not a tensor). This module reads and writes that frame; the per-kind modules
beside it (update, truth, result, checkpoint) check what each kind holds. It also names
files (``0007.update.safetensors`` -> ``0007.labels.safetensors``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from gitool import __version__
from gitool.errors import GitoolError
from gitool.specs import SpecError, coerce_field


FORMAT_VERSION = 1
KINDS = ("update", "truth", "labels", "features", "reconstruction", "checkpoint")
RESULT_KINDS = ("labels", "features", "reconstruction")
SUFFIX = ".safetensors"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and one rename."""
    from gitool.atomic import write_atomic

    write_atomic(path, data)


# Diagnostics keys that hold wall-clock times: shown on screen and in --json, never
# written into a file, so that the same inputs and seed give the same bytes.
TIMING_KEYS = frozenset({"seconds", "runtime_s", "wall_time", "time_s", "elapsed"})


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, (list, tuple)):
        return [_without_timings(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no optional spaces: one text per value."""
    return json.dumps(jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def encode_file(kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """The canonical bytes of a gitool file."""
    from gitool.codec import encode

    header = {
        "gitool.kind": kind,
        "gitool.version": str(FORMAT_VERSION),
        "gitool.producer": f"gitool {__version__}",
        "gitool.meta": canonical_json(meta),
    }
    return encode(tensors, header)


def _write(path: str | Path, kind: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    atomic_write_bytes(path, encode_file(kind, tensors, meta))
    return Path(path)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    return value


# dtypes a gitool file may hold: floats in the two precisions the attacks know, and
# int64 for classes, counts, steps and integer buffers (docs/FORMAT.md).
GITOOL_DTYPES = ("F32", "F64", "I64")


@dataclass
class RawFile:
    """A gitool file's header and (the requested) tensors, validated only for being a
    gitool file: ``entries`` describes every tensor the header lists, ``tensors`` holds
    those read."""

    path: Path
    kind: str
    version: int
    producer: str
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    entries: dict[str, Any] = field(default_factory=dict)


def existing_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path, or one clear line when it is missing, a folder or not a
    regular file (``what`` names the expected file in that message)."""
    from gitool.codec import open_regular

    path = Path(path)
    open_regular(path, what).close()
    return path


def read_raw(path: str | Path, kinds: Iterable[str] | None = None, *, load_tensors: bool = True,
             expect=None) -> RawFile:
    """Open any gitool file; check it is one, of a version we read and (if ``kinds``
    is given) of an expected kind. Raises GitoolError with one clear line otherwise.

    ``expect(raw)``, when given, checks the header (``raw.entries``, ``raw.meta``) before
    any tensor is read, and returns the names to read (None: all)."""
    from gitool.codec import TensorFile

    with TensorFile(path, "a gitool file") as handle:
        raw = check_header(handle, kinds)
        names = expect(raw) if expect is not None else None
        if load_tensors:
            names = list(raw.entries) if names is None else names
            raw.tensors = {name: handle.read(name) for name in names}
    return raw


def check_header(handle, kinds: Iterable[str] | None) -> RawFile:
    from gitool.codec import loads_json

    path, header = handle.path, handle.metadata
    kind = header.get("gitool.kind")
    if kind is None:
        raise GitoolError(f"{path}: a safetensors file without gitool metadata (not written by gitool)")
    if kind not in KINDS:
        raise GitoolError(f"{path}: unknown gitool.kind {kind[:40]!r}")
    text = header.get("gitool.version", "")
    if not (text.isascii() and text.isdigit() and len(text) < 6):
        raise GitoolError(f"{path}: unreadable gitool.version {text[:20]!r}")
    version = int(text)
    if version > FORMAT_VERSION:
        raise GitoolError(
            f"{path}: format version {version} is newer than this gitool reads ({FORMAT_VERSION}); upgrade gitool"
        )
    if version < 1:
        raise GitoolError(f"{path}: unknown format version {version}")
    meta = loads_json(header.get("gitool.meta", "{}"), f"{path}: gitool.meta")
    if not isinstance(meta, dict):
        raise GitoolError(f"{path}: gitool.meta is not a JSON object")
    kinds = tuple(kinds) if kinds is not None else None
    if kinds is not None and kind not in kinds:
        wanted = " or ".join(kinds)
        raise GitoolError(f"{path} is {_a(kind)} {kind} file; this needs {_a(kinds[0])} {wanted} file")
    for entry in handle.entries.values():
        if entry.dtype not in GITOOL_DTYPES:
            raise GitoolError(f"{path}: tensor '{entry.name[:80]}' is {entry.dtype}; gitool files hold float32, "
                              "float64 or int64 only")
    return RawFile(path, kind, version, str(header.get("gitool.producer", ""))[:80], meta, {},
                   dict(handle.entries))


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN and no infinity in ``tensor``. A NaN or an infinity makes the sum NaN or
    infinite, so a finite sum proves every element finite in one pass without a mask; only
    a sum that overflows (huge but finite values) needs the element-wise test."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _require_finite(raw: RawFile, names: Iterable[str]) -> None:
    for name in names:
        tensor = raw.tensors[name]
        if tensor.is_floating_point() and not all_finite(tensor):
            raise GitoolError(f"{raw.path}: tensor '{name}' holds NaN or infinite values")


def sha256_checking_finite(path: Path, entries: dict[str, Any], names: Iterable[str]) -> str:
    """The file's sha256, in one sequential pass that also checks the float tensors
    ``names`` (those not read into memory) for NaN and infinity: a NaN anywhere still
    refuses the file, and the bytes are read once for both."""
    from gitool.codec import CHUNK_BYTES, DTYPES, open_regular

    spans = sorted((entries[n].begin, entries[n].end, n) for n in names if entries[n].dtype in ("F32", "F64"))
    digest = hashlib.sha256()
    block = bytearray(CHUNK_BYTES)
    carry = b""  # the first bytes of an element that the previous block cut

    def check(data, dtype, name: str) -> None:
        if len(data) and not all_finite(torch.frombuffer(data, dtype=dtype)):
            raise GitoolError(f"{path}: tensor '{name}' holds NaN or infinite values")

    with open_regular(path, "a gitool file") as handle:
        start, first = 0, 0
        while (size := handle.readinto(block)) > 0:
            view = memoryview(block)[:size]
            digest.update(view)
            stop = start + size
            while first < len(spans) and spans[first][1] <= start:
                first += 1
            for begin, end, name in spans[first:]:
                if begin >= stop:
                    break
                dtype, itemsize = DTYPES[entries[name].dtype]
                lo, hi = max(begin, start), min(end, stop)
                if carry and lo == start:  # complete the element the last block cut
                    need = itemsize - len(carry)
                    check(bytearray(carry + bytes(view[:need])), dtype, name)
                    lo += need
                carry = b""
                whole = (hi - lo) - (hi - lo) % itemsize
                check(view[lo - start:lo - start + whole], dtype, name)
                carry = bytes(view[lo - start + whole:hi - start])
            start = stop
    return digest.hexdigest()


def file_identity(path: Path) -> tuple[int, int, int, int]:
    """What tells that a file was replaced or rewritten since it was read (device, inode,
    size, modification time): a later partial read checks it instead of hashing again."""
    info = path.stat()
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def _require_tensors(raw: RawFile, names: Iterable[str]) -> None:
    missing = [n for n in names if n not in raw.entries]
    if missing:
        raise GitoolError(f"{raw.path}: missing tensor(s) {', '.join(missing)} for a {raw.kind} file")


def _section(raw: RawFile, key: str) -> dict[str, Any]:
    value = raw.meta.get(key)
    if not isinstance(value, dict):
        raise GitoolError(f"{raw.path}: metadata lacks the '{key}' section")
    return value


@functools.lru_cache(maxsize=None)
def _type_hints(cls) -> dict[str, Any]:
    """A spec class's field types, resolved once (typing.get_type_hints re-evaluates them
    on every call, a measurable share of reading an update)."""
    return typing.get_type_hints(cls)


def _build_spec(cls, raw: RawFile, key: str):
    values = dict(_section(raw, key))
    hints = _type_hints(cls)
    strange = sorted(set(values) - set(hints))
    if strange:
        listed = ", ".join(name[:40] for name in strange[:6])
        raise GitoolError(f"{raw.path}: metadata section '{key}' has unknown field(s) {listed}")
    values = {name: coerce_field(value, hints[name], f"{raw.path}: metadata {key}.{name}")
              for name, value in values.items()}
    try:
        return cls(**values)
    except SpecError as exc:
        raise GitoolError(f"{raw.path}: metadata {exc.key} {exc.message}") from None
    except TypeError as exc:
        raise GitoolError(f"{raw.path}: metadata section '{key}' is malformed ({_short(exc)})") from None


def stem_of(path: str | Path) -> str:
    """``0007.update.safetensors`` -> ``0007``; ``run.safetensors`` -> ``run``."""
    name = Path(path).name
    if name.endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    for kind in KINDS:
        if name.endswith("." + kind):
            return name[: -len(kind) - 1]
    return name


def output_name(input_path: str | Path, kind: str) -> str:
    """The file name an output of ``kind`` gets when it is made from ``input_path``."""
    return f"{stem_of(input_path)}.{kind}{SUFFIX}"


def expand_inputs(items: Iterable[str | Path], kind: str) -> list[Path]:
    """Files named directly, plus every ``*.{kind}.safetensors`` inside named folders."""
    paths: list[Path] = []
    for item in items:
        item = Path(item)
        if item.is_dir():
            found = sorted(item.glob(f"*.{kind}{SUFFIX}"))
            if not found:
                raise GitoolError(f"{item}: no *.{kind}{SUFFIX} files in this folder")
            paths.extend(found)
        else:
            paths.append(item)
    return paths
