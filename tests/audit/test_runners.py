"""Where the tasks run (gitool/audit/runners.py): worker processes give the records a single
process gives, Ctrl-C keeps what finished, and on a real Dask cluster a killed worker costs
its tasks only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gitool.audit import prepare, run
from .conftest import capture_into

SLOW = 24  # FedAvg updates whose RLU counts take a noticeable time each


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory) -> Path:
    from gitool.files import TrainingSpec

    root = tmp_path_factory.mktemp("fedavg") / "runs"
    for i in range(SLOW):
        capture_into(root, f"{i:04d}", seed=i, training=TrainingSpec(batch_size=4, steps=3), init="default")
    return root


COUNTS = {"aux": "synthetic", "aux_per_class": 4}


def without_timings(records):
    return [{k: ([{kk: vv for kk, vv in a.items() if kk != "seconds"} for a in v] if k == "attacks" else v)
             for k, v in r.items() if k != "seconds"} for r in records]


def test_worker_processes_give_what_one_process_gives(federated_run, tmp_path):
    outcomes = {}
    for workers in (1, 2):
        items, settings = prepare([federated_run], tmp_path / str(workers), "auto", COUNTS)
        outcomes[workers] = run(items, settings, workers=workers, context={"methods": "auto"})
    one, two = outcomes[1], outcomes[2]
    strip = str(tmp_path / "1"), str(tmp_path / "2")
    assert str(without_timings(one.records)).replace(strip[0], "OUT") == \
        str(without_timings(two.records)).replace(strip[1], "OUT")
    assert (tmp_path / "1" / "report.html").read_bytes() == (tmp_path / "2" / "report.html").read_bytes()


def _end_group(process: subprocess.Popen) -> None:
    """Kill what is left of a test's process group (its workers, a cluster)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def gitool(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen([sys.executable, "-m", "gitool", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


def test_ctrl_c_keeps_finished_results_and_a_rerun_completes(fedavg_run, tmp_path):
    from gitool.files import load_result

    out = tmp_path / "out"
    argv = ["audit", str(fedavg_run), "--out-dir", str(out), "--methods", "labels", "--aux", "synthetic",
            "--aux-per-class", "4", "--workers", "2"]
    process = gitool(*argv)
    deadline = time.monotonic() + 240
    while len(list(out.glob("*.labels.safetensors"))) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        _end_group(process)
        raise
    if process.returncode == 0:
        pytest.skip("the audit finished before Ctrl-C arrived (machine too fast for this test's window)")
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    with pytest.raises(ProcessLookupError):  # no worker left behind
        for _ in range(100):
            os.killpg(process.pid, 0)
            time.sleep(0.1)
    import json

    summary = json.loads((out / "summary.json").read_text())
    finished = sorted(out.glob("*.labels.safetensors"))
    # a result written just before Ctrl-C may belong to a task whose record never came back
    assert summary["audit"]["interrupted"] and 1 <= summary["audit"]["audited"] <= len(finished) < SLOW
    assert all(load_result(path).kind == "labels" for path in finished)
    assert not list(out.glob(".*gitool-tmp"))
    rerun = gitool(*argv, "--json")
    try:
        stdout, stderr = rerun.communicate(timeout=300)
    finally:
        _end_group(rerun)
    assert rerun.returncode == 0, stderr
    assert json.loads(stdout)["audited"] == SLOW
    import csv

    rows = list(csv.DictReader((out / "audit.csv").open()))
    statuses = {row["status"] for row in rows}
    assert statuses == {"done", "reused"} and sum(row["status"] == "reused" for row in rows) >= len(finished) - 2


def test_a_dask_worker_killed_mid_audit_costs_only_its_tasks(fedavg_run, tmp_path):
    distributed = pytest.importorskip("distributed")
    from gitool.files import load_result

    out = tmp_path / "out"
    items, settings = prepare([fedavg_run], out, "labels", COUNTS)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as cluster, distributed.Client(cluster) as client:
        pids = client.run(os.getpid)
        victim_address, victim = sorted(pids.items())[0]
        killed = []

        def kill_once(record):
            if not killed:
                os.kill(victim, signal.SIGKILL)
                killed.append(record["name"])

        outcome = run(items, settings, scheduler=client, on_record=kill_once)
        events = [msg for _, msg in client.get_events(victim_address) if msg.get("action") == "remove-worker"]
        alive = set(client.run(os.getpid).values())
    assert killed and victim not in alive
    assert len(outcome.records) == SLOW and {r["status"] for r in outcome.records} == {"ok"}
    assert all(r["attacks"][0]["status"] in ("done", "reused") for r in outcome.records)
    for record in outcome.records:
        assert load_result(record["attacks"][0]["output"]).source["sha256"] == record["sha256"]
    # the scheduler took the killed worker's tasks back (running, queued or finished but not yet fetched)
    assert events and events[0]["processing-tasks"] | events[0]["lost-computed-tasks"]


FAKE_JOBQUEUE = '''
"""Stand-in for dask_jobqueue in tests: SLURMCluster's jobs become local worker processes."""
from distributed import LocalCluster


class SLURMCluster(LocalCluster):
    def __init__(self, cores, processes, memory, walltime, **kwargs):
        super().__init__(n_workers=0, threads_per_worker=1, processes=True, dashboard_address=None,
                         silence_logs=50)
        self.per_job = processes

    def scale(self, jobs=0, **kwargs):
        return super().scale(min(2, jobs * self.per_job))
'''


def test_the_readme_slurm_script_runs_as_printed(federated_run, tmp_path):
    """README's audit_on_slurm.py, with Slurm's jobs as local processes."""
    pytest.importorskip("distributed")
    from tests.test_docs import readme_blocks

    script = [b["body"] for b in readme_blocks() if b["body"].startswith("# audit_on_slurm.py")]
    assert len(script) == 1
    (tmp_path / "audit_on_slurm.py").write_text(script[0])
    (tmp_path / "dask_jobqueue.py").write_text(FAKE_JOBQUEUE)
    (tmp_path / "run").symlink_to(federated_run / "round-1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "audit_on_slurm.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=240)
    finally:  # the cluster's processes too, whatever happened
        _end_group(process)
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "High risk" in done.stdout and (tmp_path / "audit" / "report.html").is_file()
    assert sorted(p.name for p in (tmp_path / "audit").glob("*.reconstruction.safetensors")) == [
        "0000.reconstruction.safetensors", "0001.reconstruction.safetensors"]
