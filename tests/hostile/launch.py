"""Run one command in a fresh process and report its exit, peak RSS and fate as JSON.

Started by runner.invoke_child as a small stdlib-only process, so that the command is
forked from a few-MB parent: Linux carries a parent's RSS into the ru_maxrss of a child
forked (or vforked) from it, which would charge pytest's own memory to the command.

    python -I launch.py CONFIG.json   (argv, cwd, env, stdout, stderr, timeout, cap_kb)
"""

import json
import os
import subprocess
import sys
import time


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main():
    with open(sys.argv[1]) as handle:
        config = json.load(handle)
    started = time.monotonic()
    with open(config["stdout"], "wb") as out, open(config["stderr"], "wb") as err:
        proc = subprocess.Popen(config["argv"], cwd=config["cwd"], env=config["env"], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err)
        timed_out = killed = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - started > config["timeout"]:
                timed_out = True
                proc.kill()
            elif rss_kb(proc.pid) > config["cap_kb"]:
                killed = True
                proc.kill()
            time.sleep(0.01)
        proc.returncode = os.waitstatus_to_exitcode(status)
    json.dump({"exit": proc.returncode, "peak_kb": usage.ru_maxrss, "timed_out": timed_out, "killed": killed,
               "seconds": time.monotonic() - started}, sys.stdout)


if __name__ == "__main__":
    main()
