"""Which updates an audit finds, where their results go, and whose they are (gitool/audit/layout.py)."""

from pathlib import Path

import pytest

from gitool.audit.layout import AuditInput, client_and_round, find_updates
from gitool.errors import GitoolError


def test_folders_are_searched_recursively_and_results_mirror_them(federated_run, tmp_path):
    items = find_updates([federated_run])
    assert [item.name for item in items] == ["round-1/0000", "round-1/0001", "round-2/client-1", "round-2/client-2",
                                            "round-2/client-3"]
    item = items[2]
    assert item.truth() == federated_run / "round-2" / "client-1.truth.safetensors"
    out = tmp_path / "out"
    assert item.output(out, "labels") == out / "round-2" / "client-1.labels.safetensors"
    assert item.output(out, "reconstruct") == out / "round-2" / "client-1.reconstruction.safetensors"
    assert item.output(out, "reconstruct", "optimize") == out / "optimize" / "round-2" / \
        "client-1.reconstruction.safetensors"
    # a file named directly keeps its bare name
    assert find_updates([item.path]) == [AuditInput(item.path, "client-1")]


def test_an_empty_folder_or_a_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(GitoolError, match="no \\*.update.safetensors"):
        find_updates([tmp_path])
    with pytest.raises(GitoolError, match="no such file"):
        find_updates([tmp_path / "nope"])


@pytest.mark.parametrize("name,provenance,expected", [
    ("0007", {}, ("0007", None)),
    ("round-2/0007", {}, ("0007", 2)),
    ("r3/client-7", {}, ("7", 3)),
    ("rounds/round_4/c12", {}, ("12", 4)),
    ("siteA/0000", {}, ("siteA/0000", None)),
    ("round-001/client-3", {"flower": {"server_round": 1, "client": "client-3"}}, ("client-3", 1)),
    ("x", {"round": 5, "client_id": 9}, ("9", 5)),
    ("x", {"round": True}, ("x", None)),  # a flag is no round number
])
def test_client_and_round_come_from_the_provenance_else_from_the_path(name, provenance, expected):
    assert client_and_round(name, provenance) == expected
