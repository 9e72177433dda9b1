"""The method registry: help, docs and error alternatives come from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gitool.labels import LABEL_METHODS
from gitool.methods import ACCEPTS
from gitool.reconstruct import RECON_METHODS

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
REGISTRIES = {"labels": LABEL_METHODS, "reconstruct": RECON_METHODS}


@pytest.mark.parametrize("command", sorted(REGISTRIES))
def test_help_lists_every_registered_method_with_its_summary(run_cli, command):
    result = run_cli(command, "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.replace("│", " ").split())  # rich wraps lines inside a box
    for method in REGISTRIES[command].values():
        assert method.summary.split(" (")[0][:30] in text, method.name


def test_docs_list_every_registered_method_as_the_registry_says():
    """docs/methods.md holds the tables `gitool.methods.markdown_table` makes (regenerate with
    `python -m gitool.methods` when a method is added)."""
    from gitool.methods import markdown_table

    docs = DOCS.read_text()
    for registry in REGISTRIES.values():
        assert markdown_table(registry) in docs


@pytest.mark.parametrize("registry", REGISTRIES.values(), ids=REGISTRIES)
def test_every_entry_declares_what_it_accepts_and_options_that_build_with_defaults(registry):
    for method in registry.values():
        assert method.accepts and set(method.accepts) <= set(ACCEPTS)
        assert method.options_class()() is not None  # every option has a default
        assert callable(method.function())


def test_an_impossible_option_is_refused_by_its_declared_constraint():
    from gitool.errors import UsageError

    with pytest.raises(UsageError, match=r"--aux-per-class must be in \[1, 100000\], got 0"):
        LABEL_METHODS["rlu"].parse_options({"aux": "synthetic", "aux_per_class": 0})
    with pytest.raises(UsageError, match="--iterations must be >= 1, got 0"):  # never silently 4800
        RECON_METHODS["optimize"].parse_options({"iterations": 0})
    with pytest.raises(UsageError, match="--tol must be a finite number > 0, got nan"):
        RECON_METHODS["conv"].parse_options({"tol": float("nan")})
