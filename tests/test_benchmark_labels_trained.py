"""benchmarks/labels_trained.py and the rlu* bound of benchmarks/labels_batch.py: the replay
of the client's path behind the bound, and the record a long grid resumes from."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("bench_labels_trained", BENCHMARKS / "labels_trained.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_rlu_star_replays_dropout_and_batch_norm_exactly(bench, capture_factory):
    from gitool.aux_stats import aux_statistics
    from gitool.capture import CaptureConfig, SampleChoice
    from gitool.files import InputSpec, TrainingSpec
    from gitool.metrics import score_counts
    from gitool.models import ModelSpec

    spec = ModelSpec(name="vgg", num_classes=10, input_shape=(3, 16, 16),
                     options={"depth": "11", "width": "4", "hidden": "16"})
    config = CaptureConfig(input=InputSpec(shape=spec.input_shape), init="default", seed=3,
                           training=TrainingSpec(batch_size=8, steps=3, lr=0.05),
                           choice=SampleChoice(dirichlet_alpha=0.5))
    update, truth = capture_factory("vgg", spec=spec, config=config)
    aux = aux_statistics(update, "synthetic", 5, 7)
    counts = bench.path_oracle(update, truth, aux)
    assert counts is not None and int(counts.sum()) == 24  # the replay drew the client's dropout masks
    assert score_counts(counts, truth.counts)["iAcc"] == 1.0  # measured: untrained, the bound is exact
    other_seed = dataclasses.replace(update, provenance={**update.provenance, "seed": 4})
    assert bench.path_oracle(other_seed, truth, aux) is None  # other masks: no bound rather than a wrong one


def test_table_reads_the_record_and_rows_are_numbered_smallest_first(bench, tmp_path):
    rows = bench.grid()
    assert len(rows) == 32 and rows[:3] == [bench.Row("lenet5", 0.5, 32, 1, "sgd"), bench.Row("lenet5", 0.5, 64, 1, "sgd"),
                                            bench.Row("lenet5", 0.5, 32, 10, "sgd")]
    assert rows[16].model == "vgg" and rows[-1] == bench.Row("vgg", 0.9, 64, 10, "fedprox")
    assert bench.parse_only("1-3,7", 32) == [1, 2, 3, 7]
    with pytest.raises(SystemExit):
        bench.parse_only("33", 32)
    record = tmp_path / "r.jsonl"
    lines = [{"row": rows[0].key(), "aux_per_class": 10, "update": i, "heldout": 0.5, "error_mass": 0.4,
              "methods": {"rlu": [1.0, 0.9 + 0.1 * i, 0.01], "rlu*": [1.0, 1.0, 0.02]}} for i in range(2)]
    record.write_text("".join(json.dumps(line) + "\n" for line in lines))
    text = bench.table(rows[:2], bench.read_record(record), 10)
    assert "| lenet5 | 50% | 32 | 1 | sgd | 0.500 | 0.400 | 0.950 | 1.000 | n/a | n/a |" in text
    assert text.count("\n") == 2  # the header, the rule and the one recorded row
    assert "| 0.900 | 1.000 | n/a | n/a |" in bench.table(rows[:1], bench.read_record(record), 10, updates=1)
