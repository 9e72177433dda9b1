"""files: typed round trips, validation with one clear line, atomic writes."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch

from gitool.errors import GitoolError
from gitool.files import (
    Result,
    file_sha256,
    load_result,
    load_update,
    new_result,
    output_name,
    read_raw,
    save_result,
    stem_of,
)


def _rewrite_header(path, mutate):
    """Edit a safetensors header in place (to fake other versions, kinds, NaN...)."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    mutate(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + size :])


def test_update_round_trip_keeps_every_spec(capture_factory, tmp_path):
    update, truth = capture_factory()
    assert update.kind == "gradient" and update.training.batch_size == 1
    assert update.model.name == "lenet" and update.input.shape == (3, 16, 16)
    assert set(update.values) == {n for n, _ in update.build_model().named_parameters()}
    assert update.sha256 == file_sha256(update.path)
    layer = update.last_layer()
    assert layer.weight.dtype == torch.float64 and layer.weight_grad.shape == (10, 192)
    assert truth.counts.sum() == 1 and truth.features.shape == (1, 192)


def test_results_point_back_to_their_update(capture_factory, tmp_path):
    update, _ = capture_factory()
    result = new_result("labels", {"labels": torch.full((1, 10), 0.1)}, method="test", update=update,
                        diagnostics={"lambda": 2.5})
    path = save_result(result, tmp_path / "c.labels.safetensors")
    loaded = load_result(path)
    assert loaded.kind == "labels" and loaded.method == "test" and loaded.diagnostics["lambda"] == 2.5
    assert loaded.source["sha256"] == update.sha256
    loaded.check_source(update)
    other, _ = capture_factory("other", seed=9)
    with pytest.raises(GitoolError, match="another update"):
        loaded.check_source(other)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda h: h["__metadata__"].update({"gitool.version": "99"}), "newer than this gitool"),
        (lambda h: h["__metadata__"].update({"gitool.kind": "truth"}), "is a truth file"),
        (lambda h: h["__metadata__"].pop("gitool.kind"), "without gitool metadata"),
        (lambda h: h["__metadata__"].update({"gitool.meta": "{not json"}), "gitool.meta: not valid JSON"),
    ],
)
def test_bad_headers_give_one_clear_line(capture_factory, mutate, message):
    update, _ = capture_factory()
    _rewrite_header(update.path, mutate)
    with pytest.raises(GitoolError, match=message):
        load_update(update.path)


def test_corrupt_missing_and_nan_files(capture_factory, tmp_path):
    update, _ = capture_factory()
    truncated = tmp_path / "t.update.safetensors"
    truncated.write_bytes(update.path.read_bytes()[:100])
    with pytest.raises(GitoolError, match="not a readable safetensors"):
        read_raw(truncated)
    with pytest.raises(GitoolError, match="no such file"):
        load_update(tmp_path / "absent.safetensors")
    nan = new_result("features", {"features": torch.tensor([[float("nan"), 1.0]])}, method="x", update=None)
    save_result(nan, tmp_path / "nan.features.safetensors")
    with pytest.raises(GitoolError, match="NaN"):
        load_result(tmp_path / "nan.features.safetensors")


def test_shape_mismatch_between_update_and_model(capture_factory):
    update, _ = capture_factory()

    def shrink(header):
        meta = json.loads(header["__metadata__"]["gitool.meta"])
        meta["model"]["num_classes"] = 7
        header["__metadata__"]["gitool.meta"] = json.dumps(meta)

    _rewrite_header(update.path, shrink)
    with pytest.raises(GitoolError, match="do not fit the model"):
        load_update(update.path)


