"""Label counts through `gitool.labels.recover_labels`: known answers on captured updates."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gitool.capture import CaptureConfig, SampleChoice
from gitool.errors import UsageError
from gitool.files import InputSpec, TrainingSpec
from gitool.labels import recover_labels
from gitool.metrics import score_counts
from gitool.models import ModelSpec

LENET = ModelSpec(name="lenet", num_classes=10, input_shape=(3, 16, 16), activation="relu")
AUX = {"aux": "synthetic", "aux_per_class": 10, "seed": 7}


def capture_update(capture_factory, name, classes=None, batch=6, steps=1, spec=LENET, alpha=None, seed=0,
                   optimizer="sgd", lr=0.01):
    config = CaptureConfig(
        input=InputSpec(shape=spec.input_shape),
        training=TrainingSpec(batch_size=batch, steps=steps, lr=lr, optimizer=optimizer,
                              momentum=0.9 if optimizer == "momentum" else 0.0,
                              prox_mu=0.5 if optimizer == "fedprox" else 0.0),
        choice=SampleChoice(classes=classes, dirichlet_alpha=alpha), init="default", seed=seed)
    return capture_factory(name, spec=spec, config=config)


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """B = 6 with a repeated class, one step, untrained LeNet."""
    from conftest import make_capture

    tmp = tmp_path_factory.mktemp("one_step")
    return capture_update(lambda name, **kw: make_capture(tmp, name, **kw), "repeat", classes=[3, 3, 0, 7, 1, 3])


@pytest.mark.parametrize("method", ["llg", "llg+", "zlg", "ilrg", "rlu"])
def test_one_step_untrained_every_method_recovers_repeated_counts(one_step, method):
    update, truth = one_step
    outcome = recover_labels(update, method, AUX)
    assert outcome.counts.tolist() == truth.counts.tolist()
    assert outcome.labels is None  # B > 1: counts only
    assert outcome.diagnostics["method"] == method and outcome.diagnostics["num_samples"] == 6


def test_one_step_distinct_labels_yin(capture_factory):
    update, truth = capture_update(capture_factory, "distinct", classes=[9, 2, 5, 0, 4], batch=5)
    assert recover_labels(update, "yin", {}).counts.tolist() == truth.counts.tolist()


def test_idlg_single_sample_writes_a_one_hot_row(capture_factory):
    update, truth = capture_update(capture_factory, "single", classes=[6], batch=1)
    outcome = recover_labels(update, "idlg", {})
    assert outcome.counts.tolist() == truth.counts.tolist()
    assert outcome.labels.tolist() == torch.eye(10, dtype=torch.float64)[6:7].tolist()


def test_rlu_system_rebuilt_from_the_truth_reproduces_the_bias_gradient(one_step):
    from gitool.attacks.rlu import bias_system, class_confidence

    update, truth = one_step
    model = update.build_model()
    with torch.no_grad():
        probs = torch.softmax(model(truth.inputs.to(torch.float64)), dim=1)
    confidence = class_confidence(probs, truth.labels.argmax(dim=1), 10)  # S from the true batch
    system = bias_system(confidence)
    observed = -update.num_samples * update.last_layer(model).bias_grad
    assert torch.allclose(system @ truth.counts.to(torch.float64), observed, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "fedprox"])
def test_counts_always_sum_to_n(capture_factory, optimizer):
    update, _ = capture_update(capture_factory, f"sum-{optimizer}", batch=8, steps=3, alpha=0.5,
                               optimizer=optimizer, lr=0.05 if optimizer == "momentum" else 0.01)
    for method in ("llg", "llg+", "zlg", "ilrg", "rlu"):
        assert int(recover_labels(update, method, AUX).counts.sum()) == 24


def test_multi_step_rlu_beats_the_baselines(capture_factory):
    scores = {m: 0.0 for m in ("llg", "llg+", "zlg", "ilrg", "rlu")}
    for seed in (1, 2):
        update, truth = capture_update(capture_factory, f"multi{seed}", batch=16, steps=8, alpha=0.5, seed=seed,
                                       lr=0.05)
        for method in scores:
            scores[method] += score_counts(recover_labels(update, method, AUX).counts, truth.counts)["iAcc"] / 2
    assert scores["rlu"] >= 0.99
    assert all(scores["rlu"] > value for method, value in scores.items() if method != "rlu"), scores


def test_midpoint_drift_agrees_with_the_simulation_and_rlu_published_on_an_untrained_model(capture_factory):
    """Measured: on an untrained LeNet (B = 16, m = 8, lr 0.05) RLU with the midpoint
    drift model, RLU with the full simulation and the published estimator all recover
    every count of two updates; on one-step updates so does rlu-published, since an
    untrained model's softmax is the same near-uniform vector for every class."""
    for seed in (1, 2):
        update, truth = capture_update(capture_factory, f"mid{seed}", batch=16, steps=8, alpha=0.5, seed=seed,
                                       lr=0.05)
        simulated = recover_labels(update, "rlu", AUX)
        midpoint = recover_labels(update, "rlu", {**AUX, "drift": "midpoint"})
        assert midpoint.options["drift"] == "midpoint" and simulated.options["drift"] == "simulate"
        assert midpoint.diagnostics["refinement_rounds"] == 1  # no batch norm: one solve
        for outcome in (simulated, midpoint, recover_labels(update, "rlu-published", AUX)):
            assert score_counts(outcome.counts, truth.counts)["iAcc"] == 1.0, outcome.method
        update, truth = capture_update(capture_factory, f"pub{seed}", batch=16, alpha=0.5, seed=seed)
        assert recover_labels(update, "rlu-published", AUX).counts.tolist() == truth.counts.tolist()
    with pytest.raises(UsageError, match="--drift must be one of simulate, midpoint"):
        recover_labels(update, "rlu", {**AUX, "drift": "halfway"})


