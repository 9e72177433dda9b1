"""docs/schemas/: one JSON schema per file kind, checked against real files and against
gitool/specs.py.

- Files made by the commands (captures, results, a checkpoint, an import and an export)
  validate against their kind's schema: their ``gitool.meta`` against the schema, their
  header's tensor entries against its ``$defs/tensors``.
- Mutated metadata is refused by the schema and by gitool's loader alike, so that the
  schema never promises a file gitool would refuse.
- Each fact field's schema is the constraint gitool/specs.py declares for it (types,
  ranges, enums, defaults), so the two cannot drift apart.
"""

from __future__ import annotations

import copy
import json
import re
import struct
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import MISSING, fields
from io import StringIO
from pathlib import Path

import pytest

import jsonschema  # the test extra (pyproject.toml)
import referencing

from gitool import specs

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "docs" / "schemas"
KINDS = ("update", "truth", "labels", "features", "reconstruction", "checkpoint")


# --------------------------------------------------------------------------- helpers


def _registry():
    from referencing.jsonschema import DRAFT202012

    resources = [(path.name, DRAFT202012.create_resource(json.loads(path.read_text())))
                 for path in sorted(SCHEMAS.glob("*.schema.json"))]
    return referencing.Registry().with_resources(resources)


REGISTRY = _registry()


def validator(ref: str):
    """A validator for ``NAME.schema.json`` or ``NAME.schema.json#/$defs/...``."""
    return jsonschema.Draft202012Validator({"$ref": ref}, registry=REGISTRY)


def errors(ref: str, document) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(ref).iter_errors(document)]


def header(path: Path) -> tuple[dict, dict]:
    """(the ``__metadata__`` map, the tensor entries) of a safetensors file, read plainly."""
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        entries = json.loads(handle.read(size))
    return entries.pop("__metadata__"), entries


def gitool(*args: str) -> None:
    """Run ``gitool ARGS`` in this process (a fresh process per command costs seconds)."""
    from gitool.cli import main

    saved, sys.argv = sys.argv, ["gitool", *map(str, args)]
    out, err = StringIO(), StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise AssertionError(f"gitool {' '.join(map(str, args))} exited {exc.code}: {err.getvalue()[-2000:]}") from None
    finally:
        sys.argv = saved


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """Every kind of file, made by the commands on small models (LeNet 16x16)."""
    d = tmp_path_factory.mktemp("schemas")
    gitool("capture", "--model", "lenet", "--image-size", "16", "--data", "synthetic", "--seed", "1",
           "-o", d / "c.update.safetensors")
    gitool("capture", "--model", "lenet", "--image-size", "16", "--data", "synthetic", "--seed", "2", "-B", "4",
           "--steps", "2", "--optimizer", "momentum", "--momentum", "0.9", "--label-smoothing", "0.1",
           "-o", d / "b.update.safetensors")
    gitool("labels", d / "c.update.safetensors", "-o", d / "c.labels.safetensors")
    gitool("labels", d / "b.update.safetensors", "--method", "llg", "-o", d / "b.labels.safetensors")
    gitool("capture", "--model", "mlp", "--image-size", "1x8x8", "--data", "synthetic", "--seed", "3", "-B", "3",
           "--dtype", "float64", "-o", d / "p.update.safetensors")
    gitool("labels", d / "p.update.safetensors", "--per-sample", "-o", d / "p.labels.safetensors")
    gitool("features", d / "p.update.safetensors", "--labels", d / "p.labels.safetensors",
           "-o", d / "p.features.safetensors")
    gitool("features", d / "c.update.safetensors", "--labels", d / "c.labels.safetensors",
           "-o", d / "c.features.safetensors")
    gitool("reconstruct", d / "c.update.safetensors", "--labels", d / "c.labels.safetensors", "--features",
           d / "c.features.safetensors", "--method", "conv", "-o", d / "c.reconstruction.safetensors")
    gitool("train", "-o", d / "ck.checkpoint.safetensors", "--model", "lenet", "--image-size", "16",
           "--data", "synthetic:50", "--epochs", "1")
    # export, then import the export with its facts; import with few facts, export that
    gitool("export", d / "c.update.safetensors", "-o", d / "out.pt")
    gitool("import", "--before", d / "out.pt", "--grad", d / "out.pt", "--facts", d / "out.facts.json",
           "-o", d / "i.update.safetensors")
    gitool("import", "--model", "lenet", "--image-size", "3x16x16", "--before", d / "out.pt", "--grad",
           d / "out.pt", "--batch-size", "1", "-o", d / "j.update.safetensors")
    gitool("export", d / "j.update.safetensors", "-o", d / "j.npz")
    # a truth from the client's own batch (here the capture's), as gitool truth makes it
    import torch

    from gitool.files import load_truth

    captured = load_truth(d / "c.truth.safetensors")
    torch.save({"images": captured.images, "labels": captured.labels}, d / "private.pt")
    gitool("truth", d / "c.update.safetensors", "--private", d / "private.pt", "-o", d / "t.truth.safetensors")
    return d


