"""Where the tasks of an audit run: in this process, in a pool of worker processes on this
machine, or on a Dask distributed cluster.

Every runner takes the same tasks (`gitool.audit.task.AuditTask`, one update each) and
hands each finished record to ``on_record`` in this process as it arrives, so progress,
the report and Ctrl-C behave the same everywhere:

- :func:`run_serial`: one task after another (``--workers 1``);
- :func:`run_pool`: ``--workers N`` processes, forked (on Linux) from this process once it
  has imported torch and gitool, so a worker costs a fork, not an import; each builds a
  model once and keeps it (`gitool.models.cached_model`) for every update it audits, and
  gets one task at a time through its own pipe, so the parent always knows which task a
  worker holds: a worker that dies is replaced and its task tried again. Ctrl-C (or
  SIGTERM) stops the workers; their partial writes are temporary files that vanish
  (`gitool.atomic`), finished results stay;
- :func:`run_dask`: ``--scheduler tcp://HOST:PORT``, one Dask task per update. A worker
  that dies costs its task only: the scheduler reruns it elsewhere, and a rerun of a task
  reuses what it had already written. The workers must see the same files (a shared
  filesystem) and have gitool installed (``pip install 'gitool[dask]'``).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from gitool.audit.task import AuditTask, run_task
from gitool.errors import GitoolError, UsageError

OnRecord = Callable[[dict[str, Any]], None]

# What the parent imports once before forking its workers, so that every worker starts warm.
PRELOAD = ["torch", "scipy.optimize", "gitool.audit.task", "gitool.steps", "gitool.files", "gitool.metrics",
           "gitool.labels_single", "gitool.labels_batch", "gitool.reconstruct_analytic", "gitool.models"]


def run_serial(tasks: Sequence[AuditTask], on_record: OnRecord) -> None:
    for task in tasks:
        on_record(run_task(task))


# --------------------------------------------------------------------------- a process pool


def _serve(conn) -> None:
    """A pool worker: run each task the parent sends, send its record back, until told to
    stop (None) or the parent goes away. Ctrl-C is the parent's to handle (it stops the
    workers with SIGTERM, which `gitool.atomic` turns into an exception that removes a
    temporary file being written)."""
    from gitool.atomic import Terminated, install_signal_handlers

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    install_signal_handlers()
    try:
        while True:
            task = conn.recv()
            if task is None:
                return
            conn.send(run_task(task))
    except (EOFError, OSError, Terminated):  # the parent went away or stops us
        return


class _Worker:
    """One worker process and the pipe to it; ``task`` is the index it holds, if any."""

    def __init__(self, context) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.task: int | None = None

    def give(self, index: int, task: AuditTask) -> None:
        self.task = index
        try:
            self.conn.send(task)
        except OSError:  # it died; the wait loop finds its sentinel ready and retries the task
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a task in flight unwinds, removing its temporary files), then SIGKILL."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self.conn.close()


def run_pool(tasks: Sequence[AuditTask], workers: int, on_record: OnRecord, retries: int = 1) -> None:
    """``workers`` processes, each sent one task at a time. A worker that dies (killed, out
    of memory) is replaced and its task tried again, ``retries`` times, then recorded as lost."""
    import multiprocessing
    from collections import deque
    from multiprocessing.connection import wait

    if workers < 1:
        raise UsageError("--workers must be at least 1")
    on_gpu = any(str(task.settings.options.get("device", "cpu")).startswith("cuda") for task in tasks[:1])
    if sys.platform.startswith("linux") and not on_gpu:
        # Forked from this process with gitool imported: a worker starts in milliseconds and
        # shares the imported code. Safe here: no torch thread pool has started (one thread
        # per worker, set in the task) and the progress display runs no thread. CUDA does
        # not survive a fork, so GPU workers are spawned.
        for module in PRELOAD:
            importlib.import_module(module)
        context = multiprocessing.get_context("fork")
    else:  # GPU workers, macOS, Windows: each worker imports for itself
        context = multiprocessing.get_context("spawn")
    waiting = deque(range(len(tasks)))
    failures: dict[int, int] = {}
    pool = [_Worker(context) for _ in range(min(workers, len(tasks)))]

    def feed(worker: _Worker) -> None:
        if waiting:
            index = waiting.popleft()
            worker.give(index, tasks[index])
        else:
            worker.task = None

    try:
        for worker in pool:
            feed(worker)
        while any(worker.task is not None for worker in pool):
            busy = [worker for worker in pool if worker.task is not None]
            ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
            for number, worker in enumerate(pool):
                if worker.task is None or not (worker.conn in ready or worker.process.sentinel in ready):
                    continue
                try:
                    record = worker.conn.recv()
                except (EOFError, OSError):  # the process died with its task
                    index, exit_code = worker.task, worker.process.exitcode
                    worker.stop()
                    pool[number] = worker = _Worker(context)
                    failures[index] = failures.get(index, 0) + 1
                    if failures[index] <= retries:
                        worker.give(index, tasks[index])
                    else:
                        on_record(lost_record(tasks[index], f"its worker process died {failures[index]} time(s) "
                                                           f"(last exit code {exit_code})"))
                        feed(worker)
                    continue
                on_record(record)
                feed(worker)
        for worker in pool:
            worker.conn.send(None)
            worker.process.join(10)
    finally:  # normal end, Ctrl-C, SIGTERM or a failing callback: no worker outlives the run
        for worker in pool:
            worker.stop()


def lost_record(task: AuditTask, why: str) -> dict[str, Any]:
    from gitool.audit.layout import client_and_round

    client, round_ = client_and_round(task.item.name, None)
    return {"update": str(task.item.path), "name": task.item.name, "status": "lost", "error": why[:500],
            "client": client, "round": round_, "attacks": []}


# --------------------------------------------------------------------------- a Dask cluster


def dask_client(address: str):
    """A client of the Dask scheduler at ``address`` (tcp://HOST:PORT), or a clear error."""
    try:
        from distributed import Client
    except ImportError:
        raise UsageError("--scheduler needs the Dask extra: pip install 'gitool[dask]'") from None
    try:
        return Client(address, timeout="20s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise GitoolError(f"--scheduler {address}: cannot reach a Dask scheduler there ({exc})") from None


def absolute(task: AuditTask) -> AuditTask:
    """The task with absolute paths: a cluster's workers run in folders of their own."""
    from dataclasses import replace

    settings = task.settings
    lpips = str(Path(settings.lpips_weights).absolute()) if settings.lpips_weights else None
    return replace(task, item=replace(task.item, path=task.item.path.absolute()),
                   settings=replace(settings, out_dir=str(Path(settings.out_dir).absolute()), lpips_weights=lpips))


def run_dask(tasks: Sequence[AuditTask], on_record: OnRecord, scheduler: Any, retries: int = 2) -> None:
    """Run on the cluster of ``scheduler``: an address (a client is made and closed here)
    or a ``distributed.Client``. ``retries`` reruns a task that raised; a task whose
    worker died is rerun by the scheduler itself (up to its ``allowed-failures``)."""
    from distributed import as_completed

    own = isinstance(scheduler, str)
    client = dask_client(scheduler) if own else scheduler
    futures = []
    try:
        token = os.urandom(4).hex()
        futures = client.map(run_task, [absolute(task) for task in tasks],
                             key=[f"gitool-audit-{token}-{i}" for i in range(len(tasks))], pure=False, retries=retries)
        by_key = {future.key: task for future, task in zip(futures, tasks)}
        for future in as_completed(futures):
            task = by_key[future.key]
            try:
                record = future.result()
            except Exception as exc:  # KilledWorker: it died on every worker that tried it
                record = lost_record(task, f"the cluster gave up on it ({type(exc).__name__}: {exc})")
            on_record(record)
            future.release()
        client.run(os.sync)  # workers write without syncing each file; make it all durable
    except BaseException:
        if futures:
            client.cancel(futures)
        raise
    finally:
        if own:
            client.close()