def test_rlu_published_needs_the_bias(capture_factory):
    spec = dataclasses.replace(LENET, last_bias=False)
    update, _ = capture_update(capture_factory, "nobias-pub", classes=[1, 1, 4, 8, 2, 2], spec=spec)
    with pytest.raises(UsageError, match="rlu-published reads the last-layer bias update"):
        recover_labels(update, "rlu-published", AUX)


def test_rlu_reports_its_refinement(capture_factory):
    update, _ = capture_update(capture_factory, "refine", batch=8, steps=4, alpha=0.5)
    outcome = recover_labels(update, "rlu", AUX)
    assert 1 <= outcome.diagnostics["refinement_rounds"] <= 3
    assert len(outcome.diagnostics["labels_moved"]) == outcome.diagnostics["refinement_rounds"]
    assert outcome.diagnostics["aux_size"] == 100 and outcome.diagnostics["signal"] == "bias"
    assert outcome.summary[0].startswith("rlu: 32 labels")


def test_rlu_without_a_last_layer_bias_uses_the_weight_rows(capture_factory):
    spec = dataclasses.replace(LENET, last_bias=False)
    update, truth = capture_update(capture_factory, "nobias", classes=[1, 1, 4, 8, 2, 2], spec=spec)
    outcome = recover_labels(update, "rlu", AUX)
    assert outcome.diagnostics["signal"] == "weight_row_sums"
    assert outcome.counts.tolist() == truth.counts.tolist()
    with pytest.raises(UsageError, match="ilrg needs a last-layer bias"):
        recover_labels(update, "ilrg", {})


def test_aux_statistics_are_computed_once_per_global_model(one_step):
    from gitool.aux_stats import aux_statistics

    update, _ = one_step
    first = aux_statistics(update, "synthetic", 10, 7)
    assert aux_statistics(update, "synthetic", 10, 7) is first
    assert aux_statistics(update, "synthetic", 5, 7) is not first
    assert first.size == 100 and torch.bincount(first.labels).tolist() == [10] * 10


def test_bad_inputs_give_clear_errors(one_step):
    update, _ = one_step
    for method in ("zlg", "llg+", "rlu"):
        with pytest.raises(UsageError, match=f"--method {method.replace('+', '.')} needs --aux SOURCE"):
            recover_labels(update, method, {})
    with pytest.raises(UsageError, match="idlg recovers one label"):
        recover_labels(update, "idlg", {})
    from gitool.specs import SpecError

    with pytest.raises(SpecError, match="optimizer must be one of sgd, momentum, fedprox"):  # no spec holds adam
        dataclasses.replace(update.training, optimizer="adam")
    with pytest.raises(UsageError, match=r"--aux-per-class must be in \[1, 100000\], got 0"):
        recover_labels(update, "rlu", {**AUX, "aux_per_class": 0})


def test_yin_refuses_more_samples_than_classes(capture_factory):
    update, _ = capture_update(capture_factory, "many", batch=12, alpha=0.5)
    with pytest.raises(UsageError, match="yin assumes N distinct labels"):
        recover_labels(update, "yin", {})