FILES = [
    ("c.update.safetensors", "update"),
    ("b.update.safetensors", "update"),
    ("i.update.safetensors", "update"),
    ("j.update.safetensors", "update"),
    ("c.truth.safetensors", "truth"),
    ("b.truth.safetensors", "truth"),
    ("t.truth.safetensors", "truth"),
    ("c.labels.safetensors", "labels"),
    ("b.labels.safetensors", "labels"),
    ("p.labels.safetensors", "labels"),
    ("p.features.safetensors", "features"),
    ("c.features.safetensors", "features"),
    ("c.reconstruction.safetensors", "reconstruction"),
    ("ck.checkpoint.safetensors", "checkpoint"),
]


# --------------------------------------------------------------------------- real files


def test_every_kind_has_a_schema():
    from gitool.files import KINDS as FILE_KINDS

    assert FILE_KINDS == KINDS
    names = {path.name for path in SCHEMAS.glob("*.schema.json")}
    assert {f"{kind}.schema.json" for kind in KINDS} | {"facts.schema.json", "export-facts.schema.json",
                                                       "common.schema.json", "audit-summary.schema.json"} == names
    for name in names:  # each is a valid draft 2020-12 schema
        jsonschema.Draft202012Validator.check_schema(json.loads((SCHEMAS / name).read_text()))


@pytest.mark.parametrize("name,kind", FILES, ids=[name for name, _ in FILES])
def test_files_the_commands_write_validate(made, name, kind):
    metadata, entries = header(made / name)
    assert metadata["gitool.kind"] == kind
    assert metadata["gitool.version"] == "1"
    meta = json.loads(metadata["gitool.meta"])
    assert errors(f"{kind}.schema.json", meta) == []
    assert errors(f"{kind}.schema.json#/$defs/tensors", entries) == []


def test_imported_updates_record_their_sources_and_unknown_facts(made):
    meta = json.loads(header(made / "j.update.safetensors")[0]["gitool.meta"])
    assert set(meta["provenance"]["imported"]) == {"before", "gradient"}
    assert "lr" in meta["provenance"]["unknown_facts"]  # so the schema was met by a real list


@pytest.mark.parametrize("name", ["out.facts.json", "j.facts.json"])
def test_export_facts_validate_as_export_and_as_facts_file(made, name):
    document = json.loads((made / name).read_text())
    assert errors("export-facts.schema.json", document) == []
    assert errors("facts.schema.json", document) == []  # what import --facts reads


def test_readme_facts_example_validates():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")

    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^( *)```toml\n(.*?)^\1```", readme, flags=re.S | re.M)
    assert blocks, "README.md has a ```toml facts example"
    for indent, text in blocks:
        document = tomllib.loads("\n".join(line[len(indent):] for line in text.splitlines()))
        assert errors("facts.schema.json", document) == []


def test_format_md_update_example_validates():
    text = (ROOT / "docs" / "FORMAT.md").read_text()
    example = json.loads(re.search(r"## update.*?```json\n(.*?)```", text, flags=re.S).group(1))
    assert errors("update.schema.json", example) == []


# --------------------------------------------------------------------------- refused alike


def _rewrite(source: Path, target: Path, change) -> Path:
    """``source`` with its gitool.meta changed by ``change(meta)`` (tensors kept)."""
    from gitool.files import encode_file, read_raw

    raw = read_raw(source)
    meta = copy.deepcopy(raw.meta)
    change(meta)
    target.write_bytes(encode_file(raw.kind, raw.tensors, meta))
    return target


def _set(path: str, value):
    """A change that sets (or, for MISSING, deletes) ``a.b.c`` in the metadata."""
    *parents, last = path.split(".")

    def change(meta):
        node = meta
        for key in parents:
            node = node[key]
        if value is MISSING:
            del node[last]
        else:
            node[last] = value

    return change


def _show(value) -> str:
    return "absent" if value is MISSING else repr(value)


def _loader(kind: str):
    from gitool.files import load_checkpoint, load_result, load_truth, load_update

    return {"update": load_update, "truth": load_truth, "checkpoint": load_checkpoint}.get(kind, load_result)


