"""Run gitool commands each in its own process, forked from one that has imported gitool,
and report each one's exit, peak RSS and fate (issue 11's memory bombs and special files).

    python forkserver.py REQUESTS.json RESULTS.json

A fresh ``python -m gitool`` costs seconds of CPU for the imports; a fork of a process that
only imported them (and ran no torch operation, so no thread pool exists to break) starts
in milliseconds with the same resident baseline. Each child then runs ``gitool.cli.main``
with its own argv, working folder, stdout and stderr, exactly as the console script does.
Its peak RSS comes from ``wait4``; it is killed when its RSS passes a safety cap, or when
it has used no CPU for ``idle`` seconds (blocked, e.g. opening a FIFO: a hang whatever the
machine's load), or after ``timeout`` seconds of wall clock.
"""

import json
import os
import sys
import time
import traceback


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def child(item):
    code = 1
    try:
        os.chdir(item["cwd"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, item["stdout"], os.O_WRONLY | os.O_CREAT),
                                (2, item["stderr"], os.O_WRONLY | os.O_CREAT)):
            new = os.open(path, flags, 0o600)
            os.dup2(new, fd)
            os.close(new)
        sys.argv = ["gitool", *item["argv"]]
        import gitool.cli

        try:
            gitool.cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code & 0xFF)


def main():
    with open(sys.argv[1]) as handle:
        request = json.load(handle)
    import torch  # noqa: F401  (the imports every gitool process makes; no torch operation runs here)

    import gitool.cli  # noqa: F401

    items, workers = request["runs"], max(1, request["workers"])
    results = [None] * len(items)
    queue = list(range(len(items)))
    running = {}
    while queue or running:
        while queue and len(running) < workers:
            index = queue.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                child(items[index])
            now = time.monotonic()
            running[pid] = {"index": index, "started": now, "ticks": -1, "busy_at": now, "timed_out": False,
                            "killed": False}
        for pid, run in list(running.items()):
            item = items[run["index"]]
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                del running[pid]
                results[run["index"]] = {"exit": os.waitstatus_to_exitcode(status), "peak_kb": usage.ru_maxrss,
                                         "timed_out": run["timed_out"], "killed": run["killed"],
                                         "seconds": time.monotonic() - run["started"]}
                continue
            if run["timed_out"] or run["killed"]:
                continue
            now = time.monotonic()
            ticks = cpu_ticks(pid)
            if ticks != run["ticks"]:
                run["ticks"], run["busy_at"] = ticks, now
            if now - run["started"] > item["timeout"] or now - run["busy_at"] > item["idle"]:
                run["timed_out"] = True
                os.kill(pid, 9)
            elif rss_kb(pid) > item["cap_kb"]:
                run["killed"] = True
                os.kill(pid, 9)
        time.sleep(0.01)
    with open(sys.argv[2], "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main()
