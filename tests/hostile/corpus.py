"""A generator of hostile inputs for every gitool command that reads files (issue 11).

Each :class:`Case` is one crafted file (or one option value, special file or output
path) with the commands that read it. Files are derived from a small set of valid base
files (an fcn4 capture of 3x8x8 images with K = 5 in float64, its labels, features,
reconstruction and truth, a checkpoint, and its export as a torch bundle and as Flower
.npz lists), built once by running gitool itself, then mutated at the byte level: the
tests never ask gitool's internals whether a file is bad.

``python -m tests.hostile.corpus --count`` prints the corpus counts;
``python -m tests.hostile.corpus --report FILE.md`` runs the whole corpus and writes the
failures grouped by cause (see runner.py).
"""

from __future__ import annotations

import io
import json
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

MODEL = ("--model", "fcn4", "--model-opt", "widths=32,16,8", "--model-opt", "hidden_bias=false", "--no-bias",
         "--image-size", "3x8x8", "-K", "5")
MARKER = "MARKER"  # what the code-execution payloads create (in the working directory and in the temp folder)
DEEP = 200_000  # nesting depth of the deep-JSON cases

# Base files, by placeholder: {U} is the update, {L} its labels, ...
BASE_NAMES = {
    "U": "c.update.safetensors",
    "T": "c.truth.safetensors",
    "L": "c.labels.safetensors",
    "F": "c.features.safetensors",
    "R": "c.reconstruction.safetensors",
    "C": "k.checkpoint.safetensors",
    "EPT": "exp.pt",  # export bundle (before + gradient)
    "EFJ": "exp.facts.json",
    "NB": "expn.before.npz",
    "NG": "expn.gradient.npz",
    "NFJ": "expn.facts.json",
    "BPT": "before.pt",  # plain torch state dicts
    "GPT": "grad.pt",
    "FTOML": "facts.toml",
    "PPT": "private.pt",  # the client's private batch for gitool truth (the capture's images and labels)
}

# The commands that read each kind of file; {X} is the hostile file, {O} the output folder,
# {LX}/{FX} the base labels/features re-pointed at {X} (so a refusal cannot come from the
# "made from another update" check instead of from reading {X}).
READERS: dict[str, list[tuple[str, ...]]] = {
    "update": [
        ("inspect", "{X}"),
        ("labels", "{X}", "-o", "{O}/o.labels.safetensors"),
        ("features", "{X}", "--labels", "{LX}", "-o", "{O}/o.features.safetensors"),
        ("reconstruct", "{X}", "--labels", "{LX}", "--features", "{FX}", "--method", "fc", "-o",
         "{O}/o.reconstruction.safetensors"),
        ("export", "{X}", "-o", "{O}/o.pt"),
        ("audit", "{X}", "--out-dir", "{O}/audit", "--methods", "labels,features,fc"),
    ],
    "labels": [
        ("inspect", "{X}"),
        ("features", "{U}", "--labels", "{X}", "-o", "{O}/o.features.safetensors"),
        ("reconstruct", "{U}", "--labels", "{X}", "--features", "{F}", "--method", "fc", "-o",
         "{O}/o.reconstruction.safetensors"),
        ("score", "{X}", "--truth", "{T}"),
    ],
    "features": [
        ("inspect", "{X}"),
        ("reconstruct", "{U}", "--labels", "{L}", "--features", "{X}", "--method", "fc", "-o",
         "{O}/o.reconstruction.safetensors"),
        ("score", "{X}", "--truth", "{T}"),
    ],
    "reconstruction": [
        ("inspect", "{X}"),
        ("score", "{X}", "--truth", "{T}"),
    ],
    "truth": [
        ("inspect", "{X}"),
        ("score", "{R}", "--truth", "{X}"),
        ("score", "{L}", "--truth", "{X}"),
    ],
    "checkpoint": [
        ("inspect", "{X}"),
        ("capture", "--init", "{X}", "-o", "{O}/k.update.safetensors"),
        ("train", "--init", "{X}", "--epochs", "1", "--batch-size", "16", "-o", "{O}/t.checkpoint.safetensors"),
        ("import", "--before", "{X}", "--grad", "{NG}", "--facts", "{NFJ}", "-o", "{O}/i.update.safetensors"),
    ],
    "weights": [
        ("import", "--before", "{X}", "--grad", "{NG}", "--facts", "{NFJ}", "-o", "{O}/i.update.safetensors"),
        ("import", "--before", "{NB}", "--grad", "{X}", "--facts", "{NFJ}", "-o", "{O}/i.update.safetensors"),
        ("import", *MODEL, "--before", "{NB}", "--delta", "{X}", "-o", "{O}/i.update.safetensors"),
        ("import", *MODEL, "--before", "{NB}", "--after", "{X}", "-o", "{O}/i.update.safetensors"),
    ],
    "facts": [
        ("import", "--before", "{NB}", "--grad", "{NG}", "--facts", "{X}", "-o", "{O}/i.update.safetensors"),
    ],
    "private": [
        ("truth", "{U}", "--private", "{X}", "-o", "{O}/o.truth.safetensors"),
    ],
}
# The file each slot's mutations start from, and the valid file that stands in for {X}
# in the control runs (every reader must succeed on it, or the corpus proves nothing).
SLOT_BASE = {"update": "U", "labels": "L", "features": "F", "reconstruction": "R", "truth": "T",
             "checkpoint": "C", "weights": "NG", "facts": "NFJ", "private": "PPT"}
# Memory-bomb runs are expensive (a fresh process each): the commands that matter.
BOMB_READERS = {"update": [0, 1, 4], "checkpoint": [0, 1], "weights": [0, 1], "facts": [0], "private": [0]}


@dataclass
class Case:
    id: str
    group: str  # the cause family, for the report
    why: str
    slot: str | None = None  # a file read by READERS[slot]; None for an explicit argv
    build: Callable[[Path, dict[str, Path]], Path] | None = None  # writes {X} into a folder
    argv: tuple[str, ...] | None = None  # explicit command (options, overlaps, special files)
    prepare: Callable[[Path, dict[str, Path]], dict[str, str]] | None = None  # extra placeholders in the run folder
    mode: str = "inproc"  # inproc | child (a fresh process: memory bombs and special files)
    bomb: bool = False  # counts toward the peak-memory check
    fresh: bool = False  # build {X} inside each run folder instead of copying it (huge sparse files)
    suffix: str = ""  # file name of {X}: f"{id}{suffix}"
    inspect_ok: bool = True  # inspect may exit 0 on it (with a warning): a parseable gitool file
    skip: tuple[str, ...] = ()  # readers (by command name) for which the file is not garbage

    def commands(self) -> list[tuple[str, ...]]:
        if self.argv is not None:
            return [self.argv]
        readers = READERS[self.slot]
        if self.bomb and self.slot in BOMB_READERS:
            readers = [readers[i] for i in BOMB_READERS[self.slot]]
        return [argv for argv in readers if argv[0] not in self.skip]


@dataclass
class Run:
    case: Case
    argv: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.case.id}:{self.argv[0]}" + (str(self.index + 1) if self.index else "")

    index: int = 0


CASES: list[Case] = []


def add(case: Case) -> Case:
    if any(c.id == case.id for c in CASES):
        raise ValueError(f"duplicate case id {case.id}")
    CASES.append(case)
    return case


def runs(cases: list[Case] | None = None) -> list[Run]:
    out = []
    for case in cases if cases is not None else CASES:
        seen: dict[str, int] = {}
        for argv in case.commands():
            n = seen.get(argv[0], 0)
            seen[argv[0]] = n + 1
            out.append(Run(case, argv, n))
    return out


# --------------------------------------------------------------------------- safetensors bytes


def read_st(path: Path) -> tuple[dict[str, Any], bytes]:
    return read_st_bytes(Path(path).read_bytes())


def read_st_bytes(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_bytes(header: dict | str | bytes, data: bytes, prefix: int | None = None) -> bytes:
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header) if prefix is None else prefix) + header + data


def meta_of(header: dict) -> dict:
    return json.loads(header["__metadata__"]["gitool.meta"])


def tensors_of(path: Path) -> tuple[dict, dict]:
    from safetensors.torch import load

    header, _ = read_st(path)
    return load(Path(path).read_bytes()), dict(header.get("__metadata__", {}))


