"""Play the hostile corpus against gitool and judge each run (issue 11, part 8).

A run happens in its own folder holding fresh copies of the base files, the hostile file
``{X}``, and ``evilmod.py`` (a module whose import creates a marker file). In-process runs
call ``gitool.cli.main`` with ``sys.argv`` patched, as the ``run_cli`` fixture does; the
memory bombs and special files run in a fresh ``python -m gitool`` process whose peak RSS
is read with ``wait4`` (and which is killed if it grows past a safety cap).

Every run must show: no traceback, no "internal error", a non-zero exit (``inspect`` may
exit 0 on a parseable file if it prints a warning), an ``error:`` line on stderr, every
input byte-identical, and no marker file (cwd, run folder, temp folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from tests.hostile import corpus

# The checkout whose gitool the fresh processes run (HOSTILE_GITOOL_ROOT: another one, e.g. an
# older commit, to see these tests fail where the code does)
REPO = Path(os.environ.get("HOSTILE_GITOOL_ROOT") or Path(__file__).resolve().parents[2])
INPROC_TIMEOUT_S = 30
CHILD_TIMEOUT_S = 300  # wall clock, a backstop only: a hang is judged by IDLE_S
IDLE_S = 8  # a child that uses no CPU for this long is blocked: a hang
SAFETY_CAP_KB = 1_200_000  # kill a child past 1.2 GB: the machine is shared
TMP_MARKER = "gitool-hostile-MARKER"

EVILMOD = f'''"""Importing this module is code execution: it leaves markers."""
import pathlib, tempfile
pathlib.Path("{corpus.MARKER}").touch()
pathlib.Path(__file__).with_name("{corpus.MARKER}-evilmod").touch()
pathlib.Path(tempfile.gettempdir(), "{TMP_MARKER}-" + pathlib.Path.cwd().name).touch()


def make(**kwargs):
    from torch import nn
    return nn.Sequential(nn.Flatten(), nn.Linear(192, 5, bias=False))
'''


@dataclass
class Outcome:
    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    peak_kb: int | None = None  # runs in a process of their own only: as a fresh `python -m gitool` would peak
    forked_peak_kb: int | None = None  # what the forked child itself peaked at
    killed_for_memory: bool = False
    changed: list[str] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)
    command: str = ""
    seconds: float = 0.0


# --------------------------------------------------------------------------- running gitool


class _Timeout(BaseException):
    """Raised by the alarm in an in-process run (a BaseException: gitool's handlers must not eat it)."""


_COMMANDS: dict[int, object] = {}


def _cache_click_command() -> None:
    """Typer rebuilds the click command from the annotations on every call (75 ms, most of
    an in-process run); build gitool's once. Only speed changes: ``gitool.cli.main`` still
    runs exactly as the console script does."""
    import typer.main

    if getattr(typer.main.get_command, "_hostile_cached", False):
        return
    original = typer.main.get_command

    def get_command(instance):
        key = id(instance)
        if key not in _COMMANDS:
            _COMMANDS[key] = (instance, original(instance))
        return _COMMANDS[key][1]

    get_command._hostile_cached = True
    typer.main.get_command = get_command


def invoke(argv: tuple[str, ...], cwd: Path, timeout: float = INPROC_TIMEOUT_S) -> Outcome:
    """``gitool ARGV`` in this process, through the real entry point."""
    from gitool.cli import main

    _cache_click_command()

    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd, saved_path = sys.argv, os.getcwd(), list(sys.path)
    saved_modules = set(sys.modules)

    def on_alarm(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    code: int | None = 0
    timed_out = False
    started = time.perf_counter()
    try:
        os.chdir(cwd)
        sys.argv = ["gitool", *argv]
        signal.setitimer(signal.ITIMER_REAL, timeout)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except _Timeout:
                timed_out, code = True, None
            except BaseException:  # anything the entry point let through is a traceback for the user
                err.write(traceback.format_exc())
                code = 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        sys.path[:] = saved_path
        for name in set(sys.modules) - saved_modules:  # a module the run imported from its folder
            module_file = getattr(sys.modules.get(name), "__file__", None) or ""
            if name == "evilmod" or module_file.startswith(str(cwd)):
                sys.modules.pop(name, None)
    return Outcome(code, out.getvalue(), err.getvalue(), timed_out=timed_out,
                   seconds=time.perf_counter() - started)


def invoke_children(jobs: list[tuple[tuple[str, ...], Path]], workers: int = 4, timeout: float = CHILD_TIMEOUT_S,
                    cap_kb: int = SAFETY_CAP_KB) -> list[Outcome]:
    """Each ``gitool ARGV`` (in its folder) in a process of its own (forkserver.py), several at a
    time; peak RSS from wait4, hangs judged by idle CPU."""
    env = {k: v for k, v in os.environ.items() if k != "GITOOL_DEBUG"}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    logs = Path(tempfile.mkdtemp(prefix="gitool-hostile-log-"))
    items = [{"argv": list(argv), "cwd": str(cwd), "stdout": str(logs / f"{i}.out"), "stderr": str(logs / f"{i}.err"),
              "timeout": timeout, "idle": IDLE_S, "cap_kb": cap_kb} for i, (argv, cwd) in enumerate(jobs)]
    (logs / "requests.json").write_text(json.dumps({"runs": items, "workers": workers}))
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("forkserver.py")), str(logs / "requests.json"),
                           str(logs / "results.json")], env=env, cwd=logs, capture_output=True, text=True,
                          timeout=timeout * len(jobs) + 120)
    if done.returncode != 0:
        raise RuntimeError(f"forkserver.py failed: {done.stderr[-3000:]}")
    reports = json.loads((logs / "results.json").read_text())
    outcomes = []
    for i, report in enumerate(reports):
        outcomes.append(Outcome(None if report["timed_out"] else report["exit"],
                                (logs / f"{i}.out").read_text(errors="replace"),
                                (logs / f"{i}.err").read_text(errors="replace"), timed_out=report["timed_out"],
                                peak_kb=report["peak_kb"], killed_for_memory=report["killed"],
                                seconds=report["seconds"]))
    shutil.rmtree(logs, ignore_errors=True)
    return outcomes


