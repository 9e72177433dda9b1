"""Updates from other federated-learning stacks in, and back out (``gitool import`` / ``export``).

An auditor rarely holds a gitool capture: more often a PyTorch training loop saved the
global weights before a client's local training and the weights after it (or the
gradient it sent), or a Flower client exchanged parameter lists. This module turns such
files into an :class:`~gitool.files.Update` and writes updates back out.

Weights in:
- ``.safetensors``: a plain state dict, or a gitool checkpoint;
- ``.pt`` / ``.pth`` / ``.bin``: a state dict saved with ``torch.save``, read with
  ``weights_only=True`` (a file that needs arbitrary unpickling is refused, never run),
  or a bundle written by ``gitool export --format pt`` (each option takes its part);
- ``.npz``: Flower-style parameter lists, arrays ``arr_0, arr_1, ...`` in the model's
  ``state_dict()`` order (``np.savez(f, *[v.cpu().numpy() for v in net.state_dict().values()])``),
  read with ``allow_pickle=False``; an archive whose keys are the state-dict names is
  matched by name. Lists of the trainable parameters alone (``named_parameters()`` order)
  are accepted for everything but the global weights, which must include the buffers.

Everything is validated against the model (names, shapes, dtypes, finiteness) before
anything is written; a mismatch lists the offending parameters.

Training facts the files cannot tell (batch size, local steps, learning rate, optimiser,
label family, input shape, normalisation, ...) come from options or a facts file. A fact
nobody gave is recorded as unknown (see :mod:`gitool.facts`), never guessed.
"""

from __future__ import annotations

import io
import json
import re
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gitool import __version__
from gitool.errors import GitoolError, UsageError
from gitool.facts import FACTS, UNKNOWN_KEY, unknown_facts
from gitool.specs import OPTION_OF, SpecError, coerce_field
from gitool.files import (
    DefenceSpec,
    InputSpec,
    LossSpec,
    TrainingSpec,
    Update,
    jsonable,
    atomic_write_bytes,
    file_sha256,
    load_checkpoint,
    read_torch_object,
)
from gitool.files.foreign import read_npz_arrays

# The parts of a client round, as named in export bundles and in messages.
PARTS = ("before", "after", "delta", "gradient")
KIND_OF_PART = {"after": "delta", "delta": "delta", "gradient": "gradient"}
SPEC_SECTIONS = {"input": InputSpec, "loss": LossSpec, "training": TrainingSpec, "defence": DefenceSpec}
FACTS_FORMAT = "gitool-facts"
BUNDLE_FORMAT = "gitool-export"
FLOAT_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


# --------------------------------------------------------------------------- facts files


