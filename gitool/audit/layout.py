"""Where an audit reads and writes: the updates found in the inputs, the result files each
one gets, and which client and round it belongs to.

Folders are searched recursively for ``*.update.safetensors``, and the results mirror the
input tree under ``--out-dir``: ``runs/round-2/0007.update.safetensors`` gives
``OUT/round-2/0007.labels.safetensors`` (the names the single commands use, so every
result chains into ``gitool features``, ``reconstruct`` and ``score``). A step's first
method writes there; a further method of the same step, asked for by ``--methods``,
writes the same name under ``OUT/METHOD/`` (``OUT/optimize/round-2/0007.reconstruction...``).
The truth of an update, when there is one, lies beside it (``0007.truth.safetensors``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from gitool.errors import GitoolError

UPDATE_SUFFIX = ".update.safetensors"
RESULT_OF_STEP = {"labels": "labels", "features": "features", "reconstruct": "reconstruction"}


@dataclass(frozen=True)
class AuditInput:
    """One update to audit: its path and its name relative to the input root, which is
    also where its results go (``round-2/0007``)."""

    path: Path
    name: str

    @property
    def stem(self) -> str:
        return Path(self.name).name

    def truth(self) -> Path:
        return self.path.parent / f"{self.stem}.truth.safetensors"

    def output(self, out_dir: str | Path, step: str, method: str | None = None) -> Path:
        """The result file of ``step``; ``method`` for a further method of the step."""
        return Path(output_path(out_dir, self.name, step, method))


def output_path(out_dir: str | Path, name: str, step: str, method: str | None = None) -> str:
    """:meth:`AuditInput.output` as text (an audit of 10,000 updates checks 30,000 of them)."""
    return os.path.join(out_dir, method or "", f"{name}.{RESULT_OF_STEP[step]}.safetensors")


def find_updates(items: Iterable[str | Path]) -> list[AuditInput]:
    """Files named directly, and every ``*.update.safetensors`` under named folders
    (recursively, not into linked folders), in a stable order."""
    found: list[AuditInput] = []
    for item in items:
        item = Path(item)
        if item.is_dir():
            names = []
            for folder, subfolders, files in os.walk(item):
                relative = os.path.relpath(folder, item)
                parts = () if relative == "." else tuple(relative.split(os.sep))
                names.extend(parts + (name,) for name in files if name.endswith(UPDATE_SUFFIX))
            if not names:
                raise GitoolError(f"{item}: no *{UPDATE_SUFFIX} files in this folder or below")
            found.extend(AuditInput(item.joinpath(*parts), _name("/".join(parts))) for parts in sorted(names))
        elif item.exists():
            found.append(AuditInput(item, _name(item.name)))
        else:
            raise GitoolError(f"{item}: no such file or folder")
    return found


def _name(relative: str) -> str:
    for suffix in (UPDATE_SUFFIX, ".safetensors"):
        if relative.endswith(suffix):
            return relative[: -len(suffix)]
    return relative


# --------------------------------------------------------------------------- client and round

# Where a recording states them (gitool.integrations.flower, or any tool that fills the
# provenance), first match wins; otherwise the path names them.
ROUND_KEYS = ("round", "server_round")
CLIENT_KEYS = ("client", "client_id", "cid", "partition_id", "node_id")
ROUND_IN_PATH = re.compile(r"^(?:round[-_]?|rnd[-_]?|r)(\d+)$", re.I)
CLIENT_IN_PATH = re.compile(r"^(?:client[-_]?|cid[-_]?|c)(\d+)$|^client[-_]([\w-]+)$", re.I)


def client_and_round(name: str, provenance: dict[str, Any] | None) -> tuple[str, int | None]:
    """Which client sent the update and in which round: from the update's provenance
    (``round``/``client`` keys, also inside a nested section such as ``flower``), else from
    its path (a folder ``round-3``, ``r3``; a folder or file ``client-7``, ``c7``), else the
    client is the update's name without the round folder and the round is unknown."""
    found: dict[str, Any] = {}
    sections = [provenance or {}] + [v for v in (provenance or {}).values() if isinstance(v, dict)]
    for section in sections:
        for key in ROUND_KEYS:
            value = section.get(key)
            if "round" not in found and isinstance(value, int) and not isinstance(value, bool):
                found["round"] = value
        for key in CLIENT_KEYS:
            value = section.get(key)
            if "client" not in found and isinstance(value, (int, str)) and not isinstance(value, bool):
                found["client"] = str(value)
    parts = name.split("/")
    rest = []
    for part in parts[:-1]:
        match = ROUND_IN_PATH.match(part)
        if match:
            found.setdefault("round", int(match.group(1)))
        else:
            rest.append(part)
    rest.append(parts[-1])
    for part in reversed(rest):
        match = CLIENT_IN_PATH.match(part)
        if match:
            found.setdefault("client", match.group(1) or match.group(2))
    return found.get("client", "/".join(rest)), found.get("round")