def test_score_aggregates_counts_over_a_folder(capture_factory, run_cli, tmp_path):
    from gitool.files import new_result, output_name, save_result

    for name, classes in (("0001", [2, 2, 5, 7]), ("0002", [1, 3, 3, 3])):
        update, truth = capture_update(capture_factory, name, classes=classes, batch=4)
        outcome = recover_labels(update, "ilrg", {})
        result = new_result("labels", {"counts": outcome.counts}, method="ilrg", update=update,
                            diagnostics=outcome.diagnostics)
        save_result(result, tmp_path / output_name(update.path, "labels"))
    out = run_cli("score", tmp_path, "--truth-dir", tmp_path, "--json")
    assert out.exit_code == 0, out.stderr
    document = out.json()
    assert [row["iAcc"] for row in document["files"]] == [1.0, 1.0]
    assert document["summary"]["labels"] == {"files": 2, "cAcc": 1.0, "iAcc": 1.0, "LnAcc": 1.0}
    table = run_cli("score", tmp_path, "--truth-dir", tmp_path)
    assert "iAcc" in table.stdout and "mean of 2" in table.stdout


def test_refinement_stops_once_a_round_moves_almost_no_labels():
    from gitool.labels_batch import _refine

    system = torch.eye(3, dtype=torch.float64) - torch.full((3, 3), 1 / 3, dtype=torch.float64)
    observed = system @ torch.tensor([50.0, 30.0, 20.0], dtype=torch.float64)
    calls = []

    def system_for(estimate):
        calls.append(estimate.clone())
        return system

    # Start 10 labels away: the first round moves them, the second moves none and stops.
    counts, diagnostics = _refine(system_for, torch.tensor([40.0, 40.0, 20.0], dtype=torch.float64), 1.0, observed,
                                  100, rounds=5)
    assert counts.tolist() == [50, 30, 20]
    assert diagnostics["labels_moved"] == [10, 0] and diagnostics["refinement_rounds"] == 2 and len(calls) == 2
    # With a 10% tolerance the first round's 10 moved labels already end it.
    _, diagnostics = _refine(system_for, torch.tensor([40.0, 40.0, 20.0], dtype=torch.float64), 1.0, observed,
                             100, rounds=5, tolerance=0.1)
    assert diagnostics["labels_moved"] == [10]


def test_runaway_drift_counts_give_way_to_the_global_models():
    from gitool.labels_batch import _unless_runaway

    system = torch.eye(3, dtype=torch.float64) - torch.full((3, 3), 1 / 3, dtype=torch.float64)
    observed = system @ torch.tensor([50.0, 30.0, 20.0], dtype=torch.float64)  # the global system fits exactly
    runaway = (torch.tensor([90, 5, 5]), {"residual": 0.6})
    counts, diagnostics = _unless_runaway(runaway, system, observed, 100)
    assert counts.tolist() == [50, 30, 20] and "fallback" in diagnostics and diagnostics["drift_residual"] == 0.6
    assert diagnostics["residual"] < 1e-9
    close = (torch.tensor([48, 32, 20]), {"residual": 0.05})  # fits about as well: the drift model stays
    counts, diagnostics = _unless_runaway(close, system, observed, 100)
    assert counts.tolist() == [48, 32, 20] and "fallback" not in diagnostics


def test_batch_draws_average_random_splits_and_zero_is_the_mean_batch(capture_factory):
    """--batch-draws R averages RLU's simulated system over R seeded splits of the counts
    into the client's batches; 0 (the default) keeps the mean batch. On an untrained
    LeNet both recover every count, the same seed gives the same counts, and the option
    is recorded as used."""
    update, truth = capture_update(capture_factory, "draws", batch=16, steps=8, alpha=0.5, seed=3, lr=0.05)
    plain = recover_labels(update, "rlu", AUX)
    drawn = recover_labels(update, "rlu", {**AUX, "batch_draws": 2})
    assert plain.options["batch_draws"] == 0 and drawn.options["batch_draws"] == 2
    for outcome in (plain, drawn):
        assert score_counts(outcome.counts, truth.counts)["iAcc"] == 1.0
    assert recover_labels(update, "rlu", {**AUX, "batch_draws": 2}).counts.tolist() == drawn.counts.tolist()
    with pytest.raises(UsageError, match="--batch-draws must be in"):
        recover_labels(update, "rlu", {**AUX, "batch_draws": 65})
