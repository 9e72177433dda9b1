"""The README's commands run as printed, and every command's help shows an example.

Each ```bash block of README.md runs with ``bash -euo pipefail`` in a fresh folder, with
a ``gitool`` command on PATH that runs this checkout (and ``python``, the interpreter
running the tests). The ```python blocks whose first line names a file (``# mynet.py``)
are written there first, as a reader following the README would have saved them. Only
the install commands at the very top are skipped: they build a virtual environment and
run this test suite.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>\w*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
FILE_LINE = re.compile(r"#\s*(?P<name>[\w.-]+\.py)\s*$")


def readme_blocks() -> list[dict]:
    """Every fenced block of README.md: language, text (dedented), section heading, line."""
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        indent = len(match["indent"])
        body = "\n".join(line[indent:] for line in match["body"].splitlines()) + "\n"
        before = FENCE.sub("", text[: match.start()])  # a "# comment" in a block is no heading
        headings = re.findall(r"^#+ (.+)$", before, flags=re.M)
        blocks.append({"lang": match["lang"], "body": body, "section": headings[-1] if headings else "top",
                       "line": text.count("\n", 0, match.start()) + 1})
    return blocks


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _is_install(block: dict) -> bool:
    return "bash install.sh" in block["body"]


def bash_params() -> list:
    blocks = readme_blocks()
    params, files = [], {}
    for index, block in enumerate(blocks):
        if block["lang"] == "python":
            named = FILE_LINE.match(block["body"].splitlines()[0])
            if named:
                files[named["name"]] = block["body"]
        if block["lang"] != "bash":
            continue
        ident = f"{_slug(block['section'])}-line{block['line']}"
        marks = []
        if _is_install(block):
            assert index == 0, "only the install commands at the very top are skipped"
            marks = [pytest.mark.skip(reason="README install commands (bash install.sh ...): they build .venv and "
                                             "run this test suite; not run here")]
        params.append(pytest.param(block, dict(files), id=ident, marks=marks))
    return params


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory) -> Path:
    """A folder with ``gitool`` (this checkout) and ``python`` (this interpreter)."""
    folder = tmp_path_factory.mktemp("bin")
    gitool = folder / "gitool"
    gitool.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                      "from gitool.cli import main\nsys.exit(main())\n")
    python = folder / "python"
    python.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    for path in (gitool, python):
        path.chmod(0o755)
    return folder


def _env(bin_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GITOOL")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)  # the gitool on PATH finds this checkout by itself
    env["MPLBACKEND"] = "Agg"
    # One thread per process: the models are small, and on a few shared cores torch's
    # spinning worker threads cost more than they gain.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, "1")
    return env


def test_readme_has_the_blocks_this_file_runs():
    blocks = readme_blocks()
    bash = [b for b in blocks if b["lang"] == "bash"]
    assert len(bash) >= 4 and sum(map(_is_install, bash)) == 1
    # a shell block tagged otherwise (sh, console, none) would escape this file
    assert {b["lang"] for b in blocks} <= {"bash", "python", "toml", "json"}
    named = [FILE_LINE.match(b["body"].splitlines()[0]) for b in blocks if b["lang"] == "python"]
    assert all(named), "each python block starts with the name of its file (# mynet.py)"
    assert {m["name"] for m in named} >= {"mynet.py", "client_step.py"}


@pytest.mark.parametrize("block,files", bash_params())
def test_readme_bash_block_runs_as_printed(block, files, bin_dir, tmp_path):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    script = tmp_path / "block.sh"
    script.write_text(block["body"])
    done = subprocess.run(["bash", "-euo", "pipefail", str(script)], cwd=tmp_path, env=_env(bin_dir),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (f"README.md line {block['line']} ({block['section']}) exited "
                                  f"{done.returncode}:\n{block['body']}\nstderr:\n{done.stderr[-4000:]}")


def test_help_lists_every_command_and_each_shows_an_example(bin_dir, tmp_path):
    import typer

    from gitool.cli import app

    commands = list(typer.main.get_command(app).commands)
    env = {**_env(bin_dir), "COLUMNS": "200"}

    def helptext(*args: str) -> str:
        done = subprocess.run(["gitool", *args, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"gitool {' '.join(args)} --help exited {done.returncode}: {done.stderr}"
        return done.stdout

    top = helptext()
    listed = re.findall(r"^\W*([a-z][a-z-]*)\s{2,}\S", top, flags=re.M)
    assert set(commands) <= set(listed), f"gitool --help lacks {sorted(set(commands) - set(listed))}"
    lacking = [name for name in commands if "Example" not in helptext(name)]
    assert lacking == [], f"no example in the help of: {', '.join(lacking)}"