# --------------------------------------------------------------------------- files


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def regular_files(folder: Path, skip: Path | None = None) -> dict[str, str]:
    """sha256 of every regular file under ``folder`` (symlinks and special files skipped)."""
    found = {}
    for root, dirs, files in os.walk(folder):
        if skip is not None and Path(root) == skip:
            dirs[:] = []
            continue
        for name in files:
            path = Path(root) / name
            st = path.lstat()
            if (st.st_mode & 0o170000) == 0o100000:  # S_ISREG
                found[str(path.relative_to(folder))] = sha256(path)
    return found


def marker_files(*folders: Path) -> list[str]:
    found = []
    for folder in folders:
        for path in Path(folder).glob(f"{corpus.MARKER}*"):
            found.append(str(path))
    for folder in folders:  # evilmod.py leaves one in the temp folder, named after the working folder
        tmp = Path(tempfile.gettempdir()) / f"{TMP_MARKER}-{Path(folder).name}"
        if tmp.exists():
            found.append(str(tmp))
    return found


def clear_markers(*folders: Path) -> None:
    for path in marker_files(*folders):
        with contextlib.suppress(OSError):
            os.unlink(path)


def _repoint(result: Path, update: Path, target: Path) -> None:
    """A copy of a labels/features file whose source pointer names ``update``."""
    header, data = corpus.read_st(result)
    meta = corpus.meta_of(header)
    meta["source"] = {"path": str(update), "sha256": sha256(update)}
    header["__metadata__"]["gitool.meta"] = json.dumps(meta)
    target.write_bytes(corpus.st_bytes(header, data))


# --------------------------------------------------------------------------- the workspace


