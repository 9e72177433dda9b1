"""Progress of long work on stderr: a bar with rate and ETA on a terminal, and plain
lines a log file can keep when stderr is not one (a batch job, ``2> log``, CI).

    with ItemProgress(total=len(items), what="audit", unit="updates", console=err) as progress:
        for item in items:
            ...
            progress.advance(note="failed" if bad else None)

A plain line is printed at most every ``every`` seconds and once at the end:
``audit: 1200/10000 updates (12%), 184.2 updates/s, ETA 48s, 2 failed``.
"""

from __future__ import annotations

import time
from collections import Counter

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, from rich's moving estimate."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-" if speed is None else f"{speed:.1f} {self.unit}/s", style="progress.data.speed")


def duration(seconds: float) -> str:
    """3725 -> '1h02m05s', 65 -> '1m05s', 4.2 -> '4s'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ItemProgress:
    """``total`` items of work; ``advance()`` after each. ``enabled=False`` shows nothing."""

    def __init__(self, total: int, what: str, unit: str = "items", console: Console | None = None,
                 enabled: bool = True, every: float = 10.0) -> None:
        self.total, self.what, self.unit, self.every = total, what, unit, every
        self.console = console or Console(stderr=True)
        self.enabled = enabled and total > 0
        self.terminal = self.console.is_terminal
        self.done = 0
        self.notes: Counter[str] = Counter()
        self.started = time.monotonic()
        self.last_line = self.started
        self.bar: Progress | None = None

    def __enter__(self) -> "ItemProgress":
        if self.enabled and self.terminal:
            # No refresh thread (auto_refresh off, redrawn from advance): callers may fork workers.
            self.bar = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                                MofNCompleteColumn(), RateColumn(self.unit), TimeElapsedColumn(),
                                TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=False,
                                auto_refresh=False)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.what, total=self.total)
        return self

    def advance(self, note: str | None = None) -> None:
        self.done += 1
        if note:
            self.notes[note] += 1
        if not self.enabled:
            return
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=f"{self.what}{self._notes()}")
            if now - self.last_line >= 0.1 or self.done == self.total:
                self.last_line = now
                self.bar.refresh()
            return
        if now - self.last_line >= self.every:
            self.last_line = now
            self.console.print(self.line(now), highlight=False, soft_wrap=True)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        rate = self.done / elapsed
        remaining = (self.total - self.done) / rate if rate > 0 else None
        eta = f", ETA {duration(remaining)}" if remaining is not None and self.done < self.total else ""
        share = 100 * self.done / self.total if self.total else 100
        return (f"{self.what}: {self.done}/{self.total} {self.unit} ({share:.0f}%), {rate:.1f} {self.unit}/s, "
                f"{duration(elapsed)} elapsed{eta}{self._notes()}")

    def _notes(self) -> str:
        return "".join(f", {count} {note}" for note, count in sorted(self.notes.items()))

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
        elif self.enabled:
            self.console.print(self.line(), highlight=False, soft_wrap=True)