def read_facts_file(path: str | Path) -> dict[str, Any]:
    """A facts file (TOML or JSON): sections ``training``, ``loss``, ``input``, ``defence``
    with the field names of the update metadata (docs/FORMAT.md), and optionally
    ``model`` (a model spec) and ``update_kind``. Values are type-checked; a misspelt
    section or field is an error rather than silently ignored."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--facts {path}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                raise UsageError("reading TOML facts needs Python 3.11+ or the tomli package; "
                                 "write the facts as JSON instead") from None
        try:
            document = tomllib.loads(text)
        except (tomllib.TOMLDecodeError, ValueError, RecursionError) as exc:  # ValueError: a 5000-digit integer
            raise UsageError(f"--facts {path}: not valid TOML ({str(exc)[:120]})") from None
    elif path.suffix == ".json":
        from gitool.codec import loads_json

        try:
            document = loads_json(text, f"--facts {path}")
        except GitoolError as exc:
            raise UsageError(str(exc)) from None
    else:
        raise UsageError(f"--facts {path}: name it .toml or .json")
    return check_facts(document, f"--facts {path}")


def check_facts(document: Any, where: str) -> dict[str, Any]:
    """Validate and normalise a facts document (see :func:`read_facts_file`)."""
    from gitool.models import ModelSpec

    if not isinstance(document, dict):
        raise UsageError(f"{where}: expected a table/object of sections")
    informational = {"format", UNKNOWN_KEY, "exported_from"}  # written by export, not facts
    unknown = sorted(set(document) - set(SPEC_SECTIONS) - {"model", "update_kind"} - informational)
    if unknown:
        raise UsageError(f"{where}: unknown section(s) {', '.join(unknown)}; "
                         f"expected {', '.join(SPEC_SECTIONS)}, model, update_kind")
    facts: dict[str, Any] = {}
    if "update_kind" in document:
        if document["update_kind"] not in ("gradient", "delta"):
            raise UsageError(f"{where}: update_kind must be gradient or delta")
        facts["update_kind"] = document["update_kind"]
    if "model" in document:
        try:
            facts["model"] = ModelSpec.from_dict(document["model"])
        except GitoolError as exc:
            raise UsageError(f"{where}: {exc}") from None
        facts["model_fields"] = set(document["model"])
    for section, cls in SPEC_SECTIONS.items():
        if section not in document:
            continue
        values = document[section]
        if not isinstance(values, dict):
            raise UsageError(f"{where}: section '{section}' must be a table/object")
        hints = typing.get_type_hints(cls)
        strange = sorted(set(values) - set(hints))
        if strange:
            raise UsageError(f"{where}: section '{section}' has no field(s) {', '.join(strange)}; "
                             f"its fields: {', '.join(hints)}")
        facts[section] = {name: coerce_field(value, hints[name], f"{where}: {section}.{name}", UsageError)
                          for name, value in values.items()}
    return facts


def merge_facts(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Facts from options over facts from a file: training and input field by field;
    loss and defence as whole sections (a label family's fields belong together)."""
    merged = {key: (dict(value) if isinstance(value, dict) else value) for key, value in base.items()}
    for key, value in override.items():
        if key in ("training", "input"):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


def specs_from_facts(facts: dict[str, Any], *, kind: str, dtype: str, input_shape: tuple[int, int, int],
                     input_shape_known: bool, num_classes: int):
    """The typed specs of an imported update and the names of the facts nobody gave.

    Unknown facts keep the specs' defaults, listed in ``unknown``; attacks check that
    list with :func:`gitool.facts.require_facts` before trusting a value."""
    from gitool.capture import CaptureConfig, validate

    training = dict(facts.get("training", {}))
    inputs = dict(facts.get("input", {}))
    if "dtype" in training and training["dtype"] != dtype:
        raise UsageError(f"the facts say training.dtype {training['dtype']}, but the weights are {dtype}")
    training["dtype"] = dtype
    if kind == "gradient":
        if training.get("steps", 1) != 1:
            raise UsageError("a gradient is one local step; the facts say steps = "
                             f"{training['steps']} (import weights after training with --after instead)")
        training["steps"] = 1
    if "optimizer" not in training and ({"momentum", "prox_mu"} & set(training)):
        raise UsageError("momentum or prox_mu given without the optimizer (sgd, momentum or fedprox)")
    if "shape" in inputs and tuple(inputs["shape"]) != tuple(input_shape):
        raise UsageError(f"the facts say input shape {tuple(inputs['shape'])}, the model is built for "
                         f"{tuple(input_shape)}")
    if ("mean" in inputs) != ("std" in inputs):
        raise UsageError("give the normalisation's mean and std together")
    loss = dict(facts.get("loss", {}))
    if loss and "family" not in loss:
        raise UsageError("the loss facts need 'family' (hard, smoothing or mixup)")

    known = {
        "batch_size": "batch_size" in training,
        "steps": "steps" in training,
        "lr": "lr" in training,
        "optimizer": "optimizer" in training,
        "weight_decay": "weight_decay" in training,
        "model_mode": "model_mode" in training,
        "loss_family": "family" in loss,
        "input_shape": input_shape_known or "shape" in inputs,
        "normalization": "mean" in inputs,
        "defence": "defence" in facts,
    }
    assert set(known) == set(FACTS), "every fact needs a rule here"
    inputs["shape"] = tuple(input_shape)
    try:
        input_spec = InputSpec(**inputs)
        specs = TrainingSpec(**training), LossSpec(**loss), DefenceSpec(**facts.get("defence", {}))
    except SpecError as exc:  # from an option or the facts file: name both
        raise UsageError(f"{exc.key} {exc.message} (set by {OPTION_OF.get(exc.key, exc.key)} or the facts "
                         "file)") from None
    validate(CaptureConfig(training=specs[0], loss=specs[1], defence=specs[2], send=kind), num_classes)
    unknown = [name for name, is_known in known.items() if not is_known]
    return input_spec, *specs, unknown


