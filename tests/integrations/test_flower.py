"""gitool.integrations.flower: Flower's own strategies, wrapped, record what clients send.

The unit tests drive real Flower strategies (FedAvg, FedProx) in-process through
``configure_fit`` and ``aggregate_fit`` with clients that train gitool's LeNet by a plain
PyTorch loop; the last test runs the sample federation (samples/flower/run.sh: a Flower
server and three client processes on localhost) and scores RLU on its recordings.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr", reason="the flower extra (pip install 'gitool[flower]') is not installed")

from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters  # noqa: E402
from flwr.server.client_manager import SimpleClientManager  # noqa: E402
from flwr.server.client_proxy import ClientProxy  # noqa: E402
from flwr.server.strategy import FedAvg, FedProx  # noqa: E402

from gitool.errors import GitoolError, UsageError  # noqa: E402
from gitool.files import load_update  # noqa: E402
from gitool.integrations.flower import RecordingStrategy, facts_of_fit  # noqa: E402
from gitool.models import ModelSpec, build_model, init_parameters  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SPEC = ModelSpec(name="lenet", num_classes=10, input_shape=(3, 16, 16), activation="relu")
CONFIG = {"server_round": 1, "lr": 0.05, "batch_size": 8, "local_epochs": 1, "optimizer": "sgd", "weight_decay": 0.0}
UNKNOWN_WITH_CONFIG = ["model_mode", "loss_family", "normalization", "defence"]


class Proxy(ClientProxy):
    """A connected client as the server sees it; the tests answer for it."""

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


def global_arrays(seed: int = 0) -> list[np.ndarray]:
    net = build_model(SPEC)
    init_parameters(net, "default", torch.Generator().manual_seed(seed))
    return [v.detach().numpy() for v in net.state_dict().values()]


def train(arrays: list[np.ndarray], config: dict, client: int, samples: int = 16) -> list[np.ndarray]:
    """A client's round as Flower clients write it: SGD on batch-mean cross-entropy."""
    net = build_model(SPEC)
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in zip(net.state_dict(), arrays)})
    generator = torch.Generator().manual_seed(100 + client)
    images = torch.rand(samples, *SPEC.input_shape, generator=generator)
    labels = torch.randint(0, 10, (samples,), generator=generator)
    lr, batch_size = config.get("lr", 0.05), config.get("batch_size", 8)  # the client's own when not told
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    for start in range(0, samples, batch_size):
        batch = slice(start, start + batch_size)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(images[batch]), labels[batch]).backward()
        optimizer.step()
    return [v.detach().numpy() for v in net.state_dict().values()]


def schema_problems(path: Path) -> list[str]:
    """What docs/schemas/update.schema.json finds wrong in an update file's metadata."""
    jsonschema = pytest.importorskip("jsonschema")
    from referencing import Registry
    from referencing.jsonschema import DRAFT202012

    registry = Registry().with_resources([(p.name, DRAFT202012.create_resource(json.loads(p.read_text())))
                                          for p in (ROOT / "docs/schemas").glob("*.schema.json")])
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        meta = json.loads(json.loads(handle.read(size))["__metadata__"]["gitool.meta"])
    validator = jsonschema.Draft202012Validator({"$ref": "update.schema.json"}, registry=registry)
    return [error.message for error in validator.iter_errors(meta)]


def fit_res(arrays, num_examples: int = 16, **metrics) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples, metrics)


def federation_round(strategy, clients: int = 3, results=None, server_round: int = 1, aggregate: bool = True):
    """configure_fit on ``clients`` connected clients, then aggregate_fit with their results
    (trained here unless ``results`` (cid -> FitRes) says otherwise); without ``aggregate``
    only the recording step (results FedAvg itself could not average)."""
    manager = SimpleClientManager()
    proxies = [Proxy(f"cid{i}") for i in range(clients)]
    for proxy in proxies:
        manager.register(proxy)
    start = ndarrays_to_parameters(global_arrays())
    instructions = strategy.configure_fit(server_round, start, manager)
    replies = []
    for proxy, ins in instructions:
        if results is not None and proxy.cid in results:
            replies.append((proxy, results[proxy.cid]))
            continue
        sent = flwr.common.parameters_to_ndarrays(ins.parameters)
        replies.append((proxy, fit_res(train(sent, ins.config, int(proxy.cid[3:])),
                                       partition_id=int(proxy.cid[3:]))))
    replies.sort(key=lambda pair: pair[0].cid)
    if not aggregate:
        return instructions, replies, strategy.record_round(server_round, replies)
    return instructions, replies, strategy.aggregate_fit(server_round, replies, [])


