"""benchmarks/reconstruct_optimize.py: the per-image record that lets a long table resume."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reconstruct_optimize.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_reconstruct_optimize", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_record_resumes_only_runs_with_the_same_settings(bench, tmp_path):
    path = tmp_path / "rows.jsonl"
    first = bench.Record(str(path), {"iterations": 50})
    first.add(("lenet", "mixup", "true", "g", 0), {"psnr": 30.0, "ssim": 0.9, "cpu_s": 2.0, "iterations": 50})
    again = bench.Record(str(path), {"iterations": 50})
    assert again.get(("lenet", "mixup", "true", "g", 0))["psnr"] == 30.0
    assert again.get(("lenet", "mixup", "true", "g", 1)) is None
    assert bench.Record(str(path), {"iterations": 60}).get(("lenet", "mixup", "true", "g", 0)) is None
    assert len(path.read_text().splitlines()) == 1


def test_run_row_reuses_recorded_images_without_reconstructing(bench, tmp_path, monkeypatch):
    record = bench.Record(str(tmp_path / "rows.jsonl"), {})
    for index, value in enumerate((20.0, 30.0)):
        record.add(("lenet", "smoothing", "true", "g", index),
                   {"psnr": value, "ssim": 0.5, "cpu_s": 1.0, "iterations": 10})

    def forbidden(*args, **kwargs):
        raise AssertionError("a recorded image was reconstructed again")

    monkeypatch.setattr(bench, "reconstruct", forbidden)
    row, note = bench.run_row([None, None], [None, None], "true", "g", {"iterations": 10}, record,
                              ("lenet", "smoothing"))
    assert row == (25.0, 0.5, 2, 10.0) and note == ""