def facts_of(update: Update) -> dict[str, Any]:
    """The facts document of an update: every metadata section, less the unknown facts,
    so that importing it again marks the same facts unknown."""
    missing = set(unknown_facts(update))
    hidden = {field for name in missing for field in FACTS[name][0]}
    model = update.model.to_dict()
    if "input_shape" in missing:
        del model["input_shape"]
    document: dict[str, Any] = {"format": FACTS_FORMAT, "update_kind": update.kind, "model": model}
    for section, spec in (("input", update.input), ("loss", update.loss), ("training", update.training),
                          ("defence", update.defence)):
        if section in ("loss", "defence") and any(f.startswith(section + ".") for f in hidden):
            continue
        document[section] = {name: value for name, value in asdict(spec).items()
                             if f"{section}.{name}" not in hidden}
    document[UNKNOWN_KEY] = sorted(missing)
    if update.path is not None:
        document["exported_from"] = {"path": str(update.path), "sha256": update.sha256}
    return document


# --------------------------------------------------------------------------- reading weights


@dataclass
class ModelLayout:
    """What the files must match: the model's state-dict entries in order, and which of
    them are trainable parameters (the ones a gradient or delta covers)."""

    state: dict[str, torch.Tensor]
    parameters: list[str]

    @classmethod
    def of(cls, spec) -> ModelLayout:
        from gitool.models import build_model

        model = build_model(spec)
        return cls(dict(model.state_dict()), [name for name, _ in model.named_parameters()])

    @property
    def budget(self) -> int:
        """The most bytes a weights file of this model may unpack to: every state-dict
        entry in float64, plus room for headers. A file claiming more is refused unread."""
        return sum(t.numel() for t in self.state.values()) * 8 + 1024 * len(self.state) + (1 << 20)


