"""Issue 11: every command that reads a file survives the hostile corpus (tests/hostile).

Per run: no traceback, no "internal error", a non-zero exit with an ``error:`` line
(``inspect`` may exit 0 on a parseable file if it warns), inputs byte-identical, no marker
file from code execution, and for the runs in a fresh process (memory bombs, special
files) a bounded peak RSS and no hang. The control tests prove the harness can fail:
each reader succeeds on the valid base file, every mutation changes its file, the
marker detector sees a payload that runs, and a legitimate run fits the memory limit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hostile import corpus, runner

RUNS = corpus.runs()
INPROC = [r for r in RUNS if r.case.mode == "inproc"]
CHILD = [r for r in RUNS if r.case.mode == "child"]


@pytest.fixture(scope="session")
def space(tmp_path_factory):
    return runner.Workspace(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="session")
def child_outcomes(space, request):
    """The fresh-process runs this session selected, all at once (4 at a time)."""
    wanted = set()
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.originalname == "test_hostile_fresh_process" and "run" in params:
            wanted.add(params["run"].id)
    return space.execute_many([r for r in CHILD if r.id in wanted])


def test_corpus_size(capsys):
    counts = corpus.counts()
    with capsys.disabled():
        print("\n" + corpus.summary_line())
    assert counts["files"] + counts["option values"] >= 150
    assert counts["memory-bomb runs"] >= 5 and counts["special files"] >= 5 and counts["output overlaps"] >= 10


@pytest.mark.parametrize("slot", sorted(corpus.READERS))
def test_every_reader_succeeds_on_the_valid_file(space, slot):
    """The templates are right: with the valid base file as {X} every command works."""
    case = corpus.Case(f"control-{slot}", "control", "the valid base file", slot=slot,
                       build=lambda folder, base: _copy(base[corpus.SLOT_BASE[slot]], folder))
    for run in corpus.runs([case]):
        outcome = space.execute(run)
        assert outcome.exit_code == 0, f"{outcome.command}: {outcome.stderr[-2000:]}"
        assert "Traceback" not in outcome.stderr and not outcome.changed and not outcome.markers


def _copy(path: Path, folder: Path) -> Path:
    target = folder / f"valid-{path.name}"
    target.write_bytes(path.read_bytes())
    return target


def test_options_and_overlaps_succeed_with_sane_values(space):
    """The option/overlap templates work when the hostile part is taken out."""
    sane = [
        (*corpus.OPT, "--iterations", "2"), corpus.FC, corpus.CAPTURE, corpus.TRAIN, corpus.IMPORT, corpus.LABELS,
        ("labels", "{U}", "-o", "{O}/x.labels.safetensors", "--plot", "{O}/x.png"),
        ("features", "{U}", "--labels", "{L}", "-o", "{O}/x.features.safetensors"),
        ("reconstruct", "{U}", "--labels", "{L}", "--features", "{F}", "--method", "fc", "-o",
         "{O}/x.reconstruction.safetensors", "--png", "{O}/x.png"),
        ("export", "{U}", "-o", "{O}/e.pt"), ("score", "{R}", "--truth", "{T}", "--png", "{O}/s.png"),
        ("import", *corpus.MODEL, "--before", "{BPT}", "--grad", "{GPT}", "-o", "{O}/i.update.safetensors"),
        ("capture", "--init", "{C}", "-o", "{O}/k.update.safetensors"),
        ("train", "--init", "{C}", "--epochs", "1", "-o", "{O}/t.checkpoint.safetensors"),
    ]
    for argv in sane:
        run = corpus.Run(corpus.Case("control-argv", "control", "sane values", argv=argv, prepare=corpus._alias), argv)
        outcome = space.execute(run)
        assert outcome.exit_code == 0, f"{outcome.command}: {outcome.stderr[-2000:]}"


def test_every_mutation_changes_its_file(space):
    same = []
    for case in corpus.CASES:
        if case.build is None or case.fresh:
            continue
        path = space.case_file(case)
        base = space.base.get(corpus.SLOT_BASE.get(case.slot, ""), None)
        if base is not None and base.exists() and runner.sha256(path) == runner.sha256(base):
            same.append(case.id)
    assert not same, f"mutations that leave the base file as it was: {same}"


def test_the_marker_detector_sees_code_that_runs(space, tmp_path):
    """evilmod.py and the os.system payload do leave markers where the runs look."""
    (tmp_path / "evilmod.py").write_text(runner.EVILMOD)
    subprocess.run([sys.executable, "-c", "import evilmod"], cwd=tmp_path, check=True)
    assert len(runner.marker_files(tmp_path)) == 3  # cwd, beside the module, temp folder
    runner.clear_markers(tmp_path)
    os.system(f"cd {tmp_path} && touch {corpus.MARKER}")
    assert runner.marker_files(tmp_path) and not runner.clear_markers(tmp_path)
    assert not runner.marker_files(tmp_path)


def test_a_legitimate_run_fits_the_memory_limit(space):
    """Calibration: the limit the memory bombs must meet is met by the honest file."""
    case = corpus.Case("control-memory", "control", "the valid update", slot="update", bomb=True, mode="child",
                       build=lambda folder, base: _copy(base["U"], folder))
    outcomes = space.execute_many(corpus.runs([case]))
    for rid, outcome in outcomes.items():
        assert outcome.exit_code == 0, outcome.stderr[-2000:]
        assert outcome.peak_kb < space.memory_limit_kb, (
            f"{rid}: a legitimate run peaks at {outcome.peak_kb / 1024:.0f} MB, over the "
            f"{space.memory_limit_kb / 1024:.0f} MB limit: the limit cannot be met on this machine")


@pytest.mark.parametrize("run", INPROC, ids=[r.id for r in INPROC])
def test_hostile_in_process(space, run):
    outcome = space.execute(run)
    problems = runner.check(run, outcome, space.memory_limit_kb)
    assert not problems, runner.describe(run, outcome, problems)


@pytest.mark.parametrize("run", CHILD, ids=[r.id for r in CHILD])
def test_hostile_fresh_process(child_outcomes, space, run):
    """Memory bombs (peak RSS of the child below 2x the legitimate tensors + 300 MB) and
    special files (a FIFO or /dev/zero as input must not hang)."""
    outcome = child_outcomes[run.id]
    problems = runner.check(run, outcome, space.memory_limit_kb)
    assert not problems, runner.describe(run, outcome, problems)
