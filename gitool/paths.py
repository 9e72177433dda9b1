"""No output is an input: every command resolves what it reads and what it will write
before any work, and refuses an overlap.

Two paths are the same file when they name the same inode (a symlink or a hard link to
an input counts) or, for an output that does not exist yet, the same resolved path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from gitool.errors import UsageError


def identity(path: str | os.PathLike, _real_folder=None) -> tuple:
    """What makes two paths the same file: (device, inode) of an existing file, else
    the fully resolved path. ``_real_folder``, a memo of resolved folders, lets a caller
    with thousands of outputs in a few folders resolve each folder once."""
    path = os.fspath(path)
    try:
        info = os.stat(path)
        return ("inode", info.st_dev, info.st_ino)
    except OSError:
        pass
    try:
        if os.path.lexists(path) or _real_folder is None:  # a dangling link: where it points
            return ("path", str(Path(path).resolve()))
        folder, name = os.path.split(os.path.abspath(path))
        return ("path", os.path.join(_real_folder(folder), name))
    except (OSError, RuntimeError):  # a symlink loop: the name is all there is
        return ("path", os.path.abspath(path))


def refuse_overlap(inputs: Iterable[tuple[str, str | os.PathLike | None]],
                   outputs: Iterable[tuple[str, str | os.PathLike | None]]) -> None:
    """Refuse any output that is one of the inputs or another output.

    Each item is (what, path): ``what`` names it in the message (an option such as
    ``--png``, or "the update"); None paths are skipped."""
    from functools import lru_cache

    real_folder = lru_cache(maxsize=None)(lambda folder: str(Path(folder).resolve()))
    seen: dict[tuple, str] = {}
    for what, path in inputs:
        if path is not None:
            seen.setdefault(identity(path, real_folder), f"{what} {path}")
    written: dict[tuple, str] = {}
    for what, path in outputs:
        if path is None:
            continue
        key = identity(path, real_folder)
        if key in seen:
            raise UsageError(f"{what} {path} is also an input ({seen[key]}); gitool never writes over what it reads: "
                             "choose another output")
        if key in written:
            raise UsageError(f"{what} {path} and {written[key]} are the same file; give each output its own name")
        written[key] = f"{what} {path}"
