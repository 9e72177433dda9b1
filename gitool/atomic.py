"""Writes that a killed run cannot half-do.

Every output goes to a temporary file beside its target, is flushed to disk, then
replaces the target in one ``rename``: a reader sees the old file or the new one, never
a mix. Temporary files are named ``.TARGET.PID.gitool-tmp``; a ``kill -9`` can leave one
behind, and the next write of the same target in that folder removes those whose process
is gone, so litter never accumulates nor trips a later run.

Many small files (an audit of thousands of updates) may be written inside
:func:`deferred_sync`: each write is still one rename, but the fsyncs are left to one
``os.sync()`` at the end. A killed process still leaves old or new files, never a mix;
only a power cut could leave a renamed file whose bytes never reached the disk, which
readers refuse as corrupt and an audit recomputes.

Two files that point at each other (an update and the truth that records the update's
sha256) are written by :func:`write_pair`: the old pointing file is removed before the
new pointed-to file replaces its predecessor, so at every instant the folder holds a
matching pair, or the first file without its partner, never a mismatched pair.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from pathlib import Path
from typing import Iterator

from gitool.errors import GitoolError, UsageError

TMP_SUFFIX = ".gitool-tmp"


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C so temporary files are removed."""


def install_signal_handlers() -> None:
    """Turn SIGTERM into :class:`Terminated` (SIGINT already raises KeyboardInterrupt)."""

    def on_term(signum, frame):
        raise Terminated()

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (an embedding program): leave its handlers alone
        pass


_TMP_NAME = re.compile(r"^\..+\.(\d+)" + re.escape(TMP_SUFFIX) + "$")
# Folders this process has cleared: (pid, folder). Listing a folder costs time in
# proportion to its size, so a run writing 10,000 files into one folder lists it once.
_CLEARED: set[tuple[int, str]] = set()


def _clear_stale(target: Path) -> None:
    """Remove temporary files left in ``target``'s folder by processes that no longer
    run, the first time this process writes into that folder."""
    key = (os.getpid(), os.path.abspath(target.parent))
    if key in _CLEARED:
        return
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    _CLEARED.add(key)
    for name in names:
        match = _TMP_NAME.match(name)
        if match and not _alive(int(match.group(1))):
            try:
                os.unlink(target.parent / name)
            except OSError:
                pass


_DEFERRED = 0  # > 0 inside deferred_sync


@contextlib.contextmanager
def deferred_sync(sync_at_end: bool = True) -> Iterator[None]:
    """Atomic writes without their own fsyncs; one ``os.sync()`` at the end (unless
    ``sync_at_end`` is False: a worker whose parent syncs once for all)."""
    global _DEFERRED
    _DEFERRED += 1
    try:
        yield
    finally:
        _DEFERRED -= 1
        if sync_at_end and _DEFERRED == 0:
            os.sync()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers (an earlier write in this process failed)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_target(path: Path) -> None:
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give a file name")
    if not path.parent.exists():
        raise GitoolError(f"folder {path.parent} does not exist")


def _stage(path: Path, data: bytes) -> Path:
    """``data`` written and synced to a temporary file beside ``path``."""
    _clear_stale(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if not _DEFERRED:
                os.fsync(handle.fileno())
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _sync_folder(folder: Path) -> None:
    if _DEFERRED:
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and one rename."""
    path = Path(path)
    _check_target(path)
    tmp = _stage(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _sync_folder(path.parent)
    return path


def write_pair(first: str | Path, first_data: bytes, second: str | Path, second_data: bytes) -> None:
    """Write ``first`` and ``second``, where ``second`` points at ``first``'s contents.

    Order: stage both; remove the old ``second``; rename ``first``; rename ``second``."""
    first, second = Path(first), Path(second)
    _check_target(first)
    _check_target(second)
    staged = []
    try:
        staged.append(_stage(first, first_data))
        staged.append(_stage(second, second_data))
        _remove(second)
        os.replace(staged[0], first)
        os.replace(staged[1], second)
    except BaseException:
        for tmp in staged:
            _remove(tmp)
        raise
    _sync_folder(first.parent)
    if second.parent != first.parent:
        _sync_folder(second.parent)