class Workspace:
    """The base files, the built case files, and a folder per run."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.base = corpus.build_bases(self.root / "base")
        self.files = self.root / "files"
        self.files.mkdir(exist_ok=True)
        self._built: dict[str, Path | None] = {}
        self._count = 0
        self.legit_bytes = self.base["U"].stat().st_size
        self.memory_limit_kb = (2 * self.legit_bytes + 300 * 2 ** 20) // 1024
        self._fork_offset_kb: int | None = None

    def fork_offset_kb(self) -> int:
        """How much more a fresh ``python -m gitool`` peaks than a forked child, for the
        legitimate ``inspect`` of the base update: a fork does not count the memory the
        imports touched and freed. Added to every forked peak, so that the limit judges
        what the console script would use."""
        if self._fork_offset_kb is None:
            folder = self.root / "calibration"
            folder.mkdir(exist_ok=True)
            argv = ("inspect", str(self.base["U"]))
            forked = invoke_children([(argv, folder)])[0]
            env = {k: v for k, v in os.environ.items() if k != "GITOOL_DEBUG"}
            env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            # started from a small parent: Linux counts a (v)forking parent's RSS in its child's ru_maxrss
            launcher = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, "
                        "stderr=subprocess.DEVNULL); print(os.wait4(p.pid, 0)[2].ru_maxrss)")
            done = subprocess.run([sys.executable, "-I", "-c", launcher, sys.executable, "-m", "gitool", *argv],
                                  env=env, cwd=folder, capture_output=True, text=True, timeout=300, check=True)
            self._fork_offset_kb = max(0, int(done.stdout.split()[-1]) - forked.peak_kb)
        return self._fork_offset_kb

    def case_file(self, case: corpus.Case) -> Path | None:
        if case.id not in self._built:
            self._built[case.id] = corpus.build_case_file(case, self.files, self.base)
        return self._built[case.id]

    def prepare(self, run: corpus.Run) -> tuple[Path, tuple[str, ...], dict[str, str]]:
        self._count += 1
        folder = self.root / "runs" / f"{self._count:04d}-{re.sub(r'[^A-Za-z0-9_.=-]+', '_', run.id)[:80]}"
        folder.mkdir(parents=True)
        (folder / "out").mkdir()
        values = {"RUN": str(folder), "O": str(folder / "out")}
        for key, path in self.base.items():
            shutil.copyfile(path, folder / path.name)
            values[key] = str(folder / path.name)
        (folder / "evilmod.py").write_text(EVILMOD)
        case = run.case
        if case.build is not None:
            if case.fresh:
                x = corpus.build_case_file(case, folder, self.base)
            else:
                source = self.case_file(case)
                x = folder / source.name
                shutil.copyfile(source, x)
            values["X"] = str(x)
            for key, name in (("LX", "lx.labels.safetensors"), ("FX", "fx.features.safetensors")):
                _repoint(self.base[key[0]], x, folder / name)
                values[key] = str(folder / name)
        if case.prepare is not None:
            values.update(case.prepare(folder, values))
        argv = tuple(a.format_map(values) for a in run.argv)
        return folder, argv, values

    def start(self, run: corpus.Run):
        folder, argv, _ = self.prepare(run)
        clear_markers(folder, Path.cwd())
        before = regular_files(folder, skip=folder / "out")
        return folder, argv, before

    def finish(self, outcome: Outcome, folder: Path, argv: tuple[str, ...], before: dict[str, str]) -> Outcome:
        after = regular_files(folder, skip=folder / "out")
        outcome.changed = sorted(name for name, digest in before.items() if after.get(name) != digest)
        outcome.markers = marker_files(folder, folder / "out", Path.cwd())
        clear_markers(folder, Path.cwd())
        outcome.command = "gitool " + " ".join(_show(a, folder) for a in argv)
        return outcome

    def execute(self, run: corpus.Run) -> Outcome:
        if run.case.mode == "child":
            return self.execute_many([run])[run.id]
        folder, argv, before = self.start(run)
        return self.finish(invoke(argv, folder), folder, argv, before)

    def execute_many(self, runs: list[corpus.Run], workers: int = 4) -> dict[str, Outcome]:
        """Runs in processes of their own, several at a time (a FIFO that hangs costs its idle time once)."""
        prepared = [(run, *self.start(run)) for run in runs]
        outcomes = invoke_children([(argv, folder) for _, folder, argv, _ in prepared], workers) if prepared else []
        offset = self.fork_offset_kb() if prepared else 0
        for outcome in outcomes:
            outcome.forked_peak_kb, outcome.peak_kb = outcome.peak_kb, outcome.peak_kb + offset
        # markers and inputs are judged one run at a time (the temp-folder marker is shared)
        return {run.id: self.finish(outcome, folder, argv, before)
                for (run, folder, argv, before), outcome in zip(prepared, outcomes)}


def _show(arg: str, folder: Path) -> str:
    text = arg.replace(str(folder) + "/", "").replace(str(folder), ".")
    return text if re.fullmatch(r"[A-Za-z0-9_./:=,+-]+", text) else repr(text)


# --------------------------------------------------------------------------- judging


CAUSES = {
    "code": "runs code named by a file (marker created)",
    "input": "changes or destroys an input file",
    "memory": "peak memory above 2x the legitimate model's tensors + 300 MB",
    "hang": "hangs (blocked without using CPU, killed)",
    "traceback": "prints a traceback",
    "internal": "ends in \"internal error\"",
    "exit0": "exit 0 on garbage",
    "inspect": "inspect exits 0 without a warning",
    "noerror": "fails without an `error:` line",
}


def check(run: corpus.Run, outcome: Outcome, memory_limit_kb: int) -> list[tuple[str, str]]:
    """The rules of issue 11 part 8; each problem as (cause, detail)."""
    problems = []
    if outcome.markers:
        problems.append(("code", "marker file(s) " + ", ".join(Path(m).name for m in outcome.markers)))
    if outcome.changed:
        problems.append(("input", "changed: " + ", ".join(outcome.changed)))
    if outcome.peak_kb is not None and (outcome.killed_for_memory or outcome.peak_kb > memory_limit_kb):
        problems.append(("memory", f"peak RSS {outcome.peak_kb / 1024:.0f} MB as a fresh process"
                         f" ({outcome.forked_peak_kb / 1024:.0f} MB forked)"
                         + (" (killed at the safety cap)" if outcome.killed_for_memory else "")
                         + f", limit {memory_limit_kb / 1024:.0f} MB"))
    if outcome.timed_out:
        problems.append(("hang", f"killed after {outcome.seconds:.0f} s, {IDLE_S} s of them without using CPU"))
    if "Traceback" in outcome.stderr:
        problems.append(("traceback", _last_line(outcome.stderr)))
    if "internal error" in outcome.stderr:
        problems.append(("internal", _first_line(outcome.stderr)))
    if outcome.exit_code == 0:
        if run.argv[0] == "inspect" and run.case.inspect_ok:
            if "warning" not in (outcome.stderr + outcome.stdout).lower():
                problems.append(("inspect", "no warning"))
        else:
            problems.append(("exit0", _first_line(outcome.stderr) or _first_line(outcome.stdout)))
    elif outcome.exit_code is not None:
        if not any(line.startswith("error:") for line in outcome.stderr.splitlines()):
            problems.append(("noerror", _first_line(outcome.stderr)))
    return problems


def _telling_line(outcome: Outcome) -> str:
    """The error line if there is one, else the first line of stderr (or stdout)."""
    for line in outcome.stderr.splitlines():
        if line.startswith(("error:", "internal error:")):
            return line.strip()[:240]
    return _first_line(outcome.stderr) or _first_line(outcome.stdout)


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:240]
    return ""


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip()[:240] if lines else ""


def describe(run: corpus.Run, outcome: Outcome, problems: list[tuple[str, str]]) -> str:
    head = f"{run.case.id} ({run.case.why}): `{outcome.command}` -> exit {outcome.exit_code}"
    body = "; ".join(f"{CAUSES[c]}: {d}" for c, d in problems)
    return f"{head}: {body}\nstderr: {outcome.stderr[-1500:]}"


# --------------------------------------------------------------------------- the report


def run_all(space: Workspace, cases: list[corpus.Case]) -> list[tuple[corpus.Run, Outcome, list]]:
    all_runs = corpus.runs(cases)
    results = []
    for run in (r for r in all_runs if r.case.mode == "inproc"):
        outcome = space.execute(run)
        results.append((run, outcome, check(run, outcome, space.memory_limit_kb)))
    child = [r for r in all_runs if r.case.mode == "child"]
    outcomes = space.execute_many(child)
    for run in child:
        outcome = outcomes[run.id]
        results.append((run, outcome, check(run, outcome, space.memory_limit_kb)))
    return results


def write_report(path: Path, cases: list[corpus.Case]) -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gitool-hostile-") as tmp:
        space = Workspace(Path(tmp))
        results = run_all(space, cases)
        limit = space.memory_limit_kb
    seconds = time.perf_counter() - started
    failing = [(r, o, p) for r, o, p in results if p]
    lines = [
        "# Hostile corpus: failing runs (issue 11)",
        "",
        f"{corpus.summary_line()}.",
        f"This report: {len(results)} runs of {len(cases)} cases in {seconds:.0f} s; "
        f"**{len(failing)} runs fail** ({len({r.case.id for r, _, _ in failing})} cases).",
        "",
        "Each run happens in a folder holding the base files (`c.update.safetensors` = an fcn4 3x8x8 K=5 "
        "float64 gradient, `c.labels|features|reconstruction|truth.safetensors`, `k.checkpoint.safetensors`, "
        "`exp.pt` + `exp.facts.json`, `expn.before.npz` + `expn.gradient.npz` + `expn.facts.json`, `before.pt`, "
        "`grad.pt`), the hostile file, `evilmod.py` and `out/`; `lx.labels.safetensors` / "
        "`fx.features.safetensors` are the base labels/features re-pointed at the hostile update. "
        f"Memory limit: {limit / 1024:.0f} MB peak RSS. Recreate the files with "
        "`python -m tests.hostile.corpus --write DIR`; rerun one case with `pytest tests/test_hostile.py -k ID`.",
        "",
    ]
    by_cause: dict[str, list] = {}
    for run, outcome, problems in failing:
        cause = problems[0][0]
        by_cause.setdefault(cause, []).append((run, outcome, problems))
    for cause in CAUSES:
        if cause not in by_cause:
            continue
        entries = by_cause[cause]
        lines += [f"## {CAUSES[cause]}: {len(entries)} runs", ""]
        by_group: dict[str, list] = {}
        for entry in entries:
            by_group.setdefault(entry[0].case.group, []).append(entry)
        for group, items in sorted(by_group.items()):
            cases = len({run.case.id for run, _, _ in items})
            lines += [f"### {group} ({len(items)} runs, {cases} cases)", ""]
            by_case: dict[str, list] = {}
            for entry in items:
                by_case.setdefault(entry[0].case.id, []).append(entry)
            for case_id, runs_of_case in by_case.items():
                run, outcome, problems = runs_of_case[0]
                detail = problems[0][1]
                first = _telling_line(outcome)
                extra = "" if detail == first else f" [{detail}]"
                more = "" if len(problems) == 1 else " (also: " + ", ".join(c for c, _ in problems[1:]) + ")"
                others = ""
                if len(runs_of_case) > 1:
                    others = "; same for " + ", ".join(
                        f"`{r.argv[0]}` (exit {o.exit_code})" for r, o, _ in runs_of_case[1:])
                lines.append(f"- `{case_id}` ({run.case.why}): `{outcome.command}` -> exit "
                             f"{outcome.exit_code}: {first or '(no output)'}{extra}{more}{others}")
            lines.append("")
    if not failing:
        lines.append("No failures.")
    Path(path).write_text("\n".join(lines) + "\n")
    print(f"{len(failing)} of {len(results)} runs fail; wrote {path} in {seconds:.0f} s")