def fedavg(clients: int = 3, **kwargs) -> FedAvg:
    return FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=clients, min_available_clients=clients,
                  on_fit_config_fn=lambda server_round: {**CONFIG, "server_round": server_round}, **kwargs)


# --------------------------------------------------------------------------- the facts of a fit


def test_epochs_batch_and_examples_give_the_steps_and_say_how():
    fit = facts_of_fit(CONFIG, 32)
    assert fit.facts["training"] == {"lr": 0.05, "batch_size": 8, "steps": 4, "optimizer": "sgd",
                                     "weight_decay": 0.0}
    assert "ceil(32 / 8) x 1 = 4" in fit.derived["steps"] and fit.notes == []
    fit = facts_of_fit({**CONFIG, "local_epochs": 3}, 5)  # fewer samples than B: one batch of 5 per epoch
    assert (fit.facts["training"]["batch_size"], fit.facts["training"]["steps"]) == (5, 3)


def test_a_smaller_last_batch_leaves_the_steps_unknown():
    fit = facts_of_fit(CONFIG, 30)  # 8 + 8 + 8 + 6: not m steps of B samples
    assert "steps" not in fit.facts["training"] and fit.facts["training"]["batch_size"] == 8
    assert any("no multiple of batch_size 8" in note for note in fit.notes)


def test_only_what_the_config_says_becomes_a_fact():
    assert facts_of_fit({}, 16).facts == {}  # nothing said: nothing known
    fit = facts_of_fit({"lr": 0.1, "local_steps": 5, "momentum": 0.9}, 16)
    assert fit.facts["training"] == {"lr": 0.1, "steps": 5}  # no optimizer named: momentum stays a note
    assert any("optimizer is unknown" in note for note in fit.notes)
    fit = facts_of_fit({"optimizer": "SGD", "momentum": 0.9, "learning_rate": 0.1}, 16)
    assert fit.facts["training"] == {"lr": 0.1, "optimizer": "momentum", "momentum": 0.9}
    fit = facts_of_fit({"optimizer": "adam", "lr": "0.1", "batch_size": 7.5}, 16)
    assert fit.facts == {} and len(fit.notes) == 3  # adam is no linear optimizer; text and 7.5 are no numbers
    fit = facts_of_fit({"optimizer": "sgd", "proximal_mu": 0.01, "momentum": 0.9}, 16)
    assert "training" not in fit.facts  # FedProx with momentum: not one optimizer gitool models


def test_declared_facts_fill_in_and_the_config_wins():
    declared = {"training": {"optimizer": "sgd", "weight_decay": 0.0, "lr": 1.0},
                "loss": {"family": "hard"}, "defence": {}}
    fit = facts_of_fit({"lr": 0.05, "proximal_mu": 0.1}, 16, declared)
    assert fit.facts["training"] == {"optimizer": "fedprox", "prox_mu": 0.1, "weight_decay": 0.0, "lr": 0.05}
    assert fit.facts["loss"] == {"family": "hard"} and fit.facts["defence"] == {}


# --------------------------------------------------------------------------- the recorder


def test_fedavg_recorded_every_client_its_update_and_facts(tmp_path):
    plain = federation_round(fedavg(accept_failures=True))
    recorder = RecordingStrategy(fedavg(accept_failures=True), tmp_path / "rec", SPEC, client_name="partition_id")
    instructions, replies, aggregated = federation_round(recorder)
    # the wrapper is transparent: same instructions, same aggregate as FedAvg alone
    assert [ins.config for _, ins in instructions] == [ins.config for _, ins in plain[0]]
    assert aggregated[0].tensors == plain[2][0].tensors
    paths = sorted((tmp_path / "rec" / "round-001").iterdir())
    assert [p.name for p in paths] == [f"client-{i}.update.safetensors" for i in range(3)]
    assert recorder.written == paths and recorder.skipped == []
    names = list(build_model(SPEC).state_dict())  # Flower's lists are in this order
    for i, path in enumerate(paths):
        update = load_update(path)
        returned = flwr.common.parameters_to_ndarrays(replies[i][1].parameters)
        for name, before, after in zip(names, global_arrays(), returned):
            assert np.array_equal(update.global_state[name].numpy(), before)
            assert torch.equal(update.values[name], torch.from_numpy(after - before))
        t = update.training
        assert (update.kind, t.batch_size, t.steps, t.lr, t.optimizer, t.weight_decay) == ("delta", 8, 2, 0.05,
                                                                                            "sgd", 0.0)
        assert update.provenance["unknown_facts"] == UNKNOWN_WITH_CONFIG
        flower = update.provenance["flower"]
        assert (flower["server_round"], flower["client"], flower["num_examples"]) == (1, f"client-{i}", 16)
        assert flower["fit_config"] == CONFIG and flower["strategy"] == "FedAvg"
        assert schema_problems(path) == []


