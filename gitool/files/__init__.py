"""gitool's files: one safetensors file per artefact, metadata as JSON in its header.

Only this package reads or writes headers. Every other module asks it for typed,
validated objects and hands typed objects back:

- :mod:`~gitool.files.container`: the frame every kind shares (``gitool.kind``,
  ``gitool.version``, ``gitool.meta``), canonical bytes, atomic writes, file naming;
- :mod:`~gitool.files.update`: :class:`Update` (what the client sends) and its classifier
  (:class:`LastLayer`);
- :mod:`~gitool.files.truth`: :class:`Truth` (what the client used), written as a pair
  with its update;
- :mod:`~gitool.files.result`: :class:`Result` (labels, features, reconstruction) and the
  checks that tie results and truths to their update;
- :mod:`~gitool.files.checkpoint`: :class:`Checkpoint` (weights with their model spec);
- :mod:`~gitool.files.foreign`: other tools' torch (weights-only) and ``.npz`` files.

The facts inside an update (input, loss, training, defence) are the specs of
:mod:`gitool.specs`, each validated once. Reading a file never executes code: safetensors
holds raw tensors only, and JSON is data. docs/FORMAT.md documents every kind, and
docs/schemas/ holds a JSON schema per kind.
"""

from gitool.files.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from gitool.files.container import (
    FORMAT_VERSION,
    KINDS,
    RESULT_KINDS,
    SUFFIX,
    TIMING_KEYS,
    RawFile,
    check_header,
    jsonable,
    atomic_write_bytes,
    canonical_json,
    encode_file,
    existing_file,
    expand_inputs,
    file_sha256,
    output_name,
    read_raw,
    stem_of,
)
from gitool.files.foreign import read_npz_arrays, read_torch_object, read_torch_state
from gitool.files.result import (
    RESULT_TENSORS,
    Result,
    check_fits_update,
    load_result,
    new_result,
    pointed_update,
    save_result,
)
from gitool.files.truth import Truth, load_truth, save_capture, save_truth
from gitool.files.update import (
    GLOBAL_PREFIX,
    VALUE_PREFIX,
    LastLayer,
    Update,
    load_state,
    load_update,
    save_update,
    update_tensors_and_meta,
)
from gitool.specs import DefenceSpec, InputSpec, LossSpec, SpecError, TrainingSpec, coerce_field

__all__ = [
    "FORMAT_VERSION", "KINDS", "RESULT_KINDS", "RESULT_TENSORS", "SUFFIX", "TIMING_KEYS", "Checkpoint",
    "DefenceSpec", "GLOBAL_PREFIX", "InputSpec", "LastLayer", "LossSpec", "RawFile", "Result", "SpecError",
    "TrainingSpec", "Truth", "Update", "VALUE_PREFIX", "atomic_write_bytes", "canonical_json", "check_fits_update", "check_header",
    "coerce_field", "encode_file", "existing_file", "expand_inputs", "file_sha256", "jsonable", "load_checkpoint", "load_result",
    "load_state", "load_truth", "load_update", "new_result", "output_name", "pointed_update", "read_npz_arrays",
    "read_raw", "read_torch_object", "read_torch_state", "save_capture", "save_checkpoint", "save_result",
    "save_truth", "save_update", "stem_of", "update_tensors_and_meta",
]
