"""Issue 11, crash safety: ``kill -9``, SIGTERM or SIGINT during ``capture --repeat`` over
existing captures never leaves a half-written file, an update and a truth that point at
different things, or litter that a later run trips over.

The folder is judged from the files alone (docs/FORMAT.md): a safetensors file is
complete when its header parses and its last tensor ends at the end of the file; a truth
belongs to its update when ``gitool.meta["update"]["sha256"]`` is the update's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hostile import corpus
from tests.hostile.runner import REPO, invoke

N = 20  # captures per run
FINAL = re.compile(r"^\d{4}\.(update|truth)\.safetensors$")


def capture_argv(folder: Path, seed: int) -> list[str]:
    return ["capture", *corpus.MODEL, "--dtype", "float64", "--batch-size", "2", "--repeat", str(N), "--out-dir",
            str(folder), "--seed", str(seed)]


# A gitool process that imports first, says so, and runs the command on a newline: the next
# run's imports overlap the current one, and the kill window covers the command alone.
PRESTART = """
import sys
argv = sys.argv[1:]
import torch, gitool.cli
sys.argv = ["gitool", *argv]
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()
gitool.cli.main()
"""


def prestart(argv: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "GITOOL_DEBUG"}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # run beside the folder: "-c" puts the working folder first on sys.path
    return subprocess.Popen([sys.executable, "-c", PRESTART, *argv], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(argv[-3]).parent)


def go(proc: subprocess.Popen) -> subprocess.Popen:
    assert proc.stdout.readline() == b"ready\n", proc.stderr.read().decode()[-2000:]
    proc.stdin.write(b"\n")
    proc.stdin.flush()
    return proc


def state(folder: Path) -> dict[str, int]:
    found = {}
    for entry in os.scandir(folder):
        try:
            found[entry.name] = entry.stat(follow_symlinks=False).st_mtime_ns
        except FileNotFoundError:  # renamed away while listing
            pass
    return found


def wait_for(proc: subprocess.Popen, folder: Path, before: dict[str, int], event: str = "write",
             timeout: float = 60) -> float:
    """Block until the child's first write into the folder (``write``), until a file that is no
    final capture name appears (``temp``: a write in progress, whatever the design names it),
    or until an existing update is replaced (``update``: the moment between the update and its
    truth). Returns the moment; the child may also have ended first."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        now = state(folder)
        if event == "write" and now != before:
            return time.monotonic()
        if event == "temp" and any(not FINAL.match(name) for name in now):
            return time.monotonic()
        if event == "update" and any(name.endswith(".update.safetensors") and name in before and
                                     now[name] != before[name] for name in now):
            return time.monotonic()
        if proc.poll() is not None:
            return time.monotonic()
        time.sleep(0.0005)
    proc.kill()
    raise AssertionError(f"the capture never showed a {event!r} in its folder")


def parse(path: Path) -> tuple[dict | None, str | None]:
    """(gitool.meta, None) for a complete safetensors file, (None, why) otherwise."""
    raw = path.read_bytes()
    if len(raw) < 8:
        return None, f"{len(raw)} bytes"
    (n,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(raw[8:8 + n])
    except (ValueError, UnicodeDecodeError):
        return None, "header does not parse"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if len(raw) != 8 + n + end:
        return None, f"{len(raw)} bytes, the header needs {8 + n + end}"
    try:
        return json.loads(header["__metadata__"]["gitool.meta"]), None
    except (KeyError, ValueError):
        return None, "no gitool.meta"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def problems_in(folder: Path, *, litter_allowed: bool) -> list[str]:
    problems = []
    names = sorted(os.listdir(folder))
    for name in names:
        if not FINAL.match(name):
            if not litter_allowed:
                problems.append(f"litter: {name}")
            continue
        meta, why = parse(folder / name)
        if why:
            problems.append(f"{name} is damaged: {why}")
    for name in names:
        if not name.endswith(".truth.safetensors") or not FINAL.match(name):
            continue
        update = folder / name.replace(".truth.", ".update.")
        meta, why = parse(folder / name)
        if why:
            continue
        if not update.exists():
            problems.append(f"{name} without its update")
            continue
        pointer = (meta.get("update") or {}).get("sha256")
        if pointer != sha256(update):
            problems.append(f"{name} points at sha256 {str(pointer)[:12]}, {update.name} is {sha256(update)[:12]}")
    return problems


@pytest.fixture(scope="module")
def existing(tmp_path_factory):
    """A folder of N existing captures, and how long a run spends writing them."""
    folder = tmp_path_factory.mktemp("existing") / "runs"
    folder.mkdir()
    upcoming = prestart(capture_argv(folder, 0))
    before = state(folder)
    proc = go(upcoming)
    first = wait_for(proc, folder, before)
    proc.wait(timeout=120)
    writing = time.monotonic() - first
    assert proc.returncode == 0, proc.stderr.read().decode()
    assert problems_in(folder, litter_allowed=False) == []
    assert len(os.listdir(folder)) == 2 * N
    return folder, max(writing, 0.05)


@pytest.fixture
def captures(existing, tmp_path):
    """A fresh copy of the existing captures for one test."""
    source, writing = existing
    folder = tmp_path / "runs"
    shutil.copytree(source, folder)
    return folder, writing


def test_kill_9_during_capture_repeat(captures):
    folder, writing = captures
    rng = random.Random(11)
    found = []
    upcoming = prestart(capture_argv(folder, 1000))
    # kill at the riskiest moments and at random ones: 3 while a file is being written, 3 right
    # after an update was replaced (before its truth), 4 at a random moment of the writing phase
    events = ["temp", "update", "write", "temp", "update", "write", "temp", "update", "write", "write"]
    for i, event in enumerate(events):
        before = state(folder)
        proc = go(upcoming)
        if i < len(events) - 1:
            upcoming = prestart(capture_argv(folder, 1000 * (i + 2)))
        wait_for(proc, folder, before, event)
        time.sleep(rng.uniform(0, writing) if event == "write" else rng.uniform(0, 0.002))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        for problem in problems_in(folder, litter_allowed=True):
            found.append(f"kill {i + 1}: {problem}")
    # a later run in the folder succeeds and leaves exactly the captures
    outcome = invoke(tuple(capture_argv(folder, 99)), folder)
    assert outcome.exit_code == 0, outcome.stderr
    found += [f"after a later run: {p}" for p in problems_in(folder, litter_allowed=False)]
    assert len([n for n in os.listdir(folder) if FINAL.match(n)]) == 2 * N
    assert not found, "\n".join(found)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_clean_up(captures, signum):
    folder, writing = captures
    rng = random.Random(int(signum))
    found = []
    for i in range(2):
        upcoming = prestart(capture_argv(folder, 500 + i))
        before = state(folder)
        proc = go(upcoming)
        wait_for(proc, folder, before, "temp" if i % 2 == 0 else "update")
        proc.send_signal(signum)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            found.append(f"{signal.Signals(signum).name} {i + 1}: the run did not stop")
            continue
        # a run that finished before the signal arrived owes nothing; one that stopped exits non-zero
        found += [f"{signal.Signals(signum).name} {i + 1}: {p}" for p in problems_in(folder, litter_allowed=False)]
    assert not found, "\n".join(found)