def _verdicts(made: Path, tmp_path: Path, name: str, kind: str, change) -> tuple[list[str], str | None]:
    """(the schema's errors, gitool's error or None) for ``name`` changed by ``change``."""
    from gitool.errors import GitoolError

    path = _rewrite(made / name, tmp_path / f"x.{kind}.safetensors", change)
    meta = json.loads(header(path)[0]["gitool.meta"])
    try:
        _loader(kind)(path)
        refused = None
    except GitoolError as exc:
        refused = str(exc)
    return errors(f"{kind}.schema.json", meta), refused


REFUSED = [
    ("c.update.safetensors", "update", "training.batch_size", 0),
    ("c.update.safetensors", "update", "training.optimizer", "adam"),
    ("c.update.safetensors", "update", "client_id", 7),  # an extra field
    ("c.update.safetensors", "update", "training.epochs", 1),
    ("c.update.safetensors", "update", "training.lr", -0.1),
    ("c.update.safetensors", "update", "training.momentum", 0.9),  # without the momentum optimizer
    ("c.update.safetensors", "update", "training.prox_mu", 0.1),  # without the fedprox optimizer
    ("c.update.safetensors", "update", "defence.dp_noise", 1.0),  # without dp_clip
    ("c.update.safetensors", "update", "loss.family", "smoothing"),  # without eps
    ("c.update.safetensors", "update", "loss.label_smoothing", 0.1),  # on hard labels
    ("c.update.safetensors", "update", "loss.mixup_coef", 0.5),  # on hard labels
    ("b.update.safetensors", "update", "loss.mixup_alpha", 0.5),  # on smoothed labels
    ("c.update.safetensors", "update", "input.shape", MISSING),
    ("c.update.safetensors", "update", "training", MISSING),
    ("c.update.safetensors", "update", "update_kind", "weights"),
    ("c.update.safetensors", "update", "model.activation", "gelu"),
    ("c.update.safetensors", "update", "model.colour", "red"),
    ("c.update.safetensors", "update", "model.output", 0),  # a zoo model returns its logits
    ("c.truth.safetensors", "truth", "replay_error", "small"),
    ("c.truth.safetensors", "truth", "private", "private.pt"),
    ("t.truth.safetensors", "truth", "private.sha256", MISSING),
    ("c.update.safetensors", "update", "provenance.unknown_facts", "lr"),
    ("c.truth.safetensors", "truth", "update.sha256", MISSING),
    ("c.labels.safetensors", "labels", "source", "c.update.safetensors"),
    ("c.labels.safetensors", "labels", "options", ["scan"]),
    ("c.labels.safetensors", "labels", "source.sha256", 7),
    ("c.features.safetensors", "features", "diagnostics", 1.0),
    ("ck.checkpoint.safetensors", "checkpoint", "model", MISSING),
    ("ck.checkpoint.safetensors", "checkpoint", "model.num_classes", "ten"),
]

ACCEPTED = [
    ("c.update.safetensors", "update", "training.weight_decay", MISSING),  # a default
    ("c.update.safetensors", "update", "loss", {}),
    ("c.update.safetensors", "update", "provenance", MISSING),
    ("b.update.safetensors", "update", "training.momentum", 0.5),
    ("c.update.safetensors", "update", "model.output", None),  # None: forward returns the logits
    ("c.truth.safetensors", "truth", "replay_error", 3e-7),
    ("c.truth.safetensors", "truth", "private", {"path": "private.pt", "sha256": "0" * 64}),
    ("c.labels.safetensors", "labels", "wall_time", 0.25),  # written by older gitools, ignored
    ("c.labels.safetensors", "labels", "source", {}),
]


@pytest.mark.parametrize("name,kind,key,value", REFUSED, ids=[f"{k}:{key}={_show(v)}" for _, k, key, v in REFUSED])
def test_schema_and_gitool_refuse_the_same_metadata(made, tmp_path, name, kind, key, value):
    problems, refused = _verdicts(made, tmp_path, name, kind, _set(key, value))
    assert refused is not None, "gitool reads it"
    assert problems, f"the schema accepts what gitool refuses: {refused}"


@pytest.mark.parametrize("name,kind,key,value", ACCEPTED, ids=[f"{k}:{key}={_show(v)}" for _, k, key, v in ACCEPTED])
def test_schema_and_gitool_accept_the_same_metadata(made, tmp_path, name, kind, key, value):
    problems, refused = _verdicts(made, tmp_path, name, kind, _set(key, value))
    assert refused is None
    assert problems == []


