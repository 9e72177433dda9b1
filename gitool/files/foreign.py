"""Readers for other tools' files: torch files (``weights_only=True``: a file that needs
arbitrary unpickling is refused, never run) and NumPy ``.npz`` archives (checked from the
zip directory and each array header before anything is decompressed; no pickles).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from gitool.errors import GitoolError
from gitool.files.container import existing_file


def read_torch_object(path: str | Path, budget: int | None = None) -> Any:
    """Whatever a torch file holds, loaded with ``weights_only=True``: tensors, dicts,
    lists, numbers and strings only. A file that needs arbitrary unpickling (a pickled
    object, whose loading could run code) is refused, not executed. ``budget`` (bytes)
    refuses, unread, a file that would unpack to more."""
    import pickle
    import zipfile

    path = existing_file(path, "a torch file")
    if budget is not None:
        size = path.stat().st_size
        try:
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    size = sum(info.file_size for info in archive.infolist())
        except (zipfile.BadZipFile, OSError, ValueError):
            pass  # torch.load reports what is wrong
        if size > budget:
            raise GitoolError(f"{path}: it unpacks to {size} bytes, more than the model's weights could need "
                              f"({budget}); refused unread")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():  # the weights-only unpickler met a class or function
            raise GitoolError(f"refused: {path} needs arbitrary unpickling (a pickled object), which could run "
                              "code; save a plain state_dict of tensors") from None
        raise GitoolError(f"{path}: not a readable torch file ({_short_torch(exc)})") from None
    except Exception as exc:  # torch raises several types for corrupt or truncated files
        raise GitoolError(f"{path}: not a readable torch file ({_short_torch(exc)})") from None


def _short_torch(exc: BaseException) -> str:
    """The telling line of a torch.load error (torch prefixes long advice)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    telling = [line for line in lines if "Unsupported" in line or "failed reading" in line]
    line = telling[0] if telling else lines[0] if lines else type(exc).__name__
    return line.split(". ")[0].rstrip(".")[:160]


def read_torch_state(path: str | Path, budget: int | None = None) -> dict[str, torch.Tensor]:
    """A tensor dictionary from a torch file, with ``weights_only=True``: a file that
    needs arbitrary unpickling is refused, not executed."""
    obj = read_torch_object(path, budget=budget)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise GitoolError(f"{path}: expected a dictionary of tensors (a state_dict)")
    return {str(k): v for k, v in obj.items()}


def read_npz_arrays(path: Path, budget: int, most_members: int) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` archive, checked from the zip directory and each
    member's ``.npy`` header before anything is decompressed: at most ``budget`` bytes
    in all and ``most_members`` members (plus a few), each array no larger than its
    member, no pickled objects."""
    import zipfile

    def fail(reason: str) -> GitoolError:
        return GitoolError(f"{path}: not a readable .npz archive ({reason})")

    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > most_members + 16:
                raise GitoolError(f"{path}: {len(members)} arrays, far more than the model's {most_members} "
                                  "entries; refused unread")
            total = sum(info.file_size for info in members)
            if total > budget:
                raise GitoolError(f"{path}: the archive unpacks to {total} bytes, more than the model's weights "
                                  f"could need ({budget}); refused unread")
            names = [info.filename for info in members]
            if len(set(names)) != len(names):
                raise fail("duplicate member names")
            arrays = {}
            for info in members:
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                with archive.open(info) as member:
                    arrays[key] = _read_npy(member, info.file_size, f"{path}: member {info.filename[:60]}")
            return arrays
    except GitoolError:
        raise
    except Exception as exc:  # zipfile and numpy raise several types for corrupt files
        raise fail(f"{type(exc).__name__}: {str(exc)[:120]}") from None


def read_npy_list(blobs: list[bytes], budget: int, most: int, where: str) -> list[np.ndarray]:
    """Arrays serialised one by one with ``np.save`` (Flower's ``Parameters.tensors``),
    each header checked before its data is read: at most ``budget`` bytes in all and
    ``most`` arrays (plus a few), no pickled objects."""
    import io

    if len(blobs) > most + 16:
        raise GitoolError(f"{where}: {len(blobs)} arrays, far more than the model's {most} entries; refused unread")
    total = sum(len(blob) for blob in blobs)
    if total > budget:
        raise GitoolError(f"{where}: {total} bytes of arrays, more than the model's weights could need ({budget}); "
                          "refused unread")
    return [_read_npy(io.BytesIO(blob), len(blob), f"{where}: array {index}", hint="")
            for index, blob in enumerate(blobs)]


def _read_npy(member, size: int, where: str, hint: str = " (is this really an np.savez archive?)") -> np.ndarray:
    """One ``.npy`` array, its header checked against the member's size before reading."""
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(member)
    except ValueError:
        raise GitoolError(f"{where} is not a .npy array{hint}") from None
    if version == (1, 0):
        shape, fortran, dtype = npy.read_array_header_1_0(member, max_header_size=10000)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = npy.read_array_header_2_0(member, max_header_size=10000)
    else:
        raise GitoolError(f"{where}: unknown .npy version {version}")
    if dtype.hasobject or dtype.kind not in "fiub":
        raise GitoolError(f"refused: {where} has dtype {dtype}; expected real numbers (float, int or bool), and "
                          "object arrays would need unpickling, which could run code")
    count = int(np.prod(shape, dtype=object)) if shape else 1
    if count * dtype.itemsize > size:
        raise GitoolError(f"{where}: its header claims {count * dtype.itemsize} bytes in {size}")
    data = member.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise GitoolError(f"{where} is cut short")
    array = np.frombuffer(data, dtype=dtype, count=count)
    return array.reshape(shape[::-1]).T.copy() if fortran else array.reshape(shape).copy()