def read_weights(path: str | Path, part: str, layout: ModelLayout) -> dict[str, torch.Tensor]:
    """The tensors of one part (before, after, delta, gradient) from a weights file."""
    from gitool.files import existing_file

    path = existing_file(path, "a weights file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path, part, layout)
    if suffix in TORCH_SUFFIXES:
        obj = read_torch_object(path, budget=layout.budget)
        if isinstance(obj, dict) and any(isinstance(obj.get(p), dict) for p in PARTS):
            if not isinstance(obj.get(part), dict):  # an export bundle without this part
                held = ", ".join(p for p in PARTS if isinstance(obj.get(p), dict))
                raise UsageError(f"{path} is an export bundle holding {held}, not {part}")
            obj = obj[part]
        elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if part == "gradient" and isinstance(obj, dict):
            obj = _unused_as_zero(obj, layout)
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise GitoolError(f"{path}: expected a dictionary of tensors (a state_dict)")
        return {str(k): v for k, v in obj.items()}
    if suffix == ".safetensors":
        return dict(load_checkpoint(path, budget=layout.budget).state)
    raise UsageError(f"{path}: unknown weights format; expected .safetensors, .pt, .pth, .bin or .npz")


def _unused_as_zero(gradients: dict, layout: ModelLayout) -> dict:
    """``{n: p.grad for n, p in net.named_parameters()}`` holds None for a parameter the
    loss does not reach (an unused head, a frozen layer): its gradient is zero."""
    floats = [v.dtype for v in gradients.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if not floats or not any(v is None for v in gradients.values()):
        return gradients
    return {name: (torch.zeros(layout.state[name].shape, dtype=floats[0])
                   if value is None and name in layout.parameters else value) for name, value in gradients.items()}


_LIST_KEY = re.compile(r"^arr_(\d+)$")


def _read_npz(path: Path, part: str, layout: ModelLayout) -> dict[str, torch.Tensor]:
    """A Flower-style parameter list (or a named archive) matched to the model's names."""
    import zipfile

    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            magic = handle.read(6)
        if magic[:1] == b"\x80":
            raise GitoolError(f"refused: {path} is a pickle, whose loading could run code; save the arrays with "
                              "np.savez")
        what = "one .npy array" if magic == b"\x93NUMPY" else "not a zip of .npy arrays"
        raise GitoolError(f"{path}: not a readable .npz archive ({what}); save the list with np.savez")
    arrays = read_npz_arrays(path, layout.budget, len(layout.state))
    for key, array in arrays.items():
        if not isinstance(array, np.ndarray):  # numpy hands back raw bytes of a member that is no .npy
            raise GitoolError(f"{path}: member {key} is not a .npy array (is this really an np.savez archive?)")
        if array.dtype.kind not in "fiub":
            raise GitoolError(f"{path}: array {key} has dtype {array.dtype}; expected real numbers (float, int or bool)")
    numbered = [_LIST_KEY.match(key) for key in arrays]
    if arrays and all(numbered):
        order = sorted(arrays, key=lambda key: int(_LIST_KEY.match(key).group(1)))
        if [int(_LIST_KEY.match(key).group(1)) for key in order] != list(range(len(order))):
            raise GitoolError(f"{path}: arrays must be numbered arr_0 ... arr_{len(order) - 1} without gaps")
        return state_of_list([arrays[key] for key in order], part, layout, str(path))
    return {name: torch.from_numpy(value.copy()) for name, value in arrays.items()}  # copy: C order, 0-d kept


def state_of_list(arrays: list[np.ndarray], part: str, layout: ModelLayout, where: str) -> dict[str, torch.Tensor]:
    """A parameter list as Flower exchanges it, named: the model's ``state_dict()`` order
    (buffers included), or for everything but ``before`` the trainable parameters alone."""
    names = _list_names(where, part, len(arrays), layout)
    return {name: torch.from_numpy(value.copy()) for name, value in zip(names, arrays)}  # copy: C order, 0-d kept


def _list_names(path: Path | str, part: str, count: int, layout: ModelLayout) -> list[str]:
    """The names of a list of ``count`` arrays: state-dict order, or parameters only."""
    n_state, n_params = len(layout.state), len(layout.parameters)
    if count == n_state and part != "gradient":
        return list(layout.state)
    if count == n_params and part != "before":
        return list(layout.parameters)
    buffers = n_state - n_params
    if part == "before":
        wanted = f"{n_state} (the state_dict: {n_params} parameters + {buffers} buffers, in state_dict order)"
    elif part == "gradient":
        wanted = f"{n_params} (one gradient per parameter, in named_parameters order)"
    else:
        wanted = (f"{n_state} (the state_dict, in its order) or {n_params} (the parameters alone)"
                  if buffers else f"{n_params} (the state_dict, in its order)")
    raise GitoolError(f"{path}: {part} lists {count} arrays; the model needs {wanted}")


def check_part(path: Path | str, part: str, tensors: dict[str, torch.Tensor], layout: ModelLayout,
               image_hint: str = "") -> None:
    """Names, shapes, dtype kinds and finiteness of one part against the model; every
    offending entry is listed in one line."""
    required = list(layout.state) if part == "before" else layout.parameters
    # after/delta lists in state_dict order carry buffers too; the update keeps parameters only
    allowed = set(layout.parameters) if part == "gradient" else set(layout.state)
    missing = [n for n in required if n not in tensors]
    extra = sorted(set(tensors) - allowed)
    wrong = []
    for name in tensors.keys() & allowed:
        want, got = layout.state[name], tensors[name]
        if tuple(got.shape) != tuple(want.shape):
            wrong.append(f"{name} {tuple(got.shape)} vs model {tuple(want.shape)}")
        elif want.is_floating_point() and got.dtype not in FLOAT_DTYPES:
            wrong.append(f"{name} dtype {str(got.dtype).replace('torch.', '')} (gitool reads float32 or float64)")
        elif not want.is_floating_point() and got.is_floating_point():
            wrong.append(f"{name} dtype {str(got.dtype).replace('torch.', '')} vs model "
                         f"{str(want.dtype).replace('torch.', '')}")
        elif got.is_floating_point() and not torch.isfinite(got).all():
            wrong.append(f"{name} holds NaN or infinite values")
    problems = []
    for label, names in (("missing", missing), ("unexpected", extra), ("mismatch", sorted(wrong))):
        if names:
            problems.append(f"{label} " + "; ".join(names[:6]) + (f" ... ({len(names)} in all)" if len(names) > 6
                                                                    else ""))
    if problems:
        hint = image_hint if wrong and image_hint else ""
        raise GitoolError(f"{path}: {part} does not fit the model: " + " | ".join(problems) + hint)


# --------------------------------------------------------------------------- import


def import_update(spec, before: str | Path, *, after: str | Path | None = None, delta: str | Path | None = None,
                  gradient: str | Path | None = None, facts: dict[str, Any] | None = None,
                  input_shape_known: bool = True, facts_path: str | Path | None = None) -> Update:
    """An update from the global weights ``before`` and one of: the weights ``after``
    local training (delta = after - before), the ``delta`` itself, or a ``gradient``.

    Nothing is written here; everything is validated, so the caller may save the result."""
    given = {part: path for part, path in (("after", after), ("delta", delta), ("gradient", gradient)) if path}
    if len(given) != 1:
        raise UsageError("give exactly one of --after, --delta or --grad besides --before")
    (part, values_path), = given.items()
    kind = KIND_OF_PART[part]
    facts = facts or {}
    if facts.get("update_kind", kind) != kind:
        raise UsageError(f"the facts describe a {facts['update_kind']} update, but --{part} gives a {kind}")
    layout = ModelLayout.of(spec)
    before_state = read_weights(before, "before", layout)
    other = read_weights(values_path, part, layout)
    update = update_of_states(spec, layout, {"before": (before_state, Path(before)), part: (other, Path(values_path))},
                              facts, input_shape_known)
    sources = {"before": _source(before), part: _source(values_path)}
    if facts_path is not None:
        sources["facts"] = _source(facts_path)
    update.provenance["imported"] = sources
    return update


def update_of_states(spec, layout: ModelLayout, parts: dict[str, tuple[dict[str, torch.Tensor], Any]],
                     facts: dict[str, Any], input_shape_known: bool = True) -> Update:
    """An update from named tensors: ``parts`` maps ``before`` and one of ``after``,
    ``delta``, ``gradient`` to (tensors, where they came from, for messages). Every part
    is checked against the model, the facts against their constraints; the facts nobody
    gave are listed in ``provenance["unknown_facts"]``."""
    (part,) = [name for name in parts if name != "before"]
    kind = KIND_OF_PART[part]
    (before_state, before_where), (other, values_where) = parts["before"], parts[part]
    hint = "" if input_shape_known else " (the input shape is not given: does --image-size fit?)"
    check_part(before_where, "before", before_state, layout, hint)
    check_part(values_where, part, other, layout, hint)

    float_dtypes = {t.dtype for t in (*before_state.values(), *other.values()) if t.is_floating_point()}
    if len(float_dtypes) > 1:
        listed = ", ".join(sorted(FLOAT_DTYPES[d] for d in float_dtypes))
        raise GitoolError(f"the weights mix {listed}; save before and {part} in one dtype")
    dtype = FLOAT_DTYPES[float_dtypes.pop()] if float_dtypes else "float32"

    global_state = {name: before_state[name].to(layout.state[name].dtype)
                    if not layout.state[name].is_floating_point() else before_state[name]
                    for name in layout.state}
    if part == "after":
        values = {name: other[name] - before_state[name] for name in layout.parameters}
    else:
        values = {name: other[name] for name in layout.parameters}
    if all(float(v.abs().max()) == 0 for v in values.values() if v.numel()):
        raise GitoolError(f"the {kind} is exactly zero: {values_where} holds nothing to attack"
                          + (" (are before and after the same weights?)" if part == "after" else ""))

    input_spec, training, loss, defence, unknown = specs_from_facts(
        facts, kind=kind, dtype=dtype, input_shape=tuple(spec.input_shape), input_shape_known=input_shape_known,
        num_classes=spec.num_classes)
    provenance = {"gitool_version": __version__, UNKNOWN_KEY: unknown}
    return Update(model=spec, input=input_spec, loss=loss, training=training, defence=defence, kind=kind,
                  global_state=global_state, values=values, provenance=provenance)


def _source(path: str | Path) -> dict[str, str]:
    return {"path": str(path), "sha256": file_sha256(path)}


# --------------------------------------------------------------------------- export


def export_paths(output: str | Path, fmt: str, kind: str) -> dict[str, Path]:
    """The files ``export`` writes: for pt, the bundle; for npz, one list per part
    (``OUT.before.npz``, ``OUT.delta.npz`` + ``OUT.after.npz`` or ``OUT.gradient.npz``);
    both with ``OUT.facts.json`` beside them."""
    output = Path(output)
    base = output.with_suffix("") if output.suffix.lower() in (".pt", ".pth", ".npz") else output
    paths = {"facts": base.parent / f"{base.name}.facts.json"}
    if fmt == "pt":
        paths["bundle"] = output
    else:
        for part in ("before", *(("delta", "after") if kind == "delta" else ("gradient",))):
            paths[part] = base.parent / f"{base.name}.{part}.npz"
    return paths


def export_update(update: Update, output: str | Path, fmt: str | None = None, check=None) -> dict[str, Path]:
    """Write ``update`` for other tools: a ``torch.save`` bundle of plain tensors
    (loadable with ``weights_only=True``) or Flower-style ``.npz`` lists, plus a JSON
    facts file. Every file's bytes are made before the first is written."""
    output = Path(output)
    if fmt is None:
        fmt = {".pt": "pt", ".pth": "pt", ".npz": "npz"}.get(output.suffix.lower())
        if fmt is None:
            raise UsageError(f"give --format pt or npz (or an output ending in .pt or .npz), not {output.name!r}")
    if fmt not in ("pt", "npz"):
        raise UsageError(f"--format must be pt or npz, not {fmt!r}")
    layout = ModelLayout.of(update.model)
    before = {name: update.global_state[name] for name in layout.state}
    values = {name: update.values[name] for name in layout.parameters}
    value_part = "delta" if update.kind == "delta" else "gradient"
    parts = {"before": before, value_part: values}
    if update.kind == "delta":
        parts["after"] = {name: before[name] + values[name] for name in layout.parameters}
    paths = export_paths(output, fmt, update.kind)
    if check is not None:  # the caller refuses outputs that are inputs, before any work
        check(paths)
    contents: dict[Path, bytes] = {
        paths["facts"]: (json.dumps(jsonable(facts_of(update)), indent=2) + "\n").encode()}
    if fmt == "pt":
        buffer = io.BytesIO()
        torch.save({"format": BUNDLE_FORMAT, "update_kind": update.kind,
                    **{part: {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
                       for part, tensors in parts.items()}}, buffer)
        contents[paths["bundle"]] = buffer.getvalue()
    else:
        for part, tensors in parts.items():
            buffer = io.BytesIO()
            np.savez(buffer, *[t.detach().cpu().numpy() for t in tensors.values()])
            contents[paths[part]] = buffer.getvalue()
    for path, data in contents.items():
        atomic_write_bytes(path, data)
    return paths



def spec_in_weights(path: str | Path):
    """The model spec a gitool checkpoint carries (None for any other weights file)."""
    from gitool.files import read_raw
    from gitool.models import ModelSpec

    if Path(path).suffix.lower() != ".safetensors":
        return None
    try:
        raw = read_raw(path, ("checkpoint",), load_tensors=False)
        return ModelSpec.from_dict(raw.meta.get("model"))
    except GitoolError:  # not a gitool checkpoint: reading the weights reports what is wrong
        return None