def test_failed_write_keeps_the_existing_file(tmp_path):
    path = tmp_path / "r.labels.safetensors"
    save_result(new_result("labels", {"counts": torch.tensor([1, 2])}, method="first", update=None), path)
    before = path.read_bytes()
    bad = Result(kind="labels", tensors={"nothing": torch.zeros(1)}, method="second")
    with pytest.raises(GitoolError):
        save_result(bad, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.labels.safetensors"]  # no temp file left


def test_output_names_keep_the_input_stem():
    assert stem_of("runs/0007.update.safetensors") == "0007"
    assert output_name("runs/0007.update.safetensors", "labels") == "0007.labels.safetensors"
    assert stem_of("x.safetensors") == "x"


def test_interrupted_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    import os

    path = tmp_path / "r.labels.safetensors"
    save_result(new_result("labels", {"counts": torch.tensor([1, 2])}, method="first", update=None), path)
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_result(new_result("labels", {"counts": torch.tensor([5, 5])}, method="second", update=None), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.labels.safetensors"]


def test_build_model_keeps_float64_weights_exact(capture_factory):
    update, _ = capture_factory()
    weight = update.global_state["classifier.weight"].to(torch.float64) + 1e-12  # not a float32 number
    update.global_state["classifier.weight"] = weight
    model = update.build_model(dtype=torch.float64)
    assert torch.equal(model.classifier.weight.detach(), weight)


@pytest.mark.parametrize("section,field,value,message", [
    ("training", "lr", "nan", "metadata training.lr: expected a number, got 'nan'"),
    ("training", "batch_size", 2.5, "metadata training.batch_size: expected an integer"),
    ("input", "shape", [3, 16], "metadata input.shape: expected 3 values"),
    ("loss", "label_smoothing_range", "0:1", "metadata loss.label_smoothing_range: expected a list"),
    ("defence", "prune", True, "metadata defence.prune: expected a number"),
    ("training", "learning_rate", 0.1, "unknown field(s) learning_rate"),
])
def test_update_metadata_values_are_type_checked(capture_factory, section, field, value, message):
    """Wrong types in the metadata used to load as they were (lr the string 'nan')."""
    update, _ = capture_factory()

    def mutate(header):
        meta = json.loads(header["__metadata__"]["gitool.meta"])
        meta[section][field] = value
        header["__metadata__"]["gitool.meta"] = json.dumps(meta)

    _rewrite_header(update.path, mutate)
    with pytest.raises(GitoolError, match=re.escape(message)):
        load_update(update.path)


def test_last_layer_finds_the_classifier_once_and_not_after_a_replace(tmp_path):
    import dataclasses

    from conftest import make_capture

    update, _ = make_capture(tmp_path)
    first = update.last_layer()
    assert update._classifier_names == (first.weight_name, first.bias_name)
    again = update.last_layer()
    assert torch.equal(again.weight_grad, first.weight_grad) and again.bias_name == first.bias_name
    assert dataclasses.replace(update)._classifier_names is None  # another spec may name other parameters


def test_hash_pass_finds_a_nan_wherever_blocks_cut_the_elements(tmp_path, monkeypatch):
    """The one pass that hashes an update also checks the tensors left unread: blocks of
    an odd size cut elements of every dtype, and a NaN or inf anywhere is still found."""
    import random

    import gitool.codec as codec
    from gitool.codec import TensorFile, encode
    from gitool.files.container import file_sha256, sha256_checking_finite

    monkeypatch.setattr(codec, "CHUNK_BYTES", 4096 + 3)
    rng = random.Random(0)
    for trial in range(60):
        tensors = {f"t{i}": torch.randn(rng.randint(0, 700), dtype=rng.choice([torch.float32, torch.float64]))
                   for i in range(6)}
        tensors["i"] = torch.arange(rng.randint(1, 50))
        bad = rng.choice([None, "t0", "t3", "t5"])
        if bad and tensors[bad].numel():
            tensors[bad][rng.randrange(tensors[bad].numel())] = rng.choice([float("nan"), float("inf")])
        else:
            bad = None
        path = tmp_path / f"{trial}.safetensors"
        path.write_bytes(encode(tensors, {"a": "b"}))
        with TensorFile(path, "x") as handle:
            entries = dict(handle.entries)
        if bad is None:
            assert sha256_checking_finite(path, entries, list(entries)) == file_sha256(path)
        else:
            with pytest.raises(GitoolError, match=f"tensor '{bad}' holds NaN"):
                sha256_checking_finite(path, entries, list(entries))


def test_all_finite_by_sum_and_by_element():
    from gitool.files.container import all_finite

    assert all_finite(torch.ones(1000)) and all_finite(torch.empty(0))
    huge = torch.full((10,), 3e38)  # finite, yet the float32 sum overflows: the element test decides
    assert not torch.isfinite(huge.sum()) and all_finite(huge)
    for bad in (float("nan"), float("inf"), float("-inf")):
        values = torch.ones(1000, dtype=torch.float64)
        values[537] = bad
        assert not all_finite(values)
    both = torch.ones(4)
    both[0], both[1] = float("inf"), float("-inf")  # inf - inf = NaN: still refused
    assert not all_finite(both)
