"""Signals that ask a long computation to stop at its next check instead of unwinding.

Inside :func:`deferred`, the first SIGINT (Ctrl-C) or SIGTERM only sets a flag that a
loop polls with :func:`requested` (gradient matching stops there and keeps its best
iterate); :func:`reraise` afterwards turns the caught signal back into the exception the
command line answers with exit code 130 or 143, once the result is written. A second
signal inside the block interrupts at once, as outside it. Only the main thread can
install handlers; elsewhere the block changes nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

_caught: list[int] = []  # signals caught inside the innermost active block
_depth = 0


def _raise_for(signum: int) -> None:
    from gitool.atomic import Terminated

    if signum == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt()


def _on_signal(signum, frame) -> None:
    if _caught:  # the second one: stop now
        _raise_for(signum)
    _caught.append(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """SIGINT and SIGTERM set a flag (see :func:`requested`) while the block runs."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if _depth == 0:
        _caught.clear()
    _depth += 1
    for s in previous:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        _depth -= 1
        for s, handler in previous.items():
            signal.signal(s, handler)


def requested() -> str | None:
    """``"interrupted"`` once a signal was caught in the active block, else None."""
    return "interrupted" if _caught and _depth else None


def caught() -> int | None:
    """The signal caught by the last block (None if none)."""
    return _caught[0] if _caught else None


def reraise() -> None:
    """Raise KeyboardInterrupt (SIGINT) or Terminated (SIGTERM) if the last block caught one."""
    if _caught:
        signum = _caught[0]
        _caught.clear()
        _raise_for(signum)