def test_fedprox_config_makes_the_optimizer_fedprox(tmp_path):
    strategy = FedProx(proximal_mu=0.01, fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=3,
                       min_available_clients=3, on_fit_config_fn=lambda r: dict(CONFIG))
    recorder = RecordingStrategy(strategy, tmp_path, SPEC)
    federation_round(recorder)
    assert recorder.proximal_mu == 0.01  # the wrapped strategy's attributes show through
    update = load_update(recorder.written[0])
    assert (update.training.optimizer, update.training.prox_mu) == ("fedprox", 0.01)
    assert update.provenance["flower"]["client"] == "cid0"  # named by the cid by default


def test_a_bad_client_is_skipped_and_the_rest_recorded(tmp_path):
    good = global_arrays(seed=1)
    nan = [a.copy() for a in good]
    nan[0][0] = np.nan
    pickled = Parameters(tensors=[b"\x80\x04K\x01."] * len(good), tensor_type="numpy.ndarray")
    header = io.BytesIO()  # a .npy header claiming 4 GiB, and no data
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 30,)})
    claims_huge = Parameters(tensors=[header.getvalue()] * len(good), tensor_type="numpy.ndarray")
    results = {"cid0": fit_res(nan), "cid1": fit_res(good[:3]), "cid2": FitRes(Status(Code.OK, ""), pickled, 16, {}),
               "cid3": FitRes(Status(Code.OK, ""), claims_huge, 16, {}), "cid4": fit_res(good)}
    recorder = RecordingStrategy(fedavg(5), tmp_path, SPEC)
    federation_round(recorder, clients=5, results=results, aggregate=False)
    assert [p.name for p in recorder.written] == ["cid4.update.safetensors"]
    reasons = {name: reason for _, name, reason in recorder.skipped}
    assert "NaN" in reasons["cid0"] and "lists 3 arrays" in reasons["cid1"]
    assert "not a .npy array" in reasons["cid2"] and "claims" in reasons["cid3"]
    strict = RecordingStrategy(fedavg(), tmp_path / "strict", SPEC, strict=True)
    with pytest.raises(GitoolError, match="NaN"):
        federation_round(strict, results={"cid0": fit_res(nan)}, aggregate=False)


def test_names_are_safe_unique_and_never_overwrite(tmp_path):
    reported = {"cid0": fit_res(global_arrays(seed=1), partition_id=7),
                "cid1": fit_res(global_arrays(seed=2), partition_id=7),  # a second client claims the same name
                "cid2": fit_res(global_arrays(seed=3), partition_id="../../etc/passwd")}
    recorder = RecordingStrategy(fedavg(), tmp_path / "rec", SPEC, client_name="partition_id")
    federation_round(recorder, results=reported)
    assert sorted(p.name for p in recorder.written) == ["cid2.update.safetensors", "client-7.update.safetensors"]
    assert [(name, "also named" in reason) for _, name, reason in recorder.skipped] == [("client-7", True)]
    assert "no usable file name" in load_update(tmp_path / "rec/round-001/cid2.update.safetensors"
                                                ).provenance["flower"]["notes"][0]
    with pytest.raises(UsageError, match="already holds a recording"):
        RecordingStrategy(fedavg(), tmp_path / "rec", SPEC)