def save_tensors(tensors: dict, metadata: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def deep_json(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


def _set(meta: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = meta
    for key in parents:
        node = node[key]
    node[last] = value


def _del(meta: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    node = meta
    for key in parents:
        node = node[key]
    del node[last]


# --------------------------------------------------------------------------- case makers


def _st_name(case_id: str, slot: str) -> str:
    kind = {"weights": "weights", "facts": "facts"}.get(slot, slot)
    return f".{kind}.safetensors"


def meta_case(id: str, slot: str, group: str, why: str, edit: Callable[[dict], Any], **kw) -> Case:
    """The slot's base file with its gitool.meta edited (tensors untouched)."""
    def build(folder: Path, base: dict[str, Path]) -> Path:
        header, data = read_st(base[SLOT_BASE[slot]])
        meta = meta_of(header)
        edit(meta)
        header["__metadata__"]["gitool.meta"] = json.dumps(meta)
        path = folder / f"{id}{_st_name(id, slot)}"
        path.write_bytes(st_bytes(header, data))
        return path

    return add(Case(id, group, why, slot=slot, build=build, **kw))


def set_case(id: str, slot: str, group: str, why: str, dotted: str, value: Any, **kw) -> Case:
    return meta_case(id, slot, group, why, lambda m: _set(m, dotted, value), **kw)


def raw_meta_case(id: str, slot: str, group: str, why: str, text: str, **kw) -> Case:
    """gitool.meta replaced by ``text`` verbatim."""
    def edit_header(header, data):
        header["__metadata__"]["gitool.meta"] = text
        return header, data, None

    return header_case(id, slot, group, why, edit_header, **kw)


def header_case(id: str, slot: str, group: str, why: str,
                edit: Callable[[dict, bytes], tuple[Any, bytes, int | None]], **kw) -> Case:
    """The slot's base file with its header (JSON dict or raw text) and data rewritten."""
    def build(folder: Path, base: dict[str, Path]) -> Path:
        header, data = read_st(base[SLOT_BASE[slot]])
        new_header, new_data, prefix = edit(header, data)
        path = folder / f"{id}{_st_name(id, slot)}"
        path.write_bytes(st_bytes(new_header, new_data, prefix))
        return path

    return add(Case(id, group, why, slot=slot, build=build, **kw))


def bytes_case(id: str, slot: str, group: str, why: str, edit: Callable[[bytes], bytes], **kw) -> Case:
    def build(folder: Path, base: dict[str, Path]) -> Path:
        path = folder / f"{id}{_st_name(id, slot)}"
        path.write_bytes(edit(base[SLOT_BASE[slot]].read_bytes()))
        return path

    kw.setdefault("inspect_ok", False)
    return add(Case(id, group, why, slot=slot, build=build, **kw))


def tensor_case(id: str, slot: str, group: str, why: str, edit: Callable[[dict, dict], Any], **kw) -> Case:
    """The slot's base file rebuilt with its tensors edited (metadata kept)."""
    def build(folder: Path, base: dict[str, Path]) -> Path:
        tensors, metadata = tensors_of(base[SLOT_BASE[slot]])
        edit(tensors, metadata)
        path = folder / f"{id}{_st_name(id, slot)}"
        path.write_bytes(save_tensors(tensors, metadata))
        return path

    return add(Case(id, group, why, slot=slot, build=build, **kw))


def file_case(id: str, slot: str, group: str, why: str, make: Callable[[Path, dict[str, Path]], None],
              suffix: str, **kw) -> Case:
    """A file written from scratch (or from another base) by ``make(path, base)``."""
    def build(folder: Path, base: dict[str, Path]) -> Path:
        path = folder / f"{id}{suffix}"
        make(path, base)
        return path

    return add(Case(id, group, why, slot=slot, build=build, suffix=suffix, **kw))


def option_case(id: str, why: str, argv: tuple[str, ...], group: str = "options", **kw) -> Case:
    return add(Case(id, group, why, argv=argv, **kw))


# --------------------------------------------------------------------------- update: code execution

CODE = "code execution"
set_case("meta-model-os-system", "update", CODE, "the file names os:system as its model factory", "model",
         {"name": "os:system", "num_classes": 5, "input_shape": [3, 8, 8], "activation": None, "last_bias": False,
          "options": {"command": f"touch {MARKER}"}})
set_case("meta-model-posix-system", "update", CODE, "posix:system as the model factory", "model",
         {"name": "posix:system", "num_classes": 5, "input_shape": [3, 8, 8], "activation": None,
          "last_bias": False, "options": {"command": f"touch {MARKER}"}})
set_case("meta-model-subprocess", "update", CODE, "subprocess:getoutput as the model factory", "model",
         {"name": "subprocess:getoutput", "num_classes": 5, "input_shape": [3, 8, 8], "activation": None,
          "last_bias": False, "options": {"cmd": f"touch {MARKER}"}})
set_case("meta-model-evilmod", "update", CODE, "evilmod:make; evilmod.py in the working folder", "model.name",
         "evilmod:make")
set_case("meta-model-evilmod-missing-attr", "update", CODE, "evilmod:nothing (the import alone runs the module)",
         "model.name", "evilmod:nothing")

# --------------------------------------------------------------------------- update: model spec

SPEC = "metadata validation: model spec"
set_case("meta-K-1e8", "update", SPEC, "a small file whose model claims K = 1e8 classes", "model.num_classes",
         100_000_000, mode="child", bomb=True)
set_case("meta-input-shape-huge", "update", SPEC, "model input_shape 3x100000x100000", "model.input_shape",
         [3, 100_000, 100_000], mode="child", bomb=True)
set_case("meta-widths-huge", "update", SPEC, "model option widths=100000000,16,8", "model.options.widths",
         "100000000,16,8", mode="child", bomb=True)
for _id, _value in (("1", 1), ("0", 0), ("neg", -5), ("str", "5"), ("float", 5.0), ("bool", True), ("other", 6)):
    set_case(f"meta-K-{_id}", "update", SPEC, f"model.num_classes = {_value!r}", "model.num_classes", _value)
for _id, _value in (("2d", [3, 8]), ("zero", [0, 8, 8]), ("str", "3x8x8"), ("neg", [3, -8, 8])):
    set_case(f"meta-input-shape-{_id}", "update", SPEC, f"model.input_shape = {_value!r}", "model.input_shape",
             _value)
set_case("meta-widths-garbage", "update", SPEC, "widths=a,b", "model.options.widths", "a,b")
set_case("meta-widths-negative", "update", SPEC, "widths=-1,16,8", "model.options.widths", "-1,16,8")
set_case("meta-options-int", "update", SPEC, "model.options = 5", "model.options", 5)
set_case("meta-options-unknown", "update", SPEC, "model option evil=1", "model.options.evil", "1")
set_case("meta-activation-unknown", "update", SPEC, "activation 'evil'", "model.activation", "evil")
set_case("meta-last-bias-str", "update", SPEC, "last_bias 'yes'", "model.last_bias", "yes")
set_case("meta-model-unknown-field", "update", SPEC, "unknown model field", "model.evil", 1)
set_case("meta-model-unknown-name", "update", SPEC, "model resnet9000", "model.name", "resnet9000")
set_case("meta-model-name-int", "update", SPEC, "model.name = 5", "model.name", 5)
set_case("meta-model-list", "update", SPEC, "model section a list", "model", [])
meta_case("meta-model-no-name", "update", SPEC, "model without a name", lambda m: _del(m, "model.name"))
for _id, _value in (("zoo", 0), ("neg", -1), ("huge", 10 ** 30), ("bool", True), ("float", 0.0), ("list", [0]),
                    ("space", "a b"), ("long", "x" * 65), ("dict", {"key": "logits"})):
    set_case(f"meta-output-{_id}", "update", SPEC, f"model.output = {_value!r:.40}", "model.output", _value)

# --------------------------------------------------------------------------- update: training, loss, input, defence

FACTS = "metadata validation: facts"
for _id, _field, _value in (
    ("batch-0", "training.batch_size", 0), ("batch-neg", "training.batch_size", -3),
    ("batch-float", "training.batch_size", 1.5), ("batch-str", "training.batch_size", "1"),
    ("steps-0", "training.steps", 0), ("steps-neg", "training.steps", -1),
    ("lr-neg", "training.lr", -1.0), ("lr-nan", "training.lr", float("nan")), ("lr-str", "training.lr", "x"),
    ("lr-inf", "training.lr", float("inf")), ("lr-0", "training.lr", 0.0),
    ("optimizer-unknown", "training.optimizer", "adamw"), ("mode-unknown", "training.model_mode", "test"),
    ("dtype-unknown", "training.dtype", "float16"), ("dtype-int8", "training.dtype", "int8"),
    ("dtype-disagrees", "training.dtype", "float32"),
    ("momentum-nan", "training.momentum", float("nan")), ("momentum-neg", "training.momentum", -1.0),
    ("weight-decay-neg", "training.weight_decay", -1.0), ("prox-mu-neg", "training.prox_mu", -1.0),
    ("family-unknown", "loss.family", "evil"), ("smoothing-5", "loss.label_smoothing", 5.0),
    ("smoothing-neg", "loss.label_smoothing", -0.1), ("smoothing-range-reversed", "loss.label_smoothing_range",
                                                      [0.5, 0.1]),
    ("mixup-coef-2", "loss.mixup_coef", 2.0), ("mixup-alpha-neg", "loss.mixup_alpha", -1.0),
    ("std-0", "input.std", [0.0]), ("std-neg", "input.std", [-1.0]), ("std-nan", "input.std", [float("nan")]),
    ("mean-nan", "input.mean", [float("nan")]), ("std-len-2", "input.std", [1.0, 1.0]),
    ("input-shape-mismatch", "input.shape", [3, 8, 9]),
    ("prune-2", "defence.prune", 2.0), ("prune-neg", "defence.prune", -0.5),
    ("dp-clip-neg", "defence.dp_clip", -1.0), ("dp-noise-nan", "defence.dp_noise", float("nan")),
):
    set_case(f"meta-{_id}", "update", FACTS, f"{_field} = {_value!r}", _field, _value)
set_case("meta-batch-1e12", "update", FACTS, "training.batch_size = 10**12", "training.batch_size", 10 ** 12,
         mode="child", bomb=True)

WRONG = "metadata validation: types and sections"
for _id, _field, _value in (
    ("provenance-5", "provenance", 5), ("provenance-str", "provenance", "x"), ("provenance-list", "provenance", []),
    ("unknown-facts-5", "provenance.unknown_facts", 5), ("unknown-facts-bogus", "provenance.unknown_facts",
                                                         ["no-such-fact"]),
    ("update-kind-evil", "update_kind", "evil"), ("update-kind-delta", "update_kind", "delta"),
    ("training-list", "training", []), ("loss-str", "loss", "hard"), ("defence-5", "defence", 5),
    ("input-null", "input", None), ("training-unknown-field", "training.evil", 1),
):
    set_case(f"meta-{_id}", "update", WRONG, f"{_field} = {_value!r}", _field, _value)
for _section in ("model", "input", "loss", "training", "defence", "update_kind"):
    meta_case(f"meta-missing-{_section}", "update", WRONG, f"no '{_section}' in gitool.meta",
              lambda m, s=_section: _del(m, s))

# --------------------------------------------------------------------------- update: header and bytes

HEADER = "safetensors header"
bytes_case("st-empty", "update", HEADER, "an empty file", lambda b: b"")
bytes_case("st-short", "update", HEADER, "4 bytes", lambda b: b[:4])
bytes_case("st-prefix-0", "update", HEADER, "header length 0", lambda b: struct.pack("<Q", 0) + b[8:])
bytes_case("st-prefix-huge", "update", HEADER, "header length 2**63", lambda b: struct.pack("<Q", 2 ** 63) + b[8:])
bytes_case("st-prefix-max", "update", HEADER, "header length 2**64-1",
           lambda b: struct.pack("<Q", 2 ** 64 - 1) + b[8:])
bytes_case("st-prefix-beyond", "update", HEADER, "header length larger than the file",
           lambda b: struct.pack("<Q", len(b) + 1000) + b[8:])
bytes_case("st-prefix-short", "update", HEADER, "header length cuts the JSON",
           lambda b: struct.pack("<Q", struct.unpack("<Q", b[:8])[0] // 2) + b[8:])
bytes_case("st-truncated-header", "update", HEADER, "file cut inside the header",
           lambda b: b[:8 + struct.unpack("<Q", b[:8])[0] // 2])
bytes_case("st-truncated-data", "update", HEADER, "file cut inside the data", lambda b: b[:-100])
bytes_case("st-trailing-garbage", "update", HEADER, "bytes after the last tensor", lambda b: b + b"\x00" * 64)
bytes_case("st-random", "update", HEADER, "random bytes", lambda b: bytes((i * 7919 + 13) % 256 for i in range(4096)))
bytes_case("st-text", "update", HEADER, "a text file", lambda b: b"this is not a safetensors file\n" * 10)
header_case("st-non-utf8", "update", HEADER, "header bytes not UTF-8",
            lambda h, d: (json.dumps(h, separators=(",", ":")).encode().replace(b"gitool.kind", b"gitool.\xff\xfe"),
                          d, None), inspect_ok=False)
header_case("st-header-list", "update", HEADER, "header JSON a list", lambda h, d: ("[]", d, None), inspect_ok=False)
header_case("st-header-number", "update", HEADER, "header JSON a number", lambda h, d: ("5", d, None),
            inspect_ok=False)
header_case("st-header-invalid", "update", HEADER, "header not JSON", lambda h, d: ("{\"a\":", d, None),
            inspect_ok=False)
header_case("st-header-deep", "update", HEADER, f"header JSON nested {DEEP} deep",
            lambda h, d: (json.dumps(h, separators=(",", ":"))[:-1] + ",\"z\":" + deep_json() + "}", d, None),
            inspect_ok=False)
header_case("st-metadata-int", "update", HEADER, "__metadata__ value not a string",
            lambda h, d: ({**h, "__metadata__": {**h["__metadata__"], "gitool.version": 1}}, d, None),
            inspect_ok=False)
header_case("st-metadata-list", "update", HEADER, "__metadata__ a list",
            lambda h, d: ({**h, "__metadata__": []}, d, None), inspect_ok=False)
header_case("st-no-metadata", "update", HEADER, "no __metadata__ (a plain state dict)",
            lambda h, d: ({k: v for k, v in h.items() if k != "__metadata__"}, d, None), inspect_ok=False)
header_case("st-kind-unknown", "update", HEADER, "gitool.kind 'weights'",
            lambda h, d: ({**h, "__metadata__": {**h["__metadata__"], "gitool.kind": "weights"}}, d, None))
for _id, _v in (("2", "2"), ("0", "0"), ("x", "x"), ("neg", "-1"), ("huge", "1" + "0" * 5000)):
    header_case(f"st-version-{_id}", "update", HEADER, f"gitool.version {_v[:12]!r}",
                lambda h, d, v=_v: ({**h, "__metadata__": {**h["__metadata__"], "gitool.version": v}}, d, None),
                inspect_ok=False)
raw_meta_case("meta-deep", "update", HEADER, f"gitool.meta nested {DEEP} deep", deep_json(), inspect_ok=False)
header_case("meta-deep-in-provenance", "update", HEADER, f"gitool.meta provenance nested {DEEP} deep",
            lambda h, d: ({**h, "__metadata__": {**h["__metadata__"], "gitool.meta":
                           h["__metadata__"]["gitool.meta"][:-1] + ",\"provenance\":" + deep_json() + "}"}}, d,
                          None), inspect_ok=False)
for _id, _text in (("list", "[]"), ("number", "5"), ("null", "null"), ("string", "\"x\""), ("invalid", "{\"a\":")):
    raw_meta_case(f"meta-not-object-{_id}", "update", HEADER, f"gitool.meta = {_text}", _text, inspect_ok=False)


def _dup(h: dict, d: bytes):
    """Two entries of one name (the JSON text holds both; a dict keeps the last)."""
    name = next(k for k in h if k != "__metadata__")
    entry = json.dumps(h[name], separators=(",", ":"))
    text = json.dumps(h, separators=(",", ":"))
    return text[:-1] + "," + json.dumps(name) + ":" + entry + "}", d, None


header_case("st-duplicate-names", "update", HEADER, "a tensor name twice in the header", _dup)


def _global_entries(h):
    return sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])


def _overlap(h, d):
    names = _global_entries(h)
    a, b = names[0], names[1]
    h[b] = dict(h[b], data_offsets=list(h[a]["data_offsets"]), shape=h[a]["shape"])
    return h, d, None


def _out_of_range(h, d):
    last = _global_entries(h)[-1]
    lo, hi = h[last]["data_offsets"]
    h[last] = dict(h[last], data_offsets=[lo + 1_000_000, hi + 1_000_000])
    return h, d, None


def _span(h, d):
    first = _global_entries(h)[0]
    h[first] = dict(h[first], shape=[h[first]["shape"][0] + 1] + h[first]["shape"][1:])
    return h, d, None


def _huge_shape(h, d):
    first = _global_entries(h)[0]
    h[first] = dict(h[first], shape=[2 ** 31, 2 ** 31])
    return h, d, None


def _huge_offsets(h, d):
    last = _global_entries(h)[-1]
    lo, _ = h[last]["data_offsets"]
    h[last] = dict(h[last], shape=[2 ** 37], data_offsets=[lo, lo + 2 ** 40])
    return h, d, None


def _negative_shape(h, d):
    first = _global_entries(h)[0]
    h[first] = dict(h[first], shape=[-1] + h[first]["shape"][1:])
    return h, d, None


header_case("st-overlapping-offsets", "update", HEADER, "two tensors on the same bytes", _overlap, inspect_ok=False)
header_case("st-offsets-out-of-range", "update", HEADER, "data offsets past the end", _out_of_range,
            inspect_ok=False)
header_case("st-span-mismatch", "update", HEADER, "shape x itemsize != byte span", _span, inspect_ok=False)
header_case("st-huge-shape", "update", HEADER, "a header-claimed shape 2**31 x 2**31", _huge_shape,
            inspect_ok=False)
header_case("st-huge-offsets", "update", HEADER, "a tensor claiming 1 TiB of data", _huge_offsets,
            inspect_ok=False)
header_case("st-negative-shape", "update", HEADER, "a negative dimension", _negative_shape, inspect_ok=False)

HUGE_INT = "9" * 5000  # Python refuses to parse integers past 4300 digits (ValueError)
header_case("meta-huge-int", "update", HEADER, "training.batch_size a 5000-digit integer",
            lambda h, d: ({**h, "__metadata__": {**h["__metadata__"], "gitool.meta": h["__metadata__"]["gitool.meta"]
                           .replace('"batch_size":1', '"batch_size":' + HUGE_INT)
                           .replace('"batch_size": 1', '"batch_size": ' + HUGE_INT)}}, d, None))
header_case("lab-huge-int", "labels", HEADER, "wall_time a 5000-digit integer",
            lambda h, d: ({**h, "__metadata__": {**h["__metadata__"], "gitool.meta": h["__metadata__"]["gitool.meta"]
                           [:-1] + ', "wall_time": ' + HUGE_INT + "}"}}, d, None))


def _duplicate_kind(h, d):
    """__metadata__ holding gitool.kind twice (update, then truth): which one is it?"""
    text = json.dumps(h, separators=(",", ":"))
    return text.replace('"gitool.kind":"update"', '"gitool.kind":"update","gitool.kind":"truth"'), d, None


header_case("st-metadata-duplicate-kind", "update", HEADER, "gitool.kind twice in __metadata__", _duplicate_kind,
            inspect_ok=True)


def _huge_header(path: Path, base: dict[str, Path]) -> None:
    """A valid update whose header is padded with 256 MiB of spaces (a sparse-free, real header)."""
    header, data = read_st(base["U"])
    text = json.dumps(header, separators=(",", ":")).encode() + b" " * (256 << 20)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        handle.write(data)


file_case("st-header-256MiB", "update", "memory", "a header of 256 MiB (JSON plus spaces)", _huge_header,
          ".update.safetensors", mode="child", bomb=True, fresh=True, inspect_ok=False)

# --------------------------------------------------------------------------- update: dtypes, values, tensors

DTYPE = "dtypes and duplicate names"
VALUES = "tensor values and names"


def _cast(prefix: str, dtype_name: str, first_only: bool = False):
    def edit(tensors, metadata):
        import torch

        dtype = getattr(torch, dtype_name)
        names = [n for n in tensors if n.startswith(prefix)]
        for name in names[:1] if first_only else names:
            t = tensors[name]
            tensors[name] = (t > 0) if dtype is torch.bool else (t * 100 if not dtype.is_floating_point else t).to(dtype)

    return edit


for _dt in ("float16", "bfloat16", "int8", "bool", "int64", "uint8"):
    tensor_case(f"dtype-grad-{_dt}", "update", DTYPE, f"grad.* tensors in {_dt}", _cast("grad.", _dt))
tensor_case("dtype-global-float16", "update", DTYPE, "one global tensor in float16", _cast("global.", "float16", True))
tensor_case("dtype-mixed-float32", "update", DTYPE, "one grad tensor float32 in a float64 update",
            _cast("grad.", "float32", True))


def _fill(prefix: str, value: float):
    def edit(tensors, metadata):
        name = next(n for n in tensors if n.startswith(prefix))
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = value

    return edit


tensor_case("values-grad-nan", "update", VALUES, "a NaN in a gradient", _fill("grad.", float("nan")))
tensor_case("values-grad-inf", "update", VALUES, "an inf in a gradient", _fill("grad.", float("inf")))
tensor_case("values-global-nan", "update", VALUES, "a NaN in the global weights", _fill("global.", float("nan")))
tensor_case("values-global-neginf", "update", VALUES, "-inf in the global weights", _fill("global.", float("-inf")))


def _extra(name: str, shape=(1,)):
    def edit(tensors, metadata):
        import torch

        tensors[name] = torch.zeros(shape, dtype=torch.float64)

    return edit


tensor_case("extra-tensor", "update", VALUES, "an extra tensor 'extra.x'", _extra("extra.x"))
tensor_case("extra-grad", "update", VALUES, "grad. for a parameter the model lacks", _extra("grad.evil.weight"))
tensor_case("extra-global", "update", VALUES, "global. for an entry the model lacks", _extra("global.evil.weight"))
tensor_case("extra-delta-family", "update", VALUES, "both grad. and delta. families",
            lambda t, m: t.update({"delta." + n[5:]: v.clone() for n, v in list(t.items()) if n.startswith("grad.")}))
tensor_case("missing-grad", "update", VALUES, "a gradient tensor missing",
            lambda t, m: t.pop(next(n for n in t if n.startswith("grad."))))
tensor_case("missing-global", "update", VALUES, "a global tensor missing",
            lambda t, m: t.pop(next(n for n in t if n.startswith("global."))))
tensor_case("scalar-grad", "update", VALUES, "a gradient tensor of shape ()",
            lambda t, m: t.__setitem__(next(n for n in t if n.startswith("grad.")),
                                       t[next(n for n in t if n.startswith("grad."))].reshape(-1)[0].clone()))


def _big_extra(path: Path, base: dict[str, Path]) -> None:
    """The base update plus a 1 GiB extra tensor (a sparse file: no disk cost)."""
    header, data = read_st(base["U"])
    size = 1 << 30
    header["extra.big"] = {"dtype": "F32", "shape": [size // 4], "data_offsets": [len(data), len(data) + size]}
    head = st_bytes(header, b"")
    with open(path, "wb") as handle:
        handle.write(head + data)
        handle.truncate(len(head) + len(data) + size)


file_case("extra-tensor-1GiB", "update", VALUES, "an extra 1 GiB tensor", _big_extra, ".update.safetensors",
          mode="child", bomb=True, fresh=True)

# --------------------------------------------------------------------------- update: wrong kinds of file

KIND = "wrong kind of file"


def _copy_of(key: str):
    def make(path: Path, base: dict[str, Path]) -> None:
        path.write_bytes(base[key].read_bytes())

    return make


for _key, _what in (("T", "truth"), ("L", "labels"), ("C", "checkpoint"), ("EPT", "torch bundle"),
                    ("NG", "npz archive")):
    file_case(f"kind-{_what.replace(' ', '-')}-as-update", "update", KIND, f"a {_what} file given as an update",
              _copy_of(_key), ".update.safetensors", inspect_ok=False,
              skip=("inspect",) if _key in ("T", "L", "C") else ())


def _plain_state(path: Path, base: dict[str, Path]) -> None:
    tensors, _ = tensors_of(base["U"])
    path.write_bytes(save_tensors(tensors, {}))


file_case("kind-plain-safetensors", "update", KIND, "a safetensors file without gitool metadata", _plain_state,
          ".update.safetensors", inspect_ok=False)
file_case("kind-png", "update", KIND, "a PNG", lambda p, b: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200)),
          ".update.safetensors", inspect_ok=False)

# --------------------------------------------------------------------------- results: labels, features, reconstruction

RESULT = "metadata validation: results"
for _slot in ("labels", "features", "reconstruction"):
    _p = {"labels": "lab", "features": "feat", "reconstruction": "rec"}[_slot]
    set_case(f"{_p}-source-5", _slot, RESULT, "source = 5", "source", 5)
    set_case(f"{_p}-source-str", _slot, RESULT, "source = 'x'", "source", "x")
    set_case(f"{_p}-source-sha-int", _slot, RESULT, "source.sha256 = 5", "source.sha256", 5)
    set_case(f"{_p}-wall-time-slow", _slot, RESULT, "wall_time = 'slow'", "wall_time", "slow")
    set_case(f"{_p}-method-int", _slot, RESULT, "method = 5", "method", 5)
    set_case(f"{_p}-options-list", _slot, RESULT, "options = []", "options", [])
    set_case(f"{_p}-diagnostics-5", _slot, RESULT, "diagnostics = 5", "diagnostics", 5)
    raw_meta_case(f"{_p}-meta-deep", _slot, HEADER, f"gitool.meta nested {DEEP} deep", deep_json(),
                  inspect_ok=False)
    bytes_case(f"{_p}-truncated", _slot, HEADER, "file cut inside the data", lambda b: b[:-7])
    bytes_case(f"{_p}-prefix-beyond", _slot, HEADER, "header length larger than the file",
               lambda b: struct.pack("<Q", len(b) + 10) + b[8:])
    header_case(f"{_p}-duplicate-names", _slot, DTYPE, "a tensor name twice in the header", _dup)


def _tensor(name: str, make: Callable[[Any], Any]):
    def edit(tensors, metadata):
        tensors[name] = make(tensors[name])

    return edit


def _set_value(value):
    def make(t):
        t = t.clone()
        t.view(-1)[0] = value
        return t

    return make


RVALUES = "result tensors"
tensor_case("lab-labels-wrong-K", "labels", RVALUES, "labels 1 x 4 for K = 5", _tensor("labels", lambda t: t[:, :4]))
tensor_case("lab-labels-2-rows", "labels", RVALUES, "labels of 2 samples for a B = 1 update",
            _tensor("labels", lambda t: t.repeat(2, 1)))
tensor_case("lab-labels-3d", "labels", RVALUES, "labels 1 x 1 x 5", _tensor("labels", lambda t: t[None]))
tensor_case("lab-labels-nan", "labels", RVALUES, "a NaN label", _tensor("labels", _set_value(float("nan"))))
tensor_case("lab-labels-float16", "labels", DTYPE, "labels in float16", _tensor("labels", lambda t: t.half()))
tensor_case("lab-labels-int8", "labels", DTYPE, "labels in int8", _tensor("labels", lambda t: t.to(__import__("torch").int8)))
tensor_case("lab-labels-negative", "labels", RVALUES, "a soft label with a negative entry",
            _tensor("labels", _set_value(-3.0)))
tensor_case("lab-counts-negative", "labels", RVALUES, "negative counts", _tensor("counts", _set_value(-7)))
tensor_case("lab-counts-float16", "labels", DTYPE, "counts in float16", _tensor("counts", lambda t: t.half()))
tensor_case("lab-counts-wrong-K", "labels", RVALUES, "counts of length 3", _tensor("counts", lambda t: t[:3]))


def _with_softmax(make: Callable[[Any], Any], drop_labels: bool = False):
    """A per-sample labels file's softmax tensor (issue 15), made from the labels and edited."""
    def edit(tensors, metadata):
        tensors["softmax"] = make(tensors["labels"].clone())
        if drop_labels:
            del tensors["labels"]

    return edit


tensor_case("lab-softmax-wrong-shape", "labels", RVALUES, "softmax 1 x 4 beside labels 1 x 5",
            _with_softmax(lambda t: t[:, :4]))
tensor_case("lab-softmax-negative", "labels", RVALUES, "a softmax output below 0", _with_softmax(_set_value(-3.0)))
tensor_case("lab-softmax-nan", "labels", RVALUES, "a NaN softmax output", _with_softmax(_set_value(float("nan"))))
tensor_case("lab-softmax-int", "labels", DTYPE, "softmax outputs in int64",
            _with_softmax(lambda t: t.to(__import__("torch").int64)))
tensor_case("lab-softmax-alone", "labels", RVALUES, "softmax outputs without labels (counts only)",
            _with_softmax(lambda t: t, drop_labels=True))
tensor_case("lab-no-tensors", "labels", RVALUES, "neither labels nor counts",
            lambda t, m: (t.clear(), t.__setitem__("other", __import__("torch").zeros(1))))
tensor_case("lab-extra-tensor", "labels", RVALUES, "an extra tensor", _extra("extra.x"))
tensor_case("feat-wrong-d", "features", RVALUES, "features 1 x 7 for d = 8", _tensor("features", lambda t: t[:, :7]))
tensor_case("feat-1d", "features", RVALUES, "features of shape (8,)", _tensor("features", lambda t: t[0]))
tensor_case("feat-nan", "features", RVALUES, "a NaN feature", _tensor("features", _set_value(float("nan"))))
tensor_case("feat-float16", "features", DTYPE, "features in float16", _tensor("features", lambda t: t.half()))
tensor_case("feat-bool", "features", DTYPE, "features in bool", _tensor("features", lambda t: t > 0))
tensor_case("feat-missing", "features", RVALUES, "no 'features' tensor",
            lambda t, m: (t.clear(), t.__setitem__("other", __import__("torch").zeros(1))))
tensor_case("feat-extra-tensor", "features", RVALUES, "an extra tensor", _extra("extra.x"))
tensor_case("rec-wrong-shape", "reconstruction", RVALUES, "images 1 x 3 x 8 x 9",
            _tensor("images", lambda t: __import__("torch").cat([t, t[..., :1]], -1)))
tensor_case("rec-zero-rows", "reconstruction", RVALUES, "images 0 x 3 x 8 x 8", _tensor("images", lambda t: t[:0]))
tensor_case("rec-nan", "reconstruction", RVALUES, "a NaN pixel", _tensor("images", _set_value(float("nan"))))
tensor_case("rec-out-of-range", "reconstruction", RVALUES, "pixels of 5.0 (images are in [0, 1])",
            _tensor("images", lambda t: t * 0 + 5.0))
tensor_case("rec-float16", "reconstruction", DTYPE, "images in float16", _tensor("images", lambda t: t.half()))
tensor_case("rec-uint8", "reconstruction", DTYPE, "images in uint8",
            _tensor("images", lambda t: (t * 255).to(__import__("torch").uint8)))
tensor_case("rec-missing", "reconstruction", RVALUES, "no 'images' tensor",
            lambda t, m: (t.clear(), t.__setitem__("other", __import__("torch").zeros(1))))
for _key, _slot, _what in (("U", "labels", "update"), ("T", "features", "truth"), ("L", "features", "labels"),
                           ("U", "reconstruction", "update")):
    # inspect shows a valid file of another kind, and score takes any result kind: no garbage for them
    file_case(f"kind-{_what}-as-{_slot}", _slot, KIND, f"a {_what} file given as {_slot}", _copy_of(_key),
              f".{_slot}.safetensors", skip=("inspect",) + (("score",) if _key == "L" else ()))

# --------------------------------------------------------------------------- truth

TRUTH = "truth files"
tensor_case("truth-targets-99", "truth", TRUTH, "targets out of range (class 99)", _tensor("targets", lambda t: t * 0 + 99))
tensor_case("truth-targets-neg", "truth", TRUTH, "targets -1", _tensor("targets", lambda t: t * 0 - 1))
tensor_case("truth-targets-float", "truth", DTYPE, "targets in float64", _tensor("targets", lambda t: t.double()))
tensor_case("truth-missing-inputs", "truth", TRUTH, "no 'inputs' tensor", lambda t, m: t.pop("inputs"))
tensor_case("truth-rows-mismatch", "truth", TRUTH, "labels of 2 rows, images of 1",
            _tensor("labels", lambda t: t.repeat(2, 1)))
tensor_case("truth-images-nan", "truth", TRUTH, "a NaN pixel", _tensor("images", _set_value(float("nan"))))
tensor_case("truth-images-float16", "truth", DTYPE, "images in float16", _tensor("images", lambda t: t.half()))
tensor_case("truth-images-wrong-shape", "truth", TRUTH, "images 1 x 3 x 8 x 9",
            _tensor("images", lambda t: __import__("torch").cat([t, t[..., :1]], -1)))
tensor_case("truth-labels-wrong-K", "truth", TRUTH, "labels 1 x 4", _tensor("labels", lambda t: t[:, :4]))
tensor_case("truth-counts-wrong-K", "truth", TRUTH, "counts of length 3", _tensor("counts", lambda t: t[:3]))
tensor_case("truth-features-wrong-d", "truth", TRUTH, "features 1 x 7", _tensor("features", lambda t: t[:, :7]))
tensor_case("truth-extra-tensor", "truth", TRUTH, "an extra tensor", _extra("extra.x"))
set_case("truth-meta-update-5", "truth", TRUTH, "meta.update = 5", "update", 5)
set_case("truth-meta-indices-str", "truth", TRUTH, "meta.indices = 'x'", "indices", "x")
raw_meta_case("truth-meta-deep", "truth", HEADER, f"gitool.meta nested {DEEP} deep", deep_json(), inspect_ok=False)
bytes_case("truth-truncated", "truth", HEADER, "file cut inside the data", lambda b: b[:-5])
file_case("kind-update-as-truth", "truth", KIND, "an update file given as the truth", _copy_of("U"),
          ".truth.safetensors", skip=("inspect",))

# --------------------------------------------------------------------------- checkpoints


class _Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __reduce__(self):
        import os

        return (os.system, (f"touch {MARKER}",))


class _Thing:  # a plain custom class: unpickling needs its global
    pass


def _pickle_reduce(path: Path, base: dict[str, Path]) -> None:
    import torch

    state = torch.load(base["GPT"], weights_only=True)
    state["payload"] = _Payload()
    torch.save(state, path)


def _pickle_class(path: Path, base: dict[str, Path]) -> None:
    import torch

    state = torch.load(base["GPT"], weights_only=True)
    state["thing"] = _Thing()
    torch.save(state, path)


CKPT = "checkpoints"
meta_case("ck-model-os-system", "checkpoint", CODE, "a checkpoint naming os:system",
          lambda m: m.__setitem__("model", {**m["model"], "name": "os:system",
                                            "options": {"command": f"touch {MARKER}"}}))
set_case("ck-model-evilmod", "checkpoint", CODE, "a checkpoint naming evilmod:make", "model.name", "evilmod:make")
set_case("ck-K-1e8", "checkpoint", SPEC, "a checkpoint whose model claims K = 1e8", "model.num_classes",
         100_000_000, mode="child", bomb=True)
set_case("ck-model-5", "checkpoint", SPEC, "model = 5", "model", 5)
meta_case("ck-missing-model", "checkpoint", CKPT, "no model section", lambda m: m.pop("model"))
set_case("ck-normalize-std-0", "checkpoint", CKPT, "normalize.std = [0]", "normalize",
         {"mean": [0.0], "std": [0.0]})
set_case("ck-normalize-str", "checkpoint", CKPT, "normalize = 'x'", "normalize", "x")
raw_meta_case("ck-meta-deep", "checkpoint", HEADER, f"gitool.meta nested {DEEP} deep", deep_json(),
              inspect_ok=False)
tensor_case("ck-nan", "checkpoint", CKPT, "a NaN weight", lambda t, m: _fill("", float("nan"))(t, m))
tensor_case("ck-float16", "checkpoint", DTYPE, "weights in float16", lambda t, m: _cast("", "float16")(t, m))
tensor_case("ck-extra-tensor", "checkpoint", CKPT, "an extra tensor", _extra("extra.x"))
tensor_case("ck-wrong-shape", "checkpoint", CKPT, "a weight of the wrong shape",
            lambda t, m: t.__setitem__(next(iter(t)), t[next(iter(t))][:1].clone()))
bytes_case("ck-truncated", "checkpoint", HEADER, "file cut inside the data", lambda b: b[:-9])
file_case("ck-pt-pickle-reduce", "checkpoint", CODE, "a .pt whose unpickling runs touch MARKER", _pickle_reduce,
          ".pt", inspect_ok=False)
file_case("ck-pt-pickle-class", "checkpoint", CKPT, "a .pt holding a pickled custom object", _pickle_class, ".pt",
          inspect_ok=False)
file_case("ck-pt-truncated", "checkpoint", CKPT, "a truncated .pt",
          lambda p, b: p.write_bytes(b["GPT"].read_bytes()[:300]), ".pt", inspect_ok=False)

# --------------------------------------------------------------------------- weights for import


def _npz_arrays(base: dict[str, Path], key: str = "NG"):
    import numpy as np

    with np.load(base[key]) as archive:
        return [archive[f"arr_{i}"] for i in range(len(archive.files))]


def _write_npz(path: Path, arrays, named: bool = False, allow_pickle: bool = True) -> None:
    import numpy as np

    with open(path, "wb") as handle:
        if named:
            np.savez(handle, **arrays)
        else:
            np.savez(handle, *arrays)


def _npz(edit: Callable[[list], Any]):
    def make(path: Path, base: dict[str, Path]) -> None:
        arrays = _npz_arrays(base)
        result = edit(arrays)
        _write_npz(path, arrays if result is None else result)

    return make


def _zip_bomb(path: Path, base: dict[str, Path]) -> None:
    """arr_0 decompresses to 1 GiB of float32 zeros: about 1 MB on disk."""
    import numpy as np
    import zlib

    count = (1 << 30) // 4
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (count,)})
    arrays = _npz_arrays(base)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            chunk = bytes(1 << 22)
            for _ in range((count * 4) // len(chunk)):
                member.write(chunk)
        for i, array in enumerate(arrays[1:], start=1):
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(f"arr_{i}.npy", buffer.getvalue())
    del zlib


def _npy_claims_huge(path: Path, base: dict[str, Path]) -> None:
    """arr_0's .npy header claims 2**28 float64 (2 GiB); the member holds 64 bytes."""
    import numpy as np

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (1 << 28,)})
    arrays = _npz_arrays(base)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("arr_0.npy", header.getvalue() + bytes(64))
        for i, array in enumerate(arrays[1:], start=1):
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(f"arr_{i}.npy", buffer.getvalue())


def _npz_object(path: Path, base: dict[str, Path]) -> None:
    import numpy as np

    arrays = _npz_arrays(base)
    arrays[0] = np.array([_Payload()], dtype=object)
    np.savez(path, *arrays)


def _npz_text_member(path: Path, base: dict[str, Path]) -> None:
    import numpy as np

    arrays = _npz_arrays(base)
    with zipfile.ZipFile(path, "w") as archive:
        for i, array in enumerate(arrays):
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(f"arr_{i}.npy", buffer.getvalue() if i else b"not an npy array")


WEIGHTS = "import: weights files"
file_case("npz-zip-bomb", "weights", "memory", "a .npz member that inflates to 1 GiB", _zip_bomb, ".npz",
          mode="child", bomb=True)
file_case("npz-npy-claims-huge", "weights", "memory", "a .npy header claiming 2 GiB in a tiny member",
          _npy_claims_huge, ".npz", mode="child", bomb=True)
file_case("npz-object-pickle", "weights", CODE, "an object array whose unpickling runs touch MARKER", _npz_object,
          ".npz")
file_case("npz-text-member", "weights", WEIGHTS, "a member that is not .npy", _npz_text_member, ".npz")
file_case("npz-not-zip", "weights", WEIGHTS, "random bytes named .npz",
          lambda p, b: p.write_bytes(bytes((i * 31 + 7) % 256 for i in range(2048))), ".npz")
file_case("npz-pickle-file", "weights", CODE, "a pickle named .npz that runs touch MARKER",
          lambda p, b: p.write_bytes(pickle.dumps(_Payload())), ".npz")
file_case("npz-single-npy", "weights", WEIGHTS, "one .npy file named .npz",
          lambda p, b: __import__("numpy").save(open(p, "wb"), _npz_arrays(b)[0]), ".npz")
file_case("npz-truncated", "weights", WEIGHTS, "a .npz cut in half",
          lambda p, b: p.write_bytes(b["NG"].read_bytes()[: b["NG"].stat().st_size // 2]), ".npz")
file_case("npz-empty", "weights", WEIGHTS, "an archive without members", _npz(lambda a: []), ".npz")
file_case("npz-float16", "weights", DTYPE, "arrays in float16", _npz(lambda a: [x.astype("float16") for x in a]),
          ".npz")
file_case("npz-complex", "weights", DTYPE, "arrays in complex128", _npz(lambda a: [x.astype("complex128") for x in a]),
          ".npz")
file_case("npz-strings", "weights", DTYPE, "an array of strings",
          _npz(lambda a: [__import__("numpy").array(["x"] * 3)] + a[1:]), ".npz")
file_case("npz-bool", "weights", DTYPE, "arrays in bool", _npz(lambda a: [x > 0 for x in a]), ".npz")
file_case("npz-wrong-count", "weights", WEIGHTS, "one array too many",
          _npz(lambda a: a + [a[0]]), ".npz")
file_case("npz-gap", "weights", WEIGHTS, "arr_0, arr_2 (a gap)",
          lambda p, b: _write_npz(p, {"arr_0": _npz_arrays(b)[0], "arr_2": _npz_arrays(b)[1]}, named=True), ".npz")
file_case("npz-wrong-shape", "weights", WEIGHTS, "an array of the wrong shape",
          _npz(lambda a: [a[0][:1]] + a[1:]), ".npz")
file_case("npz-nan", "weights", VALUES, "a NaN", _npz(lambda a: [a[0] * float("nan")] + a[1:]), ".npz")
file_case("npz-unknown-names", "weights", WEIGHTS, "named arrays the model lacks",
          lambda p, b: _write_npz(p, {f"evil{i}": x for i, x in enumerate(_npz_arrays(b))}, named=True), ".npz")


def _pt(edit: Callable[[dict], Any], key: str = "GPT"):
    """The base torch file ``key`` (the gradient state dict), edited."""

    def make(path: Path, base: dict[str, Path]) -> None:
        import torch

        state = torch.load(base[key], weights_only=True)
        result = edit(state)
        torch.save(state if result is None else result, path)

    return make


file_case("pt-pickle-reduce", "weights", CODE, "a .pt whose unpickling runs touch MARKER", _pickle_reduce, ".pt")
file_case("pt-pickle-class", "weights", WEIGHTS, "a .pt holding a pickled custom object", _pickle_class, ".pt")
file_case("pt-raw-pickle", "weights", CODE, "a plain pickle (no torch zip) named .pt that runs touch MARKER",
          lambda p, b: p.write_bytes(pickle.dumps({"a": _Payload()})), ".pt")
file_case("pt-truncated", "weights", WEIGHTS, "a truncated .pt",
          lambda p, b: p.write_bytes(b["GPT"].read_bytes()[:500]), ".pt")
file_case("pt-non-tensors", "weights", WEIGHTS, "a dict of numbers", _pt(lambda s: {k: 1 for k in s}), ".pt")
file_case("pt-list", "weights", WEIGHTS, "a list of tensors", _pt(lambda s: list(s.values())), ".pt")
file_case("pt-float16", "weights", DTYPE, "tensors in float16", _pt(lambda s: {k: v.half() for k, v in s.items()}),
          ".pt")
file_case("pt-bfloat16", "weights", DTYPE, "tensors in bfloat16",
          _pt(lambda s: {k: v.bfloat16() for k, v in s.items()}), ".pt")
file_case("pt-nan", "weights", VALUES, "a NaN", _pt(lambda s: {k: v * float("nan") for k, v in s.items()}), ".pt")
file_case("pt-extra", "weights", WEIGHTS, "an extra entry", _pt(lambda s: {**s, "evil.weight": next(iter(s.values()))}),
          ".pt")
file_case("pt-wrong-shape", "weights", WEIGHTS, "an entry of the wrong shape",
          _pt(lambda s: {**s, next(iter(s)): next(iter(s.values()))[:1]}), ".pt")
file_case("st-plain-float16", "weights", DTYPE, "a plain safetensors state dict in float16",
          lambda p, b: p.write_bytes(save_tensors({k: v.half() for k, v in __import__("torch").load(
              b["GPT"], weights_only=True).items()}, {})), ".safetensors")
file_case("st-plain-duplicate", "weights", DTYPE, "a plain safetensors state dict with a duplicate name",
          lambda p, b: p.write_bytes(_dup_plain(b)), ".safetensors")
file_case("st-plain-truncated", "weights", WEIGHTS, "a plain safetensors state dict cut short",
          lambda p, b: p.write_bytes(save_tensors(__import__("torch").load(b["GPT"], weights_only=True), {})[:-11]),
          ".safetensors")
file_case("weights-unknown-suffix", "weights", WEIGHTS, "weights named .txt",
          lambda p, b: p.write_bytes(b["GPT"].read_bytes()), ".txt")


def _dup_plain(base: dict[str, Path]) -> bytes:
    import torch

    header, data = read_st_bytes(save_tensors(torch.load(base["GPT"], weights_only=True), {}))
    text, _, _ = _dup(header, b"")
    return st_bytes(text, data)


# --------------------------------------------------------------------------- private batches for gitool truth

PRIVATE = "truth: private-batch files"


def _private(edit: Callable[[dict], Any]):
    """The base private batch ({"images", "labels"} of the capture), edited."""
    return _pt(edit, "PPT")


def _private_payload(path: Path, base: dict[str, Path]) -> None:
    import torch

    batch = torch.load(base["PPT"], weights_only=True)
    batch["labels"] = _Payload()
    torch.save(batch, path)


def _private_npz(edit: Callable[[dict], Any]):
    def make(path: Path, base: dict[str, Path]) -> None:
        import numpy as np
        import torch

        batch = {k: v.numpy() for k, v in torch.load(base["PPT"], weights_only=True).items()}
        result = edit(batch)
        np.savez(path, **(batch if result is None else result))

    return make


def _private_bomb(path: Path, base: dict[str, Path]) -> None:
    """'images' decompresses to 1 GiB of float32 zeros (about 1 MB on disk)."""
    import numpy as np

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": ((1 << 30) // 4,)})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("images.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            chunk = bytes(1 << 22)
            for _ in range((1 << 30) // len(chunk)):
                member.write(chunk)


def _private_huge_pt(path: Path, base: dict[str, Path]) -> None:
    """A .pt whose images take 4 MiB, four times what one 3x8x8 sample could need:
    refused from the zip directory, unread."""
    import torch

    torch.save({"images": torch.zeros(1 << 20), "labels": torch.zeros(1)}, path)


file_case("priv-pickle-reduce", "private", CODE, "a private batch whose unpickling runs touch MARKER",
          _private_payload, ".pt")
file_case("priv-raw-pickle", "private", CODE, "a plain pickle named .pt that runs touch MARKER",
          lambda p, b: p.write_bytes(pickle.dumps({"images": _Payload()})), ".pt")
file_case("priv-npz-object", "private", CODE, "an object array in .npz whose unpickling runs touch MARKER",
          _private_npz(lambda a: {**a, "labels": __import__("numpy").array([_Payload()], dtype=object)}), ".npz")
file_case("priv-npz-bomb", "private", "memory", "an 'images' member that inflates to 1 GiB", _private_bomb, ".npz",
          mode="child", bomb=True)
file_case("priv-pt-huge", "private", "memory", "a .pt holding 4 MiB of images for one 3x8x8 sample",
          _private_huge_pt, ".pt")
file_case("priv-truncated", "private", PRIVATE, "a .pt cut short",
          lambda p, b: p.write_bytes(b["PPT"].read_bytes()[:300]), ".pt")
file_case("priv-list", "private", PRIVATE, "a list of tensors", _private(lambda d: list(d.values())), ".pt")
file_case("priv-numbers", "private", PRIVATE, "numbers, not tensors", _private(lambda d: {k: 1 for k in d}), ".pt")
file_case("priv-extra", "private", PRIVATE, "an entry besides images and labels",
          _private(lambda d: {**d, "secret": d["images"]}), ".pt")
file_case("priv-no-labels", "private", PRIVATE, "images without labels", _private(lambda d: {"images": d["images"]}),
          ".pt")
file_case("priv-images-and-inputs", "private", PRIVATE, "both images and inputs",
          _private(lambda d: {**d, "inputs": d["images"]}), ".pt")
file_case("priv-images-range", "private", PRIVATE, "images in [0, 3]",
          _private(lambda d: {**d, "images": d["images"] * 3 + 0.5}), ".pt")
file_case("priv-images-nan", "private", VALUES, "a NaN in the images",
          _private(lambda d: {**d, "images": d["images"] * float("nan")}), ".pt")
file_case("priv-images-int", "private", DTYPE, "images as integers",
          _private(lambda d: {**d, "images": (d["images"] * 255).long()}), ".pt")
file_case("priv-images-shape", "private", PRIVATE, "images of another size",
          _private(lambda d: {**d, "images": d["images"][..., :4, :4]}), ".pt")
file_case("priv-two-samples", "private", PRIVATE, "two samples for an update of one",
          _private(lambda d: {k: __import__("torch").cat([v, v]) for k, v in d.items()}), ".pt")
file_case("priv-labels-class-99", "private", PRIVATE, "a class index beyond K",
          _private(lambda d: {**d, "labels": __import__("torch").tensor([99])}), ".pt")
file_case("priv-labels-negative", "private", PRIVATE, "a negative class index",
          _private(lambda d: {**d, "labels": __import__("torch").tensor([-1])}), ".pt")
file_case("priv-labels-sum-2", "private", PRIVATE, "soft labels summing to 2",
          _private(lambda d: {**d, "labels": d["labels"] * 2}), ".pt")
file_case("priv-labels-nan", "private", VALUES, "soft labels with a NaN",
          _private(lambda d: {**d, "labels": d["labels"] * float("nan")}), ".pt")
file_case("priv-labels-bool", "private", DTYPE, "labels as booleans",
          _private(lambda d: {**d, "labels": __import__("torch").tensor([True])}), ".pt")
file_case("priv-npz-strings", "private", DTYPE, "labels as strings in .npz",
          _private_npz(lambda a: {**a, "labels": __import__("numpy").array(["cat"])}), ".npz")
file_case("priv-st-extra", "private", PRIVATE, "a safetensors batch with an extra tensor",
          lambda p, b: p.write_bytes(save_tensors({**__import__("torch").load(b["PPT"], weights_only=True),
                                                   "secret": __import__("torch").zeros(3)}, {})), ".safetensors")
file_case("priv-unknown-suffix", "private", PRIVATE, "a batch named .txt (its bytes cut short too)",
          lambda p, b: p.write_bytes(b["PPT"].read_bytes()[:-1]), ".txt")


# --------------------------------------------------------------------------- facts files

FACTSF = "import: facts files"


def _facts_json(edit: Callable[[dict], Any]):
    def make(path: Path, base: dict[str, Path]) -> None:
        document = json.loads(base["NFJ"].read_text())
        edit(document)
        path.write_text(json.dumps(document))

    return make


def _facts_set(dotted: str, value: Any):
    return _facts_json(lambda d: _set(d, dotted, value))


for _id, _field, _value in (
    ("batch-0", "training.batch_size", 0), ("batch-neg", "training.batch_size", -3),
    ("batch-1e12-float", "training.batch_size", 1e12), ("batch-1e12", "training.batch_size", 10 ** 12),
    ("steps-0", "training.steps", 0), ("lr-neg", "training.lr", -1.0), ("lr-nan", "training.lr", float("nan")),
    ("lr-str", "training.lr", "x"), ("optimizer-unknown", "training.optimizer", "adamw"),
    ("mode-unknown", "training.model_mode", "test"), ("dtype-float16", "training.dtype", "float16"),
    ("momentum-nan", "training.momentum", float("nan")), ("family-unknown", "loss.family", "evil"),
    ("smoothing-5", "loss.label_smoothing", 5.0), ("mixup-coef-5", "loss.mixup_coef", 5.0),
    ("std-0", "input.std", [0.0]), ("mean-inf", "input.mean", [float("inf")]), ("prune-2", "defence.prune", 2.0),
    ("dp-noise-neg", "defence.dp_noise", -1.0), ("update-kind-x", "update_kind", "x"),
    ("unknown-section", "evil", {}), ("training-list", "training", []),
    ("model-K-0", "model.num_classes", 0),
):
    file_case(f"facts-json-{_id}", "facts", FACTSF, f"{_field} = {_value!r}", _facts_set(_field, _value), ".json")
file_case("facts-json-model-os-system", "facts", CODE, "a facts file naming os:system",
          _facts_json(lambda d: d.__setitem__("model", {**d["model"], "name": "os:system",
                                                        "options": {"command": f"touch {MARKER}"}})), ".json")
file_case("facts-json-model-evilmod", "facts", CODE, "a facts file naming evilmod:make",
          _facts_set("model.name", "evilmod:make"), ".json")
file_case("facts-json-K-1e8", "facts", SPEC, "a facts file whose model claims K = 1e8",
          _facts_set("model.num_classes", 100_000_000), ".json", mode="child", bomb=True)
file_case("facts-json-huge-int", "facts", FACTSF, "batch_size a 5000-digit integer",
          lambda p, b: p.write_text(re.sub(r'"batch_size":\s*1\b', '"batch_size": ' + "9" * 5000,
                                           b["NFJ"].read_text())),
          ".json")
file_case("facts-toml-huge-int", "facts", FACTSF, "TOML batch_size a 5000-digit integer",
          lambda p, b: _toml("batch_size = 1", "batch_size = " + "9" * 5000)(p, b), ".toml")
file_case("facts-json-invalid", "facts", FACTSF, "not JSON", lambda p, b: p.write_text("{\"training\": "), ".json")
file_case("facts-json-list", "facts", FACTSF, "a JSON list", lambda p, b: p.write_text("[]"), ".json")
file_case("facts-json-deep", "facts", FACTSF, f"JSON nested {DEEP} deep",
          lambda p, b: p.write_text("{\"training\": " + deep_json() + "}"), ".json")
file_case("facts-json-binary", "facts", FACTSF, "binary garbage named .json",
          lambda p, b: p.write_bytes(bytes(range(256)) * 8), ".json")
file_case("facts-yaml", "facts", FACTSF, "a facts file named .yaml", lambda p, b: p.write_text("training: {}\n"),
          ".yaml")

TOML_BASE = """\
update_kind = "gradient"

[model]
name = "fcn4"
num_classes = 5
input_shape = [3, 8, 8]
last_bias = false
options = { widths = "32,16,8", hidden_bias = "false" }

[training]
batch_size = 1
lr = 0.01
optimizer = "sgd"

[loss]
family = "smoothing"
label_smoothing = 0.2
"""


def _toml(old: str, new: str):
    def make(path: Path, base: dict[str, Path]) -> None:
        if old not in TOML_BASE:
            raise AssertionError(f"{old!r} not in the TOML base")
        path.write_text(TOML_BASE.replace(old, new))

    return make


for _id, _old, _new in (
    ("batch-0", "batch_size = 1", "batch_size = 0"), ("lr-nan", "lr = 0.01", "lr = nan"),
    ("lr-inf", "lr = 0.01", "lr = inf"), ("lr-neg", "lr = 0.01", "lr = -1.0"),
    ("optimizer-unknown", "optimizer = \"sgd\"", "optimizer = \"adamw\""),
    ("smoothing-5", "label_smoothing = 0.2", "label_smoothing = 5.0"),
    ("family-evil", "family = \"smoothing\"", "family = \"evil\""),
    ("batch-str", "batch_size = 1", "batch_size = \"1\""),
    ("lr-datetime", "lr = 0.01", "lr = 1979-05-27T07:32:00Z"),
):
    file_case(f"facts-toml-{_id}", "facts", FACTSF, f"TOML {_new}", _toml(_old, _new), ".toml")
file_case("facts-toml-os-system", "facts", CODE, "a TOML facts file naming os:system",
          _toml("name = \"fcn4\"", "name = \"os:system\""), ".toml")
file_case("facts-toml-evilmod", "facts", CODE, "a TOML facts file naming evilmod:make",
          _toml("name = \"fcn4\"", "name = \"evilmod:make\""), ".toml")
file_case("facts-toml-invalid", "facts", FACTSF, "not TOML", lambda p, b: p.write_text("[training\nbatch_size = "),
          ".toml")
file_case("facts-toml-deep", "facts", FACTSF, f"TOML arrays nested {DEEP} deep",
          lambda p, b: p.write_text("[training]\nbatch_size = " + deep_json() + "\n"), ".toml")

# --------------------------------------------------------------------------- option values

RECON = ("reconstruct", "{U}", "--labels", "{L}", "--features", "{F}", "-o", "{O}/r.reconstruction.safetensors")
OPT = (*RECON, "--method", "optimize")
FC = (*RECON, "--method", "fc")
CAPTURE = ("capture", *MODEL, "-o", "{O}/k.update.safetensors")
TRAIN = ("train", *MODEL, "--epochs", "1", "--batch-size", "16", "-o", "{O}/t.checkpoint.safetensors")
IMPORT = ("import", "--before", "{NB}", "--grad", "{NG}", "--facts", "{NFJ}", "-o", "{O}/i.update.safetensors")
LABELS = ("labels", "{U}", "-o", "{O}/o.labels.safetensors")
HUGE_SEED = str(2 ** 70)

for _opts in (("--iterations", "0"), ("--iterations", "-1"), ("--restarts", "0"), ("--restarts", "-2"),
              ("--lr", "nan"), ("--lr", "-1"), ("--lr", "0"), ("--lr", "inf"), ("--tv", "nan"), ("--tv", "-1"),
              ("--feature-weight", "nan"), ("--feature-weight", "-1"), ("--seed", "-1"), ("--seed", HUGE_SEED),
              ("--save-every", "-1"), ("--terms", "evil"), ("--distance", "evil"), ("--optimizer", "evil")):
    option_case(f"opt-reconstruct-optimize{'='.join(_opts).replace('--', '-')[:40]}",
                f"reconstruct --method optimize {' '.join(_opts)}",
                (*OPT, *_opts, *(("--iterations", "2") if _opts[0] != "--iterations" else ())))
for _opts in (("--tol", "nan"), ("--tol", "-1"), ("--tol", "inf"), ("--condition-limit", "nan"),
              ("--condition-limit", "-1"), ("--max-iter", "0"), ("--max-iter", "-1"), ("--dense-limit", "-1"),
              ("--solver", "evil"), ("--constraints", "evil")):
    option_case(f"opt-reconstruct-fc{'='.join(_opts).replace('--', '-')}", f"reconstruct --method fc {' '.join(_opts)}",
                (*FC, *_opts))
for _opts in (("--seed", "-1"), ("--seed", HUGE_SEED), ("--lr", "-1"), ("--lr", "nan"), ("--lr", "inf"),
              ("--lr", "0"), ("--batch-size", "0"), ("--batch-size", "-3"), ("--steps", "0"), ("--steps", "-1"),
              ("--optimizer", "momentum", "--momentum", "nan"), ("--optimizer", "momentum", "--momentum", "-1"),
              ("--weight-decay", "-1"), ("--weight-decay", "nan"), ("--label-smoothing", "5"),
              ("--label-smoothing", "nan"), ("--label-smoothing", "0.5:0.1"), ("--label-smoothing", "-0.1:0.2"),
              ("--mixup", "-1"), ("--mixup", "nan"), ("--mixup-coef", "2"), ("--mixup-coef", "nan"),
              ("--prune", "2"), ("--prune", "nan"), ("--prune", "-0.5"), ("--dp-clip", "-1"), ("--dp-clip", "nan"),
              ("--dp-clip", "1", "--dp-noise", "-1"), ("--dp-clip", "1", "--dp-noise", "nan"),
              ("--dirichlet", "0"), ("--dirichlet", "nan"), ("--dtype", "float16"), ("--dtype", "evil"),
              ("--mode", "test"), ("--optimizer", "adamw"), ("--optimizer", "fedprox", "--prox-mu", "-1"),
              ("--optimizer", "fedprox", "--prox-mu", "nan"), ("-K", "1"), ("-K", "0"), ("--image-size", "0"),
              ("--image-size", "3x0x8"), ("--normalize", "0/0"), ("--normalize", "nan/1"), ("--indices", "-1"),
              ("--classes", "99"), ("--classes", "-1"), ("--send", "evil"), ("--activation", "evil"),
              ("--data", "evil"), ("--init", "no-such-file")):
    option_case(f"opt-capture{'='.join(_opts).replace('--', '-')}", f"capture {' '.join(_opts)}", (*CAPTURE, *_opts))
option_case("opt-capture-repeat-0", "capture --repeat 0", ("capture", *MODEL, "--repeat", "0", "--out-dir", "{O}/d"))
option_case("opt-capture-repeat-neg", "capture --repeat -1",
            ("capture", *MODEL, "--repeat", "-1", "--out-dir", "{O}/d"))
for _opts in (("--seed", "-1"), ("--seed", HUGE_SEED), ("--family", "evil"), ("--method", "evil"),
              ("--search", "evil"), ("--aux-per-class", "0"), ("--aux-per-class", "-1")):
    option_case(f"opt-labels{'='.join(_opts).replace('--', '-')}", f"labels {' '.join(_opts)}", (*LABELS, *_opts))
for _opts in (("--epochs", "0"), ("--epochs", "-1"), ("--lr", "nan"), ("--lr", "-1"), ("--lr", "0"),
              ("--batch-size", "0"), ("--batch-size", "-1"), ("--seed", "-1"), ("--seed", HUGE_SEED),
              ("--normalize", "0/0")):
    option_case(f"opt-train{'='.join(_opts).replace('--', '-')}", f"train {' '.join(_opts)}", (*TRAIN, *_opts))
for _opts in (("--batch-size", "0"), ("--batch-size", "-3"), ("--lr", "nan"), ("--lr", "-1"), ("--lr", "inf"),
              ("--steps", "0"), ("--prune", "2"), ("--prune", "nan"), ("--label-smoothing", "5"),
              ("--optimizer", "momentum", "--momentum", "nan"), ("--optimizer", "adamw"), ("--mode", "test"),
              ("--dp-clip", "-1"), ("--dp-noise", "nan"), ("--weight-decay", "-1"), ("--mixup-coef", "2"),
              ("--normalize", "0/0"), ("--image-size", "0")):
    option_case(f"opt-import{'='.join(_opts).replace('--', '-')}", f"import {' '.join(_opts)}", (*IMPORT, *_opts))
option_case("opt-export-format-evil", "export --format evil", ("export", "{U}", "-o", "{O}/e.pt", "--format", "evil"))

# --------------------------------------------------------------------------- outputs that are inputs

OVERLAP = "output is an input"


def _links(folder: Path, base: dict[str, str]) -> dict[str, str]:
    """A symlink and a hard link to each base file, in the run folder."""
    import os

    extra = {}
    for key in ("U", "L", "F", "T", "C", "NB", "NG", "NFJ", "BPT", "GPT"):
        target = Path(base[key])
        sym = folder / f"sym-{target.name}"
        hard = folder / f"hard-{target.name}"
        os.symlink(target.name, sym)
        os.link(target, hard)
        extra[f"{key}_SYM"], extra[f"{key}_HARD"] = str(sym), str(hard)
    return extra


def _alias(folder: Path, base: dict[str, str]) -> dict[str, str]:
    """The update under names that outputs derive: u.labels.safetensors (the labels name
    it derives itself), x.facts.json (the facts name export derives for -o x.pt)."""
    extra = _links(folder, base)
    for name, key in (("u.labels.safetensors", "U_AS_LABELS"), ("x.facts.json", "U_AS_FACTS"),
                      ("0000.truth.safetensors", "C_AS_TRUTH")):
        source = Path(base["C" if key == "C_AS_TRUTH" else "U"])
        (folder / name).write_bytes(source.read_bytes())
        extra[key] = str(folder / name)
    (folder / "d").mkdir()
    (folder / "d" / "0000.update.safetensors").write_bytes(Path(base["C"]).read_bytes())
    extra["C_IN_D"] = str(folder / "d" / "0000.update.safetensors")
    return extra


def overlap_case(id: str, why: str, argv: tuple[str, ...]) -> Case:
    return add(Case(id, OVERLAP, why, argv=argv, prepare=_alias))


overlap_case("out-labels-o-update", "labels U -o U", ("labels", "{U}", "-o", "{U}"))
overlap_case("out-labels-plot-update", "labels U -o x --plot U",
             ("labels", "{U}", "-o", "{O}/x.labels.safetensors", "--plot", "{U}"))
overlap_case("out-labels-o-symlink", "labels U -o (symlink to U)", ("labels", "{U}", "-o", "{U_SYM}"))
overlap_case("out-labels-o-hardlink", "labels U -o (hard link to U)", ("labels", "{U}", "-o", "{U_HARD}"))
overlap_case("out-labels-plot-hardlink", "labels U -o x --plot (hard link to U)",
             ("labels", "{U}", "-o", "{O}/x.labels.safetensors", "--plot", "{U_HARD}"))
overlap_case("out-labels-derived-name", "labels u.labels.safetensors --out-dir . (derives its own name)",
             ("labels", "{U_AS_LABELS}", "--out-dir", "{RUN}"))
overlap_case("out-labels-o-equals-plot", "labels U -o x --plot x", ("labels", "{U}", "-o", "{O}/x", "--plot", "{O}/x"))
overlap_case("out-features-o-labels", "features U --labels L -o L", ("features", "{U}", "--labels", "{L}", "-o", "{L}"))
overlap_case("out-features-o-update", "features U --labels L -o U", ("features", "{U}", "--labels", "{L}", "-o", "{U}"))
overlap_case("out-features-o-symlink", "features U --labels L -o (symlink to L)",
             ("features", "{U}", "--labels", "{L}", "-o", "{L_SYM}"))
overlap_case("out-features-o-hardlink", "features U --labels L -o (hard link to L)",
             ("features", "{U}", "--labels", "{L}", "-o", "{L_HARD}"))
for _key, _name in (("U", "update"), ("L", "labels"), ("F", "features"), ("U_HARD", "update hard link"),
                    ("F_SYM", "features symlink")):
    overlap_case(f"out-reconstruct-o-{_name.replace(' ', '-')}", f"reconstruct ... -o {_name}",
                 ("reconstruct", "{U}", "--labels", "{L}", "--features", "{F}", "--method", "fc", "-o",
                  "{" + _key + "}"))
for _key, _name in (("U", "update"), ("L", "labels"), ("U_SYM", "update symlink")):
    overlap_case(f"out-reconstruct-png-{_name.replace(' ', '-')}", f"reconstruct ... -o x --png {_name}",
                 ("reconstruct", "{U}", "--labels", "{L}", "--features", "{F}", "--method", "fc", "-o",
                  "{O}/x.reconstruction.safetensors", "--png", "{" + _key + "}"))
overlap_case("out-reconstruct-o-equals-png", "reconstruct ... -o x --png x",
             ("reconstruct", "{U}", "--labels", "{L}", "--features", "{F}", "--method", "fc", "-o", "{O}/x",
              "--png", "{O}/x"))
overlap_case("out-export-o-update", "export U -o U --format pt", ("export", "{U}", "-o", "{U}", "--format", "pt"))
overlap_case("out-export-o-hardlink", "export U -o (hard link to U) --format pt",
             ("export", "{U}", "-o", "{U_HARD}", "--format", "pt"))
overlap_case("out-export-derived-facts", "export x.facts.json -o x.pt (the facts it derives is the input)",
             ("export", "{U_AS_FACTS}", "-o", "{RUN}/x.pt"))
overlap_case("out-truth-o-update", "truth U --private P -o U", ("truth", "{U}", "--private", "{PPT}", "-o", "{U}"))
overlap_case("out-truth-o-private", "truth U --private P -o P", ("truth", "{U}", "--private", "{PPT}", "-o", "{PPT}"))
overlap_case("out-truth-o-symlink", "truth U --private P -o (symlink to U)",
             ("truth", "{U}", "--private", "{PPT}", "-o", "{U_SYM}"))
overlap_case("out-import-o-before", "import --before before.pt --grad grad.pt -o before.pt",
             ("import", *MODEL, "--before", "{BPT}", "--grad", "{GPT}", "-o", "{BPT}"))
overlap_case("out-import-o-grad", "import ... -o grad.pt", ("import", *MODEL, "--before", "{BPT}", "--grad", "{GPT}",
                                                            "-o", "{GPT}"))
overlap_case("out-import-o-facts", "import ... --facts F -o F", ("import", "--before", "{NB}", "--grad", "{NG}",
                                                                 "--facts", "{NFJ}", "-o", "{NFJ}"))
overlap_case("out-import-o-before-symlink", "import ... -o (symlink to before.pt)",
             ("import", *MODEL, "--before", "{BPT}", "--grad", "{GPT}", "-o", "{BPT_SYM}"))
overlap_case("out-import-o-grad-hardlink", "import ... -o (hard link to grad.npz)",
             ("import", "--before", "{NB}", "--grad", "{NG}", "--facts", "{NFJ}", "-o", "{NG_HARD}"))
overlap_case("out-score-png-truth", "score R --truth T --png T", ("score", "{R}", "--truth", "{T}", "--png", "{T}"))
overlap_case("out-score-png-result", "score R --truth T --png R", ("score", "{R}", "--truth", "{T}", "--png", "{R}"))
overlap_case("out-score-png-truth-symlink", "score R --truth T --png (symlink to T)",
             ("score", "{R}", "--truth", "{T}", "--png", "{T_SYM}"))
overlap_case("out-capture-init-o", "capture --init C -o C", ("capture", "--init", "{C}", "-o", "{C}"))
overlap_case("out-capture-init-truth", "capture --init C -o x --truth C",
             ("capture", "--init", "{C}", "-o", "{O}/x.update.safetensors", "--truth", "{C}"))
overlap_case("out-capture-init-out-dir", "capture --init d/0000.update.safetensors --out-dir d",
             ("capture", "--init", "{C_IN_D}", "--out-dir", "{RUN}/d"))
overlap_case("out-train-init-o", "train --init C -o C", ("train", "--init", "{C}", "--epochs", "1", "-o", "{C}"))

# --------------------------------------------------------------------------- special files (a fresh process each)

SPECIAL = "special files"


def _fifo(name: str):
    def prepare(folder: Path, base: dict[str, str]) -> dict[str, str]:
        import os

        path = folder / name
        os.mkfifo(path)
        zero = folder / f"zero-{name}"
        os.symlink("/dev/zero", zero)
        return {"FIFO": str(path), "ZERO": str(zero)}

    return prepare


for _id, _name, _argv in (
    ("inspect", "f.update.safetensors", ("inspect", "{S}")),
    ("labels", "f.update.safetensors", ("labels", "{S}", "-o", "{O}/o.labels.safetensors")),
    ("features-labels", "f.labels.safetensors", ("features", "{U}", "--labels", "{S}", "-o",
                                                 "{O}/o.features.safetensors")),
    ("reconstruct-features", "f.features.safetensors", ("reconstruct", "{U}", "--labels", "{L}", "--features", "{S}",
                                                        "--method", "fc", "-o", "{O}/o.reconstruction.safetensors")),
    ("score-result", "f.reconstruction.safetensors", ("score", "{S}", "--truth", "{T}")),
    ("score-truth", "f.truth.safetensors", ("score", "{R}", "--truth", "{S}")),
    ("export", "f.update.safetensors", ("export", "{S}", "-o", "{O}/o.pt")),
    ("import-before-npz", "f.npz", ("import", "--before", "{S}", "--grad", "{NG}", "--facts", "{NFJ}", "-o",
                                    "{O}/i.update.safetensors")),
    ("import-grad-pt", "f.pt", ("import", *MODEL, "--before", "{BPT}", "--grad", "{S}", "-o",
                                "{O}/i.update.safetensors")),
    ("import-facts", "f.json", ("import", "--before", "{NB}", "--grad", "{NG}", "--facts", "{S}", "-o",
                                "{O}/i.update.safetensors")),
    ("capture-init", "f.safetensors", ("capture", "--init", "{S}", "-o", "{O}/k.update.safetensors")),
):
    for _kind in ("FIFO", "ZERO") if _id in ("inspect", "labels", "import-before-npz", "import-facts") else ("FIFO",):
        add(Case(f"special-{_kind.lower()}-{_id}", SPECIAL, f"a {'FIFO' if _kind == 'FIFO' else '/dev/zero symlink'} "
                 f"as {_argv[0]}'s input", argv=tuple(a.replace("{S}", "{" + _kind + "}") for a in _argv),
                 prepare=_fifo(_name), mode="child"))
def _loop(folder: Path, base: dict[str, str]) -> dict[str, str]:
    import os

    os.symlink("loop.update.safetensors", folder / "loop.update.safetensors")
    return {"LOOP": str(folder / "loop.update.safetensors")}


for _id, _argv in (("inspect", ("inspect", "{LOOP}")), ("labels", ("labels", "{LOOP}", "-o", "{O}/o.labels.safetensors")),
                   ("import", ("import", "--before", "{LOOP}", "--grad", "{NG}", "--facts", "{NFJ}", "-o",
                               "{O}/i.update.safetensors"))):
    add(Case(f"special-symlink-loop-{_id}", SPECIAL, "a symlink to itself as input", argv=_argv, prepare=_loop))
add(Case("special-dev-zero-inspect", SPECIAL, "/dev/zero itself", argv=("inspect", "/dev/zero"), mode="child"))


# --------------------------------------------------------------------------- bases


def build_bases(folder: Path) -> dict[str, Path]:
    """The valid files every case derives from, made by gitool itself."""
    import torch

    from tests.hostile.runner import invoke

    folder.mkdir(parents=True, exist_ok=True)
    p = {key: folder / name for key, name in BASE_NAMES.items()}

    def ok(*argv):
        outcome = invoke(tuple(str(a) for a in argv), folder)
        if outcome.exit_code != 0:
            raise RuntimeError(f"building the base files: gitool {' '.join(map(str, argv))} failed: {outcome.stderr}")

    ok("capture", *MODEL, "--dtype", "float64", "--label-smoothing", "0.2", "--seed", "3", "-o", p["U"],
       "--truth", p["T"])
    ok("labels", p["U"], "-o", p["L"])
    ok("features", p["U"], "--labels", p["L"], "-o", p["F"])
    ok("reconstruct", p["U"], "--labels", p["L"], "--features", p["F"], "--method", "fc", "-o", p["R"])
    ok("export", p["U"], "-o", p["EPT"])
    ok("export", p["U"], "-o", folder / "expn.npz")
    ok("train", *MODEL, "--epochs", "1", "--batch-size", "16", "--seed", "1", "-o", p["C"])
    tensors, metadata = tensors_of(p["C"])  # float64 like the update, so import can mix them
    p["C"].write_bytes(save_tensors({k: v.double() if v.is_floating_point() else v for k, v in tensors.items()},
                                    metadata))
    bundle = torch.load(p["EPT"], weights_only=True)
    torch.save(bundle["before"], p["BPT"])
    torch.save(bundle["gradient"], p["GPT"])
    p["FTOML"].write_text(TOML_BASE)
    truth = load_file_tensors(p["T"])
    torch.save({"images": truth["images"], "labels": truth["labels"]}, p["PPT"])
    return p


def load_file_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def build_case_file(case: Case, folder: Path, base: dict[str, Path]) -> Path | None:
    if case.build is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    return case.build(folder, base)


# --------------------------------------------------------------------------- counts


def counts() -> dict[str, int]:
    files = [c for c in CASES if c.build is not None]
    options = [c for c in CASES if c.group == "options"]
    overlaps = [c for c in CASES if c.group == OVERLAP]
    specials = [c for c in CASES if c.group == SPECIAL]
    all_runs = runs()
    return {"files": len(files), "option values": len(options), "output overlaps": len(overlaps),
            "special files": len(specials), "cases": len(CASES), "runs": len(all_runs),
            "in-process runs": sum(r.case.mode == "inproc" for r in all_runs),
            "fresh-process runs": sum(r.case.mode == "child" for r in all_runs),
            "memory-bomb runs": sum(r.case.bomb for r in all_runs)}


def summary_line() -> str:
    c = counts()
    return (f"hostile corpus: {c['files']} files, {c['option values']} option values, {c['output overlaps']} output "
            f"overlaps, {c['special files']} special files = {c['cases']} cases; {c['runs']} runs "
            f"({c['in-process runs']} in-process, {c['fresh-process runs']} in a fresh process, "
            f"{c['memory-bomb runs']} of them memory bombs)")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.hostile.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", action="store_true", help="print the corpus counts")
    parser.add_argument("--list", action="store_true", help="list every case")
    parser.add_argument("--report", metavar="FILE", help="run the corpus and write the failures (markdown)")
    parser.add_argument("--write", metavar="DIR", help="build the base files and every hostile file into DIR")
    parser.add_argument("-k", metavar="TEXT", help="only cases whose id contains TEXT (with --report)")
    args = parser.parse_args(argv)
    if args.write:
        base = build_bases(Path(args.write) / "base")
        for case in CASES:
            if case.build is not None and not case.fresh:
                build_case_file(case, Path(args.write) / "files", base)
        print(f"wrote the base files and the hostile files under {args.write}")
    if args.list:
        for case in CASES:
            print(f"{case.id:45s} {case.group:40s} {case.why}")
    if args.report:
        from tests.hostile.runner import write_report

        write_report(Path(args.report), [c for c in CASES if not args.k or args.k in c.id])
    if args.count or not (args.list or args.report or args.write):
        print(summary_line())
        for key, value in counts().items():
            print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