FACTS_CHANGES = [
    ("training.batch_size", 0, False),
    ("training.optimizer", "adam", False),
    ("training.epochs", 1, False),  # a field no section has
    ("budget", {}, False),  # a section gitool does not know
    ("training.momentum", 0.5, False),  # without the momentum optimizer
    ("loss.family", MISSING, False),  # a loss section names its family
    ("input.std", MISSING, False),  # mean and std come together
    ("defence.dp_noise", 1.0, False),
    ("update_kind", "weights", False),
    ("training.weight_decay", MISSING, True),  # left out: unknown
    ("defence", {}, True),  # no defence
    ("format", 3, True),  # informational, ignored
    ("exported_from", MISSING, True),
]


@pytest.mark.parametrize("key,value,accepted", FACTS_CHANGES, ids=[f"{k}={_show(v)}" for k, v, _ in FACTS_CHANGES])
def test_schema_and_gitool_import_agree_on_facts_files(made, tmp_path, key, value, accepted):
    document = json.loads((made / "out.facts.json").read_text())
    _set(key, value)(document)
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(document))
    try:
        gitool("import", "--before", made / "out.pt", "--grad", made / "out.pt", "--facts", facts,
               "-o", tmp_path / "x.update.safetensors")
        imported = True
    except AssertionError:
        imported = False
    assert imported == accepted
    assert (errors("facts.schema.json", document) == []) == accepted


# --------------------------------------------------------------------------- the specs' constraints

SECTIONS = {"input": specs.InputSpec, "loss": specs.LossSpec, "training": specs.TrainingSpec,
            "defence": specs.DefenceSpec}
COMMON = json.loads((SCHEMAS / "common.schema.json").read_text())["$defs"]


def as_schema(constraint) -> dict:
    """The JSON Schema a specs.py constraint means (the form docs/schemas/ writes)."""
    if isinstance(constraint, specs.Interval):
        schema = {"type": "integer" if constraint.kind is int else "number"}
        for end, value in (("Minimum", constraint.low), ("Maximum", constraint.high)):
            if value is None:
                continue
            closed = constraint.closed in ("both", "left" if end == "Minimum" else "right")
            schema[end.lower() if closed else "exclusive" + end] = value
        return schema
    if isinstance(constraint, specs.OneOf):
        return {"enum": list(constraint.values)}
    if isinstance(constraint, specs.Optional_):
        return {"anyOf": [{"type": "null"}, as_schema(constraint.inner)]}
    if isinstance(constraint, specs.Values):
        return {"type": "array", "minItems": 1, "maxItems": constraint.most, "items": as_schema(constraint.each)}
    raise AssertionError(f"no JSON Schema form for {constraint!r}; teach as_schema and docs/schemas/")


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("section", SECTIONS)
def test_each_fact_field_has_the_constraint_and_default_specs_declares(section):
    declared = {f.name: f for f in fields(SECTIONS[section])}
    schema = COMMON[section]["properties"]
    assert set(schema) == set(declared), "the schema lists exactly the spec's fields"
    for name, item in declared.items():
        prop = schema[name]
        constraint = item.metadata.get("constraint")
        if constraint is not None:
            wanted = as_schema(constraint)
            assert {key: prop.get(key) for key in wanted} == wanted, f"{section}.{name}"
            # what the schema adds may only narrow (never widen) the declared constraint
            assert set(prop) - set(wanted) <= {"description", "default", "minItems"}, f"{section}.{name}"
        if item.default is not MISSING:
            assert prop["default"] == _jsonable(item.default), f"{section}.{name} default"
        else:
            assert "default" not in prop


def test_shapes_models_and_bounds_are_the_ones_gitool_checks():
    from gitool.models import ACTIVATIONS, MODELS

    shape = COMMON["input_shape"]["prefixItems"]
    assert [s["maximum"] for s in shape] == [specs.MAX_CHANNELS, specs.MAX_SIDE, specs.MAX_SIDE]
    assert all(s["minimum"] == 1 and s["type"] == "integer" for s in shape)
    model = COMMON["model"]["properties"]
    assert model["name"]["anyOf"][0]["enum"] == list(MODELS)
    assert COMMON["model"]["if"]["properties"]["name"]["enum"] == list(MODELS)  # zoo models have no output selector
    assert model["activation"]["anyOf"][1]["enum"] == list(ACTIVATIONS)
    assert (model["num_classes"]["minimum"], model["num_classes"]["maximum"]) == (2, specs.MAX_CLASSES)
    training = COMMON["training"]["properties"]
    assert training["batch_size"]["maximum"] == specs.MAX_BATCH
    assert training["steps"]["maximum"] == specs.MAX_STEPS
    probes = [[3, 16, 16], [64, 4096, 4096], [65, 1, 1], [1, 4097, 1], [0, 1, 1], [3, 16], [3, 16, 16, 1],
              [3.5, 16, 16], ["3", 16, 16], [True, 16, 16]]  # not 3.0: JSON Schema's integer includes it
    for value in probes:
        c, h, w = (value + [1, 1, 1])[:3] if isinstance(value, list) else (1, 1, 1)
        too_big = all(type(v) is int for v in (c, h, w)) and c * h * w > specs.MAX_PIXELS
        if too_big:  # C x H x W <= 2^24 is stated in words only
            continue
        assert (errors("common.schema.json#/$defs/input_shape", value) == []) == (
            specs.shape_problem(value) is None), value


