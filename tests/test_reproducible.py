"""Issue 11, reproducible bytes: the same commands with the same seed, run twice in two
fresh processes (different PYTHONHASHSEED, same folder and file names), write
byte-identical files: capture's update and truth, labels, features, reconstructions,
export, import and train outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hostile import corpus
from tests.hostile.runner import REPO

M = list(corpus.MODEL)
CHAIN = [
    ["capture", *M, "--dtype", "float64", "--label-smoothing", "0.2", "--seed", "7", "-o", "c.update.safetensors"],
    ["capture", *M, "--batch-size", "2", "--steps", "2", "--repeat", "2", "--out-dir", "d", "--seed", "3"],
    ["labels", "c.update.safetensors", "-o", "c.labels.safetensors"],
    ["labels", "d", "--out-dir", "d", "--aux", "synthetic", "--aux-per-class", "2"],
    ["features", "c.update.safetensors", "--labels", "c.labels.safetensors", "-o", "c.features.safetensors"],
    ["reconstruct", "c.update.safetensors", "--labels", "c.labels.safetensors", "--features", "c.features.safetensors",
     "--method", "fc", "-o", "fc.reconstruction.safetensors"],
    ["reconstruct", "c.update.safetensors", "--labels", "c.labels.safetensors", "--method", "optimize",
     "--iterations", "3", "--seed", "1", "-o", "opt.reconstruction.safetensors"],
    ["export", "c.update.safetensors", "-o", "e.pt"],
    ["export", "c.update.safetensors", "-o", "n.npz"],
    ["import", "--before", "n.before.npz", "--grad", "n.gradient.npz", "--facts", "n.facts.json", "-o",
     "i.update.safetensors"],
    ["train", *M, "--epochs", "1", "--batch-size", "16", "--seed", "2", "-o", "t.checkpoint.safetensors"],
]
CHILD = """
import json, sys
from pathlib import Path
from tests.hostile.runner import invoke
failed = []
for argv in json.loads(sys.argv[1]):
    outcome = invoke(tuple(argv), Path.cwd())
    if outcome.exit_code != 0:
        failed.append(" ".join(argv) + ": " + outcome.stderr[-500:])
print(json.dumps(failed))
"""


def run_chain(folder: Path, hash_seed: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "GITOOL_DEBUG"}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONHASHSEED"] = hash_seed
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(CHAIN)], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def twice(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    work = root / "work"
    work.mkdir()
    failed = run_chain(work, "1")
    assert not failed, failed
    first = root / "first"
    shutil.copytree(work, first)
    shutil.rmtree(work)
    work.mkdir()
    failed = run_chain(work, "2")
    assert not failed, failed
    return first, work


OUTPUTS = ["c.update.safetensors", "c.truth.safetensors", "d/0000.update.safetensors", "d/0000.truth.safetensors",
           "d/0001.update.safetensors", "d/0001.truth.safetensors", "c.labels.safetensors", "d/0000.labels.safetensors",
           "c.features.safetensors", "fc.reconstruction.safetensors", "opt.reconstruction.safetensors", "e.pt",
           "e.facts.json", "n.before.npz", "n.gradient.npz", "n.facts.json", "i.update.safetensors",
           "t.checkpoint.safetensors"]


def test_the_chain_writes_every_expected_file(twice):
    first, second = twice
    for folder in (first, second):
        missing = [name for name in OUTPUTS if not (folder / name).is_file()]
        assert not missing, f"not written: {missing}"


@pytest.mark.parametrize("name", OUTPUTS)
def test_same_seed_same_bytes(twice, name):
    first, second = twice
    a, b = (first / name).read_bytes(), (second / name).read_bytes()
    assert a == b, f"{name} differs between two runs with the same seed: {explain(a, b)}"


def explain(a: bytes, b: bytes) -> str:
    """Which part of two gitool files differs: tensors, metadata values, or only their order."""
    try:
        ha, hb = (json.loads(x[8:8 + struct.unpack("<Q", x[:8])[0]]) for x in (a, b))
    except Exception:
        index = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return f"{len(a)} vs {len(b)} bytes, first difference at byte {index}"
    ma, mb = ha.pop("__metadata__", {}), hb.pop("__metadata__", {})
    parts = []
    da, db = a[8 + struct.unpack("<Q", a[:8])[0]:], b[8 + struct.unpack("<Q", b[:8])[0]:]
    if ha != hb or da != db:
        parts.append("tensor data differ")
    try:
        ja, jb = json.loads(ma.get("gitool.meta", "{}")), json.loads(mb.get("gitool.meta", "{}"))
    except ValueError:
        ja = jb = None
    if ja != jb:
        parts.append("metadata values differ at " + ", ".join(_differences(ja, jb))[:400])
    elif ma.get("gitool.meta") != mb.get("gitool.meta"):
        parts.append("metadata key order differs")
    if {k: v for k, v in ma.items() if k != "gitool.meta"} != {k: v for k, v in mb.items() if k != "gitool.meta"}:
        parts.append("__metadata__ differs")
    return "; ".join(parts) or "header layout differs"


def _differences(a, b, path="meta") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{path}.{key}")
        return out
    return [] if a == b else [path]
