"""The safetensors codec: tensors and a string map in one file, read without trusting it.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON,
then the raw tensor bytes::

    {"__metadata__": {"key": "value", ...},
     "name": {"dtype": "F64", "shape": [10, 84], "data_offsets": [BEGIN, END]}, ...}

``data_offsets`` count from the first byte after the header. gitool reads and writes this
format itself, instead of through the ``safetensors`` package, for two reasons:

- **Reading checks everything before allocating anything**: the header length against
  :data:`HEADER_LIMIT` and the file size, the JSON's nesting depth, duplicate names, each
  entry's dtype, shape and byte span (``prod(shape) * itemsize == END - BEGIN``), and that
  the spans tile the data region exactly, with no overlap and no hole. So what a header
  claims always matches bytes that are really in the file, and a tensor is materialised
  only when asked for by name (:meth:`TensorFile.read`): memory follows the tensors a
  command needs, never a header's word.
- **Writing is canonical**: entries sorted by (itemsize, name), JSON with sorted keys and
  no spaces, padded to 8 bytes. The same tensors and metadata give the same bytes, so the
  sha256 pointers between files are reproducible.

Files written here load with the ``safetensors`` package, and files it writes load here.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from gitool.errors import GitoolError

HEADER_LIMIT = 8 << 20  # bytes of JSON header; gitool's own headers stay under 1 MiB
JSON_DEPTH_LIMIT = 64  # nesting of objects and arrays, in the header and in gitool.meta
CHUNK_BYTES = 4 << 20  # what :meth:`TensorFile.chunks` reads at a time

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
NAME_OF_DTYPE = {dtype: name for name, (dtype, _) in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor as the header describes it; ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


def open_regular(path: str | Path, what: str = "a file"):
    """``path`` opened for binary reading, refused unless it is a regular file.

    The open is non-blocking so that a FIFO refuses at once instead of waiting for a
    writer; the type is checked on the open descriptor, so no rename in between can
    swap the file that is read for the one that was checked."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise GitoolError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise GitoolError(f"{path} is a folder, not {what}") from None
    except OSError as exc:
        raise GitoolError(f"{path}: cannot open ({exc.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise GitoolError(f"{path} is a folder, not {what}")
        raise GitoolError(f"{path} is not a regular file (a pipe, socket or device), not {what}")
    if hasattr(os, "O_NONBLOCK"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def check_depth(value: Any, where: str, limit: int = JSON_DEPTH_LIMIT) -> None:
    """Refuse JSON nested deeper than ``limit`` (iteratively: no recursion to exhaust)."""
    containers = (dict, list)
    stack = [(value, 1)] if isinstance(value, containers) else []
    while stack:  # only containers are pushed: a header's many numbers cost one isinstance each
        item, depth = stack.pop()
        if depth > limit:
            raise GitoolError(f"{where}: JSON nested deeper than {limit} levels")
        children = item.values() if isinstance(item, dict) else item
        stack.extend([(child, depth + 1) for child in children if isinstance(child, containers)])


def loads_json(text: str | bytes, where: str) -> Any:
    """Parse JSON refusing duplicate keys, NaN/Infinity literals and excessive nesting."""

    def unique(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise GitoolError(f"{where}: duplicate key {key[:80]!r}")
            seen[key] = value
        return seen

    def no_constant(name):
        raise GitoolError(f"{where}: {name} is not JSON")

    try:
        value = json.loads(text, object_pairs_hook=unique, parse_constant=no_constant)
    except RecursionError:
        raise GitoolError(f"{where}: JSON nested deeper than {JSON_DEPTH_LIMIT} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise GitoolError(f"{where}: not valid JSON ({str(exc)[:120]})") from None
    check_depth(value, where)
    return value


class TensorFile:
    """An open safetensors file whose header has been checked; tensors are read on demand.

    Use as a context manager: ``with TensorFile(path) as tf: tf.read("name")``."""

    def __init__(self, path: str | Path, what: str = "a safetensors file") -> None:
        self.path = Path(path)
        self._handle = open_regular(self.path, what)
        try:
            self.metadata, self.entries = self._parse_header()
        except BaseException:
            self._handle.close()
            raise

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._handle.close()

    def _fail(self, reason: str) -> GitoolError:
        return GitoolError(f"{self.path}: not a readable safetensors file ({reason})")

    def _parse_header(self) -> tuple[dict[str, str], dict[str, Entry]]:
        size = os.fstat(self._handle.fileno()).st_size
        prefix = self._handle.read(8)
        if len(prefix) < 8:
            raise self._fail("shorter than its 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > HEADER_LIMIT:
            raise self._fail(f"header of {length} bytes, over the {HEADER_LIMIT >> 20} MiB limit")
        if length > size - 8:
            raise self._fail(f"header of {length} bytes in a file of {size}")
        raw = self._handle.read(length)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._fail("header is not UTF-8") from None
        try:
            header = loads_json(text, "header")
        except GitoolError as exc:
            raise self._fail(str(exc)) from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail("__metadata__ is not a map of strings")
        data_start, data_size = 8 + length, size - 8 - length
        entries = {}
        for name, info in header.items():
            entries[name] = self._entry(name, info, data_start)
        cursor = data_start
        for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
            if entry.begin != cursor:
                raise self._fail(f"tensor '{entry.name[:80]}' does not start where the previous one ends "
                                 "(overlapping or missing bytes)")
            cursor = entry.end
        if cursor != data_start + data_size:
            raise self._fail(f"the tensors span {cursor - data_start} bytes, the file holds {data_size}")
        return metadata, entries

    def _entry(self, name: str, info: Any, data_start: int) -> Entry:
        where = f"tensor '{name[:80]}'"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise self._fail(f"{where}: expected exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise self._fail(f"{where}: unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise self._fail(f"{where}: shape must be a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise self._fail(f"{where}: data_offsets must be two integers 0 <= BEGIN <= END")
        expected = math.prod(shape) * DTYPES[dtype][1]
        if offsets[1] - offsets[0] != expected:
            raise self._fail(f"{where}: shape {tuple(shape)} of {dtype} needs {expected} bytes, its offsets "
                             f"span {offsets[1] - offsets[0]}")
        return Entry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name``, read from disk now (a fresh, writable CPU tensor)."""
        entry = self.entries[name]
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.torch_dtype)
        self._handle.seek(entry.begin)
        data = bytearray(entry.nbytes)
        if self._handle.readinto(data) != entry.nbytes:
            raise self._fail(f"tensor '{name}' is cut short (the file changed while it was read)")
        return torch.frombuffer(data, dtype=entry.torch_dtype).reshape(entry.shape)

    def chunks(self, name: str) -> Iterator[torch.Tensor]:
        """Tensor ``name`` as flat pieces of at most :data:`CHUNK_BYTES`, for statistics
        over tensors too big to hold whole."""
        entry = self.entries[name]
        itemsize = DTYPES[entry.dtype][1]
        step = max(1, CHUNK_BYTES // itemsize) * itemsize
        for begin in range(entry.begin, entry.end, step):
            count = min(step, entry.end - begin)
            self._handle.seek(begin)
            data = bytearray(count)
            if self._handle.readinto(data) != count:
                raise self._fail(f"tensor '{name}' is cut short (the file changed while it was read)")
            yield torch.frombuffer(data, dtype=entry.torch_dtype)


def encode(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The canonical safetensors bytes of ``tensors`` and ``metadata``."""
    plain = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    for name, tensor in plain.items():
        if tensor.dtype not in NAME_OF_DTYPE:
            raise GitoolError(f"tensor '{name}' has dtype {tensor.dtype}, which safetensors files cannot hold")
    # Widest items first keeps every tensor aligned to its itemsize.
    order = sorted(plain, key=lambda n: (-DTYPES[NAME_OF_DTYPE[plain[n].dtype]][1], n))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs, offset = [], 0
    for name in order:
        tensor = plain[name]
        blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {"dtype": NAME_OF_DTYPE[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)
