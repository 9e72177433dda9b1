"""RecordingMessageStrategy: Flower's Message-API strategies (flwr.serverapp.strategy), wrapped.

Flower's own ``Strategy.start`` loop runs here (node sampling, train messages, FedAvg's
aggregation, several rounds) over an in-process grid: each node is a client that trains
gitool's LeNet by a plain PyTorch loop on its private batch and replies as a ClientApp
does (``ArrayRecord`` of its ``state_dict``, ``num-examples`` metric). No SuperLink runs:
the recorder sees exactly the messages a deployed ServerApp's strategy sees.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="the flower extra (pip install 'gitool[flower]') is not installed")

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import FedAvg, FedProx  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from gitool.files import load_update  # noqa: E402
from gitool.integrations.flower import RecordingMessageStrategy, RecordingStrategy  # noqa: E402
from gitool.models import ModelSpec, build_model, init_parameters  # noqa: E402

SPEC = ModelSpec(name="lenet", num_classes=10, input_shape=(3, 16, 16), activation="relu")
CONFIG = {"lr": 0.05, "batch_size": 8, "local_epochs": 1, "optimizer": "sgd", "weight_decay": 0.0}
NODES = (11, 22, 33)
SAMPLES = 16


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Flower stamps messages with the running task's identity; a deployed ServerApp has one."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1 if name == "_run_id" else 0)


def private_batch(node: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(node)
    return torch.rand(SAMPLES, *SPEC.input_shape, generator=generator), torch.randint(0, 10, (SAMPLES,),
                                                                                       generator=generator)


def client_app(message: Message, named: bool = True) -> RecordDict:
    """A ClientApp's train function: load the arrays, SGD on batch-mean cross-entropy, reply."""
    net = build_model(SPEC)
    net.load_state_dict(message.content["arrays"].to_torch_state_dict())
    config = message.content["config"]
    images, labels = private_batch(message.metadata.dst_node_id)
    optimizer = torch.optim.SGD(net.parameters(), lr=config["lr"], momentum=config.get("momentum", 0.0))
    for start in range(0, SAMPLES, config["batch_size"]):
        batch = slice(start, start + config["batch_size"])
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(images[batch]), labels[batch]).backward()
        optimizer.step()
    state = net.state_dict()
    arrays = ArrayRecord(state) if named else ArrayRecord([v.detach().numpy() for v in state.values()])
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": SAMPLES,
                                                                  "partition": message.metadata.dst_node_id})})


class LocalGrid(Grid):
    """Nodes answered in-process by ``client_app``; ``failing`` nodes reply with an error."""

    def __init__(self, failing=(), named=True):
        self.failing, self.named = set(failing), named

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id)

    def get_node_ids(self):
        return list(NODES)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error

        replies = []
        for message in messages:
            if message.metadata.dst_node_id in self.failing:
                replies.append(Message(Error(code=1, reason="client crashed"), reply_to=message))
            else:
                replies.append(Message(client_app(message, self.named), reply_to=message))
        return replies


def global_arrays() -> ArrayRecord:
    net = build_model(SPEC)
    init_parameters(net, "default", torch.Generator().manual_seed(0))
    return ArrayRecord(net.state_dict())


def run_federation(recorder, rounds: int = 2, grid=None, config=CONFIG):
    return recorder.start(grid=grid or LocalGrid(), initial_arrays=global_arrays(), num_rounds=rounds,
                          train_config=ConfigRecord(dict(config)))


def fedavg(**kwargs) -> FedAvg:
    return FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3, **kwargs)


def test_every_round_every_node_recorded_with_the_config_as_facts(tmp_path, run_cli):
    recorder = RecordingMessageStrategy(fedavg(), tmp_path / "rec", SPEC, facts={"loss": {"family": "hard"},
                                                                                 "defence": {}})
    run_federation(recorder, rounds=2)
    names = sorted(str(p.relative_to(tmp_path / "rec")) for p in recorder.written)
    assert names == [f"round-00{r}/{n}.update.safetensors" for r in (1, 2) for n in NODES] and not recorder.skipped
    update = load_update(recorder.written[0])
    assert (update.training.lr, update.training.batch_size, update.training.steps) == (0.05, 8, 2)
    assert update.provenance["flower"]["strategy"] == "FedAvg"
    assert update.provenance["flower"]["fit_config"]["server-round"] == 1
    assert update.provenance["flower"]["num_examples"] == SAMPLES
    assert update.provenance["unknown_facts"] == ["model_mode", "normalization"]
    # The server's attack on round 1 (untrained model) against each node's private labels.
    done = run_cli("labels", tmp_path / "rec/round-001", "--method", "rlu", "--aux", "synthetic", "--out-dir",
                   tmp_path / "labels", "--json")
    assert done.exit_code == 0, done.stderr
    for row, node in zip(done.json()["files"], NODES):
        truth = np.bincount(private_batch(node)[1].numpy(), minlength=10)
        found = np.rint(row["counts"]).astype(int)
        assert found.sum() == SAMPLES
        assert np.minimum(found, truth).sum() / SAMPLES >= 0.9, (node, found, truth)


def test_arrays_by_order_a_metric_as_name_and_fedprox_as_optimizer(tmp_path):
    recorder = RecordingMessageStrategy(FedProx(proximal_mu=0.5, fraction_train=1.0, fraction_evaluate=0.0,
                                                min_train_nodes=3, min_available_nodes=3),
                                        tmp_path / "rec", SPEC, client_name="partition")
    run_federation(recorder, rounds=1, grid=LocalGrid(named=False))
    assert sorted(p.name for p in recorder.written) == [f"client-{n}.update.safetensors" for n in NODES]
    update = load_update(recorder.written[0])
    assert (update.training.optimizer, update.training.prox_mu) == ("fedprox", 0.5)


def test_a_failing_node_is_skipped_and_the_rest_recorded(tmp_path):
    recorder = RecordingMessageStrategy(fedavg(), tmp_path / "rec", SPEC)
    run_federation(recorder, rounds=1, grid=LocalGrid(failing={22}))
    assert [p.stem.split(".")[0] for p in recorder.written] == ["11", "33"]
    assert recorder.skipped == [(1, "22", "the reply carries an error: 'client crashed'")]


def test_same_federation_same_bytes(tmp_path):
    first = RecordingMessageStrategy(fedavg(), tmp_path / "a", SPEC)
    second = RecordingMessageStrategy(fedavg(), tmp_path / "b", SPEC)
    run_federation(first, rounds=1)
    run_federation(second, rounds=1)
    assert [p.read_bytes() for p in first.written] == [p.read_bytes() for p in second.written]


def test_each_recorder_takes_only_its_own_api(tmp_path):
    with pytest.raises(TypeError, match="RecordingStrategy wraps flwr.server.strategy"):
        RecordingMessageStrategy(object(), tmp_path / "x", SPEC)
    with pytest.raises(TypeError, match="flwr.server.strategy.Strategy"):
        RecordingStrategy(fedavg(), tmp_path / "y", SPEC)
