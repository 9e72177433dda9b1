"""Where the tasks of an audit run: in this process, in a pool of worker processes on this
machine, or on a Dask distributed cluster.

Every runner takes the same tasks (`gitool.audit.task.AuditTask`, one update each) and
hands each finished record to ``on_record`` in this process as it arrives, so progress,
the report and Ctrl-C behave the same everywhere:

- :func:`run_serial`: one task after another (``--workers 1``);
- :func:`run_pool`: ``--workers N`` processes. They start from a fork server that has
  imported torch and gitool once, so a worker costs a fork, not an import; each builds a
  model once and keeps it (`gitool.models.cached_model`) for every update it audits.
  Ctrl-C (or SIGTERM) cancels what has not started and stops the workers; their partial
  writes are temporary files that vanish (`gitool.atomic`), finished results stay;
- :func:`run_dask`: ``--scheduler tcp://HOST:PORT``, one Dask task per update. A worker
  that dies costs its task only: the scheduler reruns it elsewhere, and a rerun of a task
  reuses what it had already written. The workers must see the same files (a shared
  filesystem) and have gitool installed (``pip install 'gitool[dask]'``).
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, Sequence

from gitool.audit.task import AuditTask, run_task
from gitool.errors import GitoolError, UsageError

OnRecord = Callable[[dict[str, Any]], None]

# What a pool worker's fork server imports once, so that every worker starts warm.
PRELOAD = ["torch", "gitool.audit.task", "gitool.steps", "gitool.files", "gitool.metrics", "gitool.labels_single",
           "gitool.labels_batch", "gitool.reconstruct_analytic", "gitool.models"]


def run_serial(tasks: Sequence[AuditTask], on_record: OnRecord) -> None:
    for task in tasks:
        on_record(run_task(task))


# --------------------------------------------------------------------------- a process pool


def _worker_start() -> None:
    """A pool worker leaves Ctrl-C to the parent (which stops it with SIGTERM), and turns
    SIGTERM into an exception so that a write in progress removes its temporary file."""
    from gitool.atomic import install_signal_handlers

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    install_signal_handlers()


def run_pool(tasks: Sequence[AuditTask], workers: int, on_record: OnRecord) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    if workers < 1:
        raise UsageError("--workers must be at least 1")
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
    else:  # macOS, Windows: each worker imports for itself
        context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_start)
    futures = {pool.submit(run_task, task): task for task in tasks}
    try:
        for future in as_completed(futures):
            on_record(_record_of(future, futures[future]))
    except BaseException:  # Ctrl-C, SIGTERM or a failing callback: stop the workers now
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        for process in processes:
            process.join(timeout=10)
        raise
    pool.shutdown(wait=True)


def _record_of(future, task: AuditTask) -> dict[str, Any]:
    """The task's record, or a record of how its process was lost."""
    try:
        return future.result()
    except Exception as exc:  # the worker process died (killed, out of memory)
        return lost_record(task, f"its worker process was lost ({type(exc).__name__}: {exc})")


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
        futures = client.map(run_task, list(tasks), key=[f"gitool-audit-{token}-{i}" for i in range(len(tasks))],
                             pure=False, retries=retries)
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
