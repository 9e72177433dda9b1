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


def spawn(argv: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "GITOOL_DEBUG"}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.Popen([sys.executable, "-m", "gitool", *argv], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def state(folder: Path) -> dict[str, int]:
    found = {}
    for entry in os.scandir(folder):
        try:
            found[entry.name] = entry.stat(follow_symlinks=False).st_mtime_ns
        except FileNotFoundError:  # renamed away while listing
            pass
    return found


def wait_for_writes(proc: subprocess.Popen, folder: Path, timeout: float = 60) -> float:
    """Block until the child changes the folder (its first write); the moment it did."""
    before = state(folder)
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if state(folder) != before:
            return time.monotonic()
        if proc.poll() is not None:
            return time.monotonic()
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("the capture never wrote into its folder")


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
    proc = spawn(capture_argv(folder, 0))
    first = wait_for_writes(proc, folder)
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
    for i in range(10):
        proc = spawn(capture_argv(folder, 1000 * (i + 1)))
        wait_for_writes(proc, folder)
        time.sleep(rng.uniform(0, writing))
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
    for i in range(1):
        proc = spawn(capture_argv(folder, 500 + i))
        wait_for_writes(proc, folder)
        time.sleep(rng.uniform(0, writing))
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