def test_same_round_same_bytes_and_attacks_read_the_files(tmp_path, run_cli):
    first = RecordingStrategy(fedavg(), tmp_path / "a", SPEC, facts={"loss": {"family": "hard"}, "defence": {}})
    second = RecordingStrategy(fedavg(), tmp_path / "b", SPEC, facts={"loss": {"family": "hard"}, "defence": {}})
    federation_round(first)
    federation_round(second)
    assert [p.read_bytes() for p in first.written] == [p.read_bytes() for p in second.written]
    update = load_update(first.written[0])
    assert update.provenance["unknown_facts"] == ["model_mode", "normalization"]
    shown = run_cli("inspect", first.written[0], "--json").json()["metadata"]
    assert shown["training"]["model_mode"] == "unknown" and shown["training"]["steps"] == 2
    done = run_cli("labels", tmp_path / "a/round-001", "--method", "rlu", "--aux", "synthetic", "--out-dir",
                   tmp_path / "labels", "--json")
    assert done.exit_code == 0, done.stderr
    assert [int(sum(row["counts"])) for row in done.json()["files"]] == [16, 16, 16]
    bare = RecordingStrategy(FedAvg(min_fit_clients=3, min_available_clients=3), tmp_path / "c", SPEC)
    federation_round(bare)  # no fit config at all: RLU stops and names what it needs
    done = run_cli("labels", bare.written[0], "--method", "rlu", "--aux", "synthetic", "-o",
                   tmp_path / "x.labels.safetensors")
    assert done.exit_code == 2 and "batch_size (--batch-size)" in done.stderr and "lr (--lr)" in done.stderr


def test_a_user_model_named_in_code_is_recorded_by_its_factory(tmp_path, monkeypatch):
    (tmp_path / "fl_usernet.py").write_text(
        "from torch import nn\n"
        "def make(num_classes=10, input_shape=(3, 16, 16)):\n"
        "    c, h, w = input_shape\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 32), nn.ReLU(), nn.Linear(32, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = ModelSpec(name="fl_usernet:make", num_classes=10, input_shape=(3, 16, 16))
    net = build_model(spec)  # the operator's own model and code
    sent = [v.detach().numpy().copy() for v in net.state_dict().values()]
    moved = [v + 0.01 for v in sent]
    recorder = RecordingStrategy(fedavg(1), tmp_path / "rec", spec)
    manager = SimpleClientManager()
    manager.register(Proxy("c"))
    (proxy, _), = recorder.configure_fit(1, ndarrays_to_parameters(sent), manager)
    (path,) = recorder.record_round(1, [(proxy, fit_res(moved))])
    update = load_update(path)
    assert update.model.name == "fl_usernet:make" and update.training.steps == 2


# --------------------------------------------------------------------------- the sample federation


def test_sample_federation_records_updates_whose_labels_leak(tmp_path, run_cli):
    """The sample federation (samples/flower/federation.py, which samples/flower/run.sh runs):
    a Flower server and 3 client processes on 127.0.0.1, 2 rounds of FedAvg from an
    untrained LeNet. The server's recordings of round 1, attacked with RLU as run.sh does
    (in-process here, to spare three interpreter starts), give iAcc >= 0.9 for every client."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, str(ROOT / "samples/flower/federation.py"), str(out), "--clients", "3",
                                 "--rounds", "2", "--timeout", "150"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = launcher.communicate(timeout=200)
    finally:  # the launcher stops the federation's processes itself; this stops the launcher if it hangs
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((out / "logs").glob("*.log")))
    assert launcher.returncode == 0, f"exit {launcher.returncode}: {stdout}{stderr[-2000:]}{logs}"
    leftovers = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], "federation processes outlived the run"
    for round_name in ("round-001", "round-002"):
        recorded = sorted(p.name for p in (out / "updates" / round_name).iterdir())
        assert recorded == [f"client-{i}.update.safetensors" for i in range(3)]
    done = run_cli("labels", out / "updates/round-001", "--method", "rlu", "--aux", "synthetic", "--out-dir",
                   out / "labels/round-001")
    assert done.exit_code == 0, done.stderr
    scored = run_cli("score", out / "labels/round-001", "--truth-dir", out / "truth/round-001", "--json")
    assert scored.exit_code == 0, scored.stderr
    rows = scored.json()["files"]
    assert [(row["true_total"], row["recovered_total"]) for row in rows] == [(32, 32)] * 3
    for row in rows:
        assert row["iAcc"] >= 0.9, row
