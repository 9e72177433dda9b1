"""One update in, its result files and a record out (gitool/audit/task.py): exact on clean
updates, chainable into the single commands, resumable, scored only after the attacks,
and every failure kept inside its record."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gitool.audit import prepare, run


def audit(inputs, out, methods="auto", **options):
    items, settings = prepare(inputs if isinstance(inputs, list) else [inputs], out, methods, options)
    return run(items, settings, report=False)


def attacks(record):
    return {(a["step"], a["method"]): a for a in record["attacks"]}


def test_single_sample_updates_leak_exactly_and_their_results_chain(federated_run, tmp_path, run_cli):
    out = tmp_path / "out"
    outcome = audit(federated_run, out)
    records = {r["name"]: r for r in outcome.records}
    cnn = attacks(records["round-1/0000"])
    assert cnn["labels", "bias"]["scores"]["max_abs_error"] < 1e-12
    assert cnn["features", "features"]["scores"]["relative_error"] < 1e-10
    assert cnn["reconstruct", "conv"]["scores"]["psnr"] > 200  # float64: exact to round-off
    assert cnn["reconstruct", "conv"]["evidence"]["consistent"] is True
    fcn = attacks(records["round-2/client-1"])
    assert fcn["labels", "lambda"]["scores"]["eps_error"] < 1e-10  # the smoothing factor 0.1, recovered
    assert fcn["reconstruct", "fc"]["scores"]["psnr"] > 200
    assert records["round-2/client-1"]["client"] == "1" and records["round-2/client-1"]["round"] == 2
    # the files are the single commands' own: score reads them by stem
    assert (out / "round-1" / "0000.reconstruction.safetensors").is_file()
    done = run_cli("score", out / "round-1", "--truth-dir", federated_run / "round-1", "--json")
    assert done.exit_code == 0, done.stderr
    rows = {Path(row["file"]).name: row for row in done.json()["files"]}
    assert rows["0001.reconstruction.safetensors"]["psnr"] == pytest.approx(
        attacks(records["round-1/0001"])["reconstruct", "conv"]["scores"]["psnr"])


def test_counts_of_batches_and_multi_step_updates(federated_run, tmp_path):
    outcome = audit(federated_run / "round-2", tmp_path / "out", "labels", aux="synthetic", aux_per_class=4)
    records = {r["name"]: r for r in outcome.records}
    multistep = attacks(records["client-2"])["labels", "rlu"]
    assert multistep["status"] == "done" and multistep["scores"]["iAcc"] >= 0.9  # untrained LeNet: near exact
    assert sum(multistep["evidence"]["counts"]) == 12 and sum(records["client-2"]["true_counts"]) == 12
    assert records["client-3"]["defence"] == {"dp_clip": 1.0, "dp_noise": 0.5, "prune": None}


def test_a_rerun_reuses_valid_results_and_recomputes_the_rest(run_copy, tmp_path):
    out = tmp_path / "out"
    audit(run_copy / "round-1", out)
    labels = out / "0000.labels.safetensors"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = audit(run_copy / "round-1", out)
    assert {a["status"] for r in again.records for a in r["attacks"]} == {"reused"}
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a corrupt file, a result of another update, other options: recomputed, and what reads them too
    labels.write_bytes(b"\0" * 100)
    shutil.copy(out / "0001.features.safetensors", out / "0000.features.safetensors")
    third = {r["name"]: attacks(r) for r in audit(run_copy / "round-1", out).records}
    assert [third["0000"][k]["status"] for k in (("labels", "bias"), ("features", "features"),
                                                 ("reconstruct", "conv"))] == ["done", "done", "done"]
    assert {a["status"] for a in third["0001"].values()} == {"reused"}
    assert labels.read_bytes() == before["0000.labels.safetensors"]
    fourth = audit(run_copy / "round-1", out, family="smoothing")
    assert {a["status"] for r in fourth.records for a in r["attacks"]} == {"done"}


def test_no_result_depends_on_the_truth(run_copy, tmp_path):
    """The attacks never read the truth: without it every result has the same bytes, only the scores go."""
    out = tmp_path / "out"
    audit(run_copy, out)
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.safetensors")}
    for truth in run_copy.rglob("*.truth.safetensors"):
        truth.unlink()
    items, settings = prepare([run_copy], out, "auto", {}, resume=False)
    bare = run(items, settings, report=False)
    statuses = {(r["name"], a["method"]): a["status"] for r in bare.records for a in r["attacks"]}
    # DP noise leaves no label set within the update's precision: per-sample says so, nothing else fails
    assert statuses.pop(("round-2/client-3", "per-sample")) == "failed"
    assert set(statuses.values()) <= {"done", "n/a"}
    assert len(first) == 11 and {p.relative_to(out): p.read_bytes() for p in out.rglob("*.safetensors")} == first
    record = {r["name"]: r for r in bare.records}["round-1/0000"]
    assert record["truth"] is None and all("scores" not in a for a in record["attacks"])
    # the attack's own evidence instead: the label and the image reproduce the gradient
    evidence = attacks(record)["labels", "bias"]["evidence"]
    assert evidence["consistent"] is True and evidence["residual"] < 1e-10


def test_failures_stay_in_their_records(run_copy, tmp_path, monkeypatch):
    (run_copy / "round-1" / "junk.update.safetensors").write_bytes(b"not a safetensors file")
    shutil.copy(run_copy / "round-1" / "0001.truth.safetensors", run_copy / "round-1" / "0000.truth.safetensors")
    from gitool import steps

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in feature recovery")

    monkeypatch.setattr(steps, "feature_step", broken)
    records = {r["name"]: r for r in audit(run_copy / "round-1", tmp_path / "out").records}
    assert records["junk"]["status"] == "unreadable" and "junk.update.safetensors" in records["junk"]["error"]
    first = attacks(records["0000"])
    assert first["features", "features"]["status"] == "error"
    assert "RuntimeError: a bug in feature recovery" in first["features", "features"]["reason"]
    assert first["labels", "bias"]["status"] == "done" and first["reconstruct", "conv"]["status"] == "done"
    # 0000's truth is 0001's: nothing is scored against it
    assert records["0000"]["truth"] is None and "truth of another update" in records["0000"]["truth_note"]
    assert "scores" in attacks(records["0001"])["labels", "bias"]


def test_outputs_never_overwrite_inputs(federated_run, tmp_path):
    """A result name that is a link to an input is refused before anything is written."""
    from gitool.errors import UsageError

    shutil.copy(federated_run / "round-1" / "0000.update.safetensors", tmp_path / "a.update.safetensors")
    (tmp_path / "a.labels.safetensors").symlink_to(tmp_path / "a.update.safetensors")
    with pytest.raises(UsageError, match="is also an input"):
        prepare([tmp_path / "a.update.safetensors"], tmp_path, "labels")


def test_options_no_selected_method_takes_are_refused(federated_run, tmp_path):
    from gitool.errors import UsageError

    with pytest.raises(UsageError, match="--time-budget: no method of --methods auto,features,analytic takes it"):
        prepare([federated_run], tmp_path / "out", "auto", {"time_budget": 5.0})
    with pytest.raises(UsageError, match="--aux-per-class must be"):
        prepare([federated_run], tmp_path / "out", "labels", {"aux_per_class": 0})


def test_the_command_exits_1_when_an_update_cannot_be_read(run_copy, tmp_path, run_cli):
    (run_copy / "round-1" / "junk.update.safetensors").write_bytes(b"not a safetensors file")
    done = run_cli("audit", run_copy / "round-1", "--out-dir", tmp_path / "out", "--methods", "labels", "--json")
    assert done.exit_code == 1
    assert "1 update(s) or attack(s) of 3 updates could not be audited (first:" in done.stderr
    document = done.json()
    assert document["audited"] == 3 and document["findings"]["risk"] == "elevated"
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "0001.labels.safetensors").is_file()


def test_lpips_from_local_weights_scores_the_images(tmp_path):
    """LPIPS with local weights (random ones here): exact reconstructions are at distance 0."""
    from safetensors.torch import save_file

    from gitool.files import LossSpec, TrainingSpec
    from gitool.models import ModelSpec
    from tests.test_metrics_images import random_lpips_state

    from .conftest import capture_into

    spec = ModelSpec(name="fcn4", num_classes=10, input_shape=(3, 32, 32), last_bias=False,
                     options={"widths": "64,32,16", "hidden_bias": "false"})
    capture_into(tmp_path / "runs", "c", spec=spec, seed=1, init="default", training=TrainingSpec(dtype="float64"),
                 loss=LossSpec(family="smoothing", label_smoothing=0.2))
    save_file(random_lpips_state(), str(tmp_path / "alex.safetensors"))
    items, settings = prepare([tmp_path / "runs"], tmp_path / "out", "auto", lpips_weights=tmp_path /
                              "alex.safetensors")
    scores = attacks(run(items, settings, report=False).records[0])["reconstruct", "fc"]["scores"]
    assert scores["psnr"] > 200 and scores["lpips"] == pytest.approx(0.0, abs=1e-6)


def test_any_method_option_passes_through_and_optimize_runs(federated_run, tmp_path, run_cli):
    from gitool.audit.run import method_options
    from gitool.errors import UsageError

    assert method_options(["optimizer=lbfgs", "iterations=3", "signed=false"], "optimize") == {
        "optimizer": "lbfgs", "iterations": 3, "signed": False}
    with pytest.raises(UsageError, match="--option 'itrations=3': give KEY=VALUE with KEY an option"):
        method_options(["itrations=3"], "optimize")
    with pytest.raises(UsageError, match="--option iterations: expected int, got 'many'"):
        method_options(["iterations=many"], "optimize")
    done = run_cli("audit", federated_run / "round-1" / "0000.update.safetensors", "--out-dir", tmp_path / "out",
                   "--methods", "conv,optimize", "--option", "optimizer=lbfgs", "--option", "iterations=1", "--json")
    assert done.exit_code == 0, done.stderr
    optimized = tmp_path / "out" / "optimize" / "0000.reconstruction.safetensors"  # the step's second method
    from gitool.files import load_result

    result = load_result(optimized)
    assert result.method == "optimize" and result.options["iterations"] == 1
    assert (tmp_path / "out" / "0000.reconstruction.safetensors").is_file()  # conv's, the main one
    again = run_cli("audit", federated_run / "round-1" / "0000.update.safetensors", "--out-dir", tmp_path / "out",
                    "--methods", "conv,optimize", "--option", "optimizer=lbfgs", "--option", "iterations=2", "--json")
    assert again.exit_code == 0 and load_result(optimized).options["iterations"] == 2  # other options: recomputed


def test_one_model_build_per_process_and_the_recording_names_client_and_round(tmp_path, monkeypatch):
    """A Flower recording's provenance names the client and the round; the analytic
    method's model is built once for all updates of one model in a worker."""
    from gitool import models
    from gitool.files import TrainingSpec

    from .conftest import capture_into

    for i in range(3):
        capture_into(tmp_path / "rec" / "round-007", f"client-{i}", seed=i, training=TrainingSpec(dtype="float64"),
                     provenance={"flower": {"server_round": 7, "client": f"site-{i}"}})
    built = []
    original = models.build_model
    monkeypatch.setattr(models, "build_model", lambda spec: built.append(spec.name) or original(spec))
    models._MODELS.clear()
    records = audit(tmp_path / "rec", tmp_path / "out").records
    assert built == ["lenet"]
    assert [(r["client"], r["round"]) for r in records] == [("site-0", 7), ("site-1", 7), ("site-2", 7)]
    assert all(attacks(r)["reconstruct", "conv"]["scores"]["psnr"] > 200 for r in records)


def test_a_one_step_batch_is_reconstructed_through_its_per_sample_labels(tmp_path):
    """Counts stay the batch's main labels; per-sample labels (under OUT/per-sample/) are
    what features and the analytic reconstruction read: the whole batch, exact."""
    from gitool.files import TrainingSpec
    from gitool.models import ModelSpec

    from .conftest import capture_into

    spec = ModelSpec(name="fcn4", num_classes=10, input_shape=(3, 8, 8), options={"widths": "64,32,16"})
    capture_into(tmp_path / "run", "batch", spec=spec, seed=6, init="default",
                 training=TrainingSpec(batch_size=4, dtype="float64"))
    outcome = audit(tmp_path / "run", tmp_path / "out")
    done = attacks(outcome.records[0])
    assert done["labels", "ilrg"]["main"] and done["labels", "ilrg"]["scores"]["iAcc"] == 1.0
    assert done["labels", "per-sample"]["status"] == "done" and not done["labels", "per-sample"]["main"]
    assert (tmp_path / "out" / "per-sample" / "batch.labels.safetensors").is_file()
    assert done["features", "features"]["scores"]["relative_error"] < 1e-10
    assert done["reconstruct", "fc"]["scores"]["psnr"] > 200