def _probes(constraint) -> list:
    """Values on both sides of each end of ``constraint``, and values of other types."""
    if isinstance(constraint, specs.Optional_):
        return [None, *_probes(constraint.inner)]
    if isinstance(constraint, specs.OneOf):
        return [*constraint.values, "bogus", "", None, 1]
    if isinstance(constraint, specs.Values):
        inner = [v for v in _probes(constraint.each) if v is not None]
        return [[v] for v in inner] + [[], None, "0.5", [0.5] * (constraint.most + 1)]
    ends = [v for v in (constraint.low, constraint.high) if v is not None]
    if constraint.kind is int:
        values = {int(e) + d for e in ends for d in (-1, 0, 1)} | {0, 1, 7}
        return sorted(values) + ["1", True, None, [1]]
    values = {float(e) + d for e in ends for d in (-0.5, -1e-9, 0.0, 1e-9, 0.5)} | {0.0, 1.0, 0.3, 2.5}
    return sorted(values) + [1, 0, "1", True, None, [0.5]]


# A field's probes are made in a context that lets the field matter (a family's own
# fields, the optimiser a momentum belongs to, ...). dtype and shape must match the tensors
# and the model, so loading tests them apart (test_shapes_models_and_bounds...).
CONTEXT = {
    "loss.label_smoothing": {"family": "smoothing"},
    "loss.label_smoothing_range": {"family": "smoothing"},
    "loss.mixup_alpha": {"family": "mixup"},
    "loss.mixup_coef": {"family": "mixup"},
    "training.momentum": {"optimizer": "momentum"},
    "training.prox_mu": {"optimizer": "fedprox"},
    "defence.dp_noise": {"dp_clip": 1.0},
}
PROBED = [(section, f.name) for section, cls in SECTIONS.items() for f in fields(cls)
          if "constraint" in f.metadata and f"{section}.{f.name}" != "training.dtype"]


@pytest.mark.parametrize("section,name", PROBED, ids=[f"{s}.{n}" for s, n in PROBED])
def test_schema_and_gitool_agree_on_every_value_of_each_fact(made, tmp_path, section, name):
    """Each probe value of a fact: the schema accepts it exactly when gitool loads it."""
    constraint = specs.constraint_of(SECTIONS[section], name)
    disagree = []
    for value in _probes(constraint):
        if section == "input" and isinstance(value, list) and len(value) != 1:
            continue  # 1 or C values: stated in words only
        if name == "label_smoothing_range" and isinstance(value, list) and len(value) == 1:
            value = [value[0], value[0]]  # [LO, HI] with LO <= HI

        def change(meta, value=value):
            meta[section].update(CONTEXT.get(f"{section}.{name}", {}))
            meta[section][name] = value

        problems, refused = _verdicts(made, tmp_path, "c.update.safetensors", "update", change)
        if bool(problems) != bool(refused):
            disagree.append((value, problems[:1], refused))
    assert disagree == []


OUTPUT_PROBES = [0, 1, 255, 256, -1, "logits", "out.logits", "head-1", "_x", "0abc", "a b", "", "x" * 64, "x" * 65,
                 True, 1.5, None, [0], {"key": "logits"}]


@pytest.mark.parametrize("value", OUTPUT_PROBES, ids=repr)
def test_schema_and_gitool_agree_on_the_output_selector(value):
    """model.output of a user model: the schema and ModelSpec.from_dict (the one reader of
    model specs, which imports nothing) accept the same values."""
    from gitool.errors import GitoolError
    from gitool.models import ModelSpec

    document = {"name": "mynet:make", "output": value}
    try:
        ModelSpec.from_dict(document)
        accepted = True
    except GitoolError:
        accepted = False
    assert (errors("common.schema.json#/$defs/model", document) == []) == accepted
    assert accepted == (specs.OutputSelector().problem(value) is None)
