"""Record a Flower federation as gitool updates, by wrapping any Flower strategy.

Two wrappers, one per Flower strategy API: :class:`RecordingStrategy` for
``flwr.server.strategy`` (``start_server``, ``ServerAppComponents``) and
:class:`RecordingMessageStrategy` for the Message API (``flwr.serverapp.strategy``,
``strategy.start(grid=...)``). Both write the same files with the same facts.

An existing Flower server gains a recorder in a few lines::

    from gitool.integrations.flower import RecordingStrategy
    from gitool.models import ModelSpec

    strategy = RecordingStrategy(FedAvg(...), out_dir="recorded",
                                 model=ModelSpec("lenet", num_classes=10, input_shape=(3, 32, 32)))

Every round, for every client whose fit result reaches the server, the recorder writes
``OUT_DIR/round-RRR/NAME.update.safetensors``: the global parameters the strategy sent
to that client (``FitIns.parameters``, in the model's ``state_dict()`` order as Flower's
NumPy lists are), the parameters it returned (``FitRes.parameters``; the update holds
their difference, a delta), and what the server knows about the client's round. Every
attack command reads these files as it reads a capture.

What the server knows, and nothing more, becomes a fact (see :mod:`gitool.facts`):

- the fit config the strategy sent (``FitIns.config``), read under Flower's usual keys
  (:data:`CONFIG_KEYS`; ``config_keys`` renames them): learning rate, batch size, local
  steps, weight decay, optimizer with momentum, and FedProx's ``proximal_mu``;
- ``local_epochs`` with a batch size B and the client's ``num_examples`` n gives the
  local steps m = ceil(n / B) x epochs when every batch is full (n a multiple of B, or
  n <= B, which makes B = n); the update says so under ``provenance.flower.derived``.
  With a smaller last batch the round is not m steps of B samples, so the steps stay
  unknown;
- ``facts``: what the operator declares for every client (a facts file or document as
  ``gitool import --facts`` reads: the label family, the normalisation, no defence ...);
  a value in the fit config wins over a declared one.

What nobody said (the label family, weight decay, defences, the model mode, the
optimizer when the config names none) is listed in ``provenance.unknown_facts``, so an
attack that needs it stops and names it. ``provenance.flower`` keeps the round, the
client's name, its ``num_examples``, the fit config as sent and notes on config values
that could not become facts.

Files are written before the wrapped strategy aggregates, so they hold what the clients
sent even when the wrapped strategy changes results in place (a server-side DP wrapper,
say): make the recorder the outermost strategy. Client parameters are untrusted input:
each array's ``.npy`` header is checked before its data is read, within the model's
byte budget, and the lists are checked against the model (:mod:`gitool.interop`).

Names: ``client_name`` picks a client's file name: ``"cid"`` (Flower's id of the
connection), the name of a metric the client reports in ``FitRes.metrics`` (an integer
``i`` gives ``client-i``), or a function of (ClientProxy, FitRes). A name that is not
1 to 64 letters, digits, ``-`` or ``_`` falls back to the cid; of results that share a
name in a round, the first (in Flower's order) is recorded and the others skipped. Nothing is ever
written over: the recorder refuses an ``out_dir`` that already holds rounds.

A client the recorder cannot record (parameters that do not fit the model, NaN, an
impossible config value) is logged and listed in :attr:`RecordingStrategy.skipped`; the
federation goes on. ``strict=True`` raises instead (for tests).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

try:
    from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar
    from flwr.server.client_manager import ClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import Strategy
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy as MessageStrategy
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("gitool.integrations.flower needs Flower: pip install 'gitool[flower]'") from exc

from gitool.errors import GitoolError, UsageError

log = logging.getLogger(__name__)

# Fit-config keys the recorder reads, by what they say; the first key present wins.
# Flower's examples use these names; its FedProx strategy adds "proximal_mu".
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "lr": ("lr", "learning_rate", "learning-rate"),
    "batch_size": ("batch_size", "batch-size"),
    "local_steps": ("local_steps", "local-steps", "steps"),
    "local_epochs": ("local_epochs", "local-epochs", "epochs"),
    "optimizer": ("optimizer",),
    "momentum": ("momentum",),
    "weight_decay": ("weight_decay", "weight-decay"),
    "proximal_mu": ("proximal_mu", "proximal-mu"),
}

ROUND_FOLDER = "round-{:03d}"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_CONFIG_ITEMS = 64
MAX_TEXT = 200


# --------------------------------------------------------------------------- facts of a fit


@dataclass
class FitFacts:
    """The facts one client's fit instructions give: a facts document (the sections of
    ``gitool import --facts``), how derived values were derived, and notes on config
    values that could not become facts."""

    facts: dict[str, Any]
    derived: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def facts_of_fit(config: Mapping[str, Any], num_examples: int, declared: Mapping[str, Any] | None = None,
                 keys: Mapping[str, tuple[str, ...]] = CONFIG_KEYS) -> FitFacts:
    """The facts of a client's round from the fit ``config`` the server sent, the client's
    ``num_examples`` and the operator's ``declared`` facts (a checked facts document).

    A config value wins over a declared one; nothing else is assumed. The values are
    checked later, by the specs (:mod:`gitool.specs`), like any other fact."""
    declared = dict(declared or {})
    training = dict(declared.get("training", {}))
    notes: list[str] = []
    derived: dict[str, str] = {}
    given: dict[str, Any] = {}
    for name, candidates in keys.items():
        present = [key for key in candidates if key in config]
        if not present:
            continue
        if len(present) > 1:
            notes.append(f"fit config keys {', '.join(present)} all give {name}; read {present[0]}")
        key, value = present[0], config[present[0]]
        parsed = _parse(name, value)
        if parsed is None:
            notes.append(f"fit config {key} = {_short(value)} is not {_WANTED[name]}; {name} not read from it")
            continue
        given[name] = parsed

    for name in ("lr", "weight_decay"):
        if name in given:
            training[name] = given[name]
    if "batch_size" in given:
        training["batch_size"] = given["batch_size"]
    if "local_steps" in given:
        training["steps"] = given["local_steps"]
        if "local_epochs" in given:
            notes.append("the fit config gives local steps and local epochs; recorded the steps")
    elif "local_epochs" in given:
        _steps_of_epochs(given["local_epochs"], num_examples, training, derived, notes)

    _resolve_optimizer(given, training, notes)
    document = {section: value for section, value in declared.items() if section != "training"}
    if training:
        document["training"] = training
    return FitFacts(document, derived, notes)


_WANTED = {"lr": "a number", "weight_decay": "a number", "momentum": "a number", "proximal_mu": "a number",
           "batch_size": "a whole number", "local_steps": "a whole number", "local_epochs": "a whole number",
           "optimizer": "a name"}


def _parse(name: str, value: Any) -> Any:
    """The config value as the fact wants it, or None when it is not of that type."""
    if name == "optimizer":
        return value.strip().lower() if isinstance(value, str) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if _WANTED[name] == "a whole number":
        return int(value) if float(value).is_integer() else None
    return float(value)


def _steps_of_epochs(epochs: int, num_examples: int, training: dict[str, Any], derived: dict[str, str],
                     notes: list[str]) -> None:
    """Local steps m = ceil(n / B) x epochs, when every batch holds B samples."""
    batch = training.get("batch_size")
    if batch is None:
        notes.append(f"local_epochs = {epochs} without a batch size: the local steps are unknown")
        return
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples < 1:
        notes.append(f"num_examples = {_short(num_examples)}: the local steps are unknown")
        return
    if num_examples <= batch:
        training["batch_size"], training["steps"] = num_examples, epochs
        derived["batch_size"] = (f"num_examples = {num_examples} <= the config's batch_size {batch}: one batch of "
                                 f"{num_examples} per epoch")
        derived["steps"] = f"one step per epoch x local_epochs {epochs} = {epochs}"
    elif num_examples % batch == 0:
        training["steps"] = epochs * (num_examples // batch)
        derived["steps"] = (f"ceil(num_examples / batch_size) x local_epochs = ceil({num_examples} / {batch}) x "
                            f"{epochs} = {training['steps']}")
    else:
        notes.append(f"num_examples = {num_examples} is no multiple of batch_size {batch}: each epoch ends with a "
                     "smaller batch, which m steps of B samples cannot state; the local steps are unknown")


def _resolve_optimizer(given: dict[str, Any], training: dict[str, Any], notes: list[str]) -> None:
    """gitool's optimizer fact (sgd, momentum, fedprox) from the base optimizer, momentum
    and FedProx's mu, each from the config or else the declared facts."""
    base = given.get("optimizer", training.get("optimizer"))
    momentum = given.get("momentum", training.get("momentum", 0.0))
    mu = given.get("proximal_mu", training.get("prox_mu", 0.0))
    for name in ("optimizer", "momentum", "prox_mu"):
        training.pop(name, None)
    if base is None:
        if momentum or mu:
            notes.append("the optimizer is unknown (the fit config names none); momentum and proximal_mu are kept "
                         "in fit_config only")
        return
    if base not in ("sgd", "momentum", "fedprox"):
        notes.append(f"optimizer {base[:40]!r} is not one gitool models (sgd, momentum, fedprox: updates linear in "
                     "the gradients); the optimizer is unknown")
        return
    if base == "sgd" and momentum:
        base = "momentum"
    if base == "sgd" and mu:
        base = "fedprox"
    if (base == "momentum" and mu) or (base == "fedprox" and momentum):
        notes.append(f"momentum {momentum} and proximal_mu {mu} together are not one optimizer gitool models; the "
                     "optimizer is unknown")
        return
    if base == "momentum" and not momentum:
        notes.append("optimizer momentum without a momentum value; the optimizer is unknown")
        return
    if base == "fedprox" and not mu:
        notes.append("optimizer fedprox without proximal_mu; the optimizer is unknown")
        return
    training["optimizer"] = base
    if base == "momentum":
        training["momentum"] = momentum
    if base == "fedprox":
        training["prox_mu"] = mu


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_record(config: Mapping[str, Any]) -> dict[str, Any]:
    """The fit config as JSON values, bounded: bytes by their length, long texts cut."""
    record: dict[str, Any] = {}
    for key in sorted(config, key=str)[:MAX_CONFIG_ITEMS]:
        value = config[key]
        if isinstance(value, bytes):
            value = f"<{len(value)} bytes>"
        elif isinstance(value, float) and not math.isfinite(value):
            value = repr(value)
        elif isinstance(value, str):
            value = value[:MAX_TEXT]
        elif not isinstance(value, (bool, int, float)):
            value = _short(value)
        record[str(key)[:MAX_TEXT]] = value
    return record


# --------------------------------------------------------------------------- names


def client_file_name(value: Any) -> str | None:
    """A file name from a client's id or reported name: an integer i gives ``client-i``,
    a text of 1 to 64 letters, digits, ``-``, ``_`` is kept; None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"client-{value}" if abs(value) < 10**18 else None
    if isinstance(value, str) and SAFE_NAME.match(value):
        return value
    return None


def _cid_name(cid: Any) -> str:
    return client_file_name(str(cid)) or "cid-" + hashlib.sha256(str(cid).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the wrapper


class _Wrapper:
    """A recorder stands in for the strategy it wraps: attributes it lacks are the wrapped
    strategy's (``proximal_mu``, ``on_fit_config_fn``, ``weighted_by_key``, ...)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.strategy!r}, out_dir={str(self.out_dir)!r})"

    def __getattr__(self, name: str) -> Any:
        strategy = self.__dict__.get("strategy")
        if strategy is None:
            raise AttributeError(name)
        return getattr(strategy, name)


class RecordingStrategy(_Wrapper, Strategy):
    """A Flower strategy that records every client's update, then lets ``strategy`` act.

    ``model``: the :class:`~gitool.models.ModelSpec` of the federation's model (a zoo
    name, or ``package.module:factory`` that the operator names here, in code, which is
    what allows gitool to import it); its ``state_dict()`` order is the order of
    Flower's parameter lists. ``facts``: a facts file (``.toml``/``.json``) or document
    of what holds for every client. ``config_keys``: fit-config key names by what they
    say, over :data:`CONFIG_KEYS` (``{"lr": "client_lr"}``). See the module docstring.
    """

    def __init__(self, strategy: Strategy, out_dir: str | Path, model: Any, *,
                 facts: str | Path | Mapping[str, Any] | None = None,
                 client_name: str | Callable[[ClientProxy, FitRes], Any] = "cid",
                 config_keys: Mapping[str, str | tuple[str, ...]] | None = None, strict: bool = False) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a Flower strategy (flwr.server.strategy.Strategy), not "
                            f"{type(strategy).__name__}")
        _set_up(self, strategy, out_dir, model, facts, client_name, config_keys, strict)
        self._sent: dict[str, tuple[Parameters, dict[str, Any]]] = {}

    # ----------------------------------------------------------- Flower's Strategy
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        instructions = self.strategy.configure_fit(server_round, parameters, client_manager)
        self._sent = {proxy.cid: (ins.parameters, dict(ins.config)) for proxy, ins in instructions}
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.record_round(server_round, results)
        return self.strategy.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return self.strategy.evaluate(server_round, parameters)

    # ----------------------------------------------------------- recording
    def record_round(self, server_round: int, results: list[tuple[ClientProxy, FitRes]]) -> list[Path]:
        """Write one update per fit result of ``server_round``; returns the files written."""
        decoded: dict[int, dict] = {}  # one decoding of the global parameters most strategies send to all
        named = [(*self._name(proxy, res), lambda name, notes, proxy=proxy, res=res:
                  self._record(server_round, name, notes, proxy, res, decoded)) for proxy, res in results]
        written = _record_each(self, server_round, named)
        self._sent = {}
        return written

    def _name(self, proxy: ClientProxy, res: FitRes) -> tuple[str, list[str]]:
        if callable(self.client_name):
            source = "the recorder's client_name function"
            try:
                value = self.client_name(proxy, res)
            except Exception as exc:  # the operator's function must not stop the federation
                value = f"<{type(exc).__name__}>"
        elif self.client_name == "cid":
            return _cid_name(proxy.cid), []
        else:
            value, source = (res.metrics or {}).get(self.client_name), f"the client's metric {self.client_name!r}"
        name = client_file_name(value)
        if name is None:
            return _cid_name(proxy.cid), [f"{source} gave no usable file name ({_short(value)}); named by its cid"]
        return name, [f"named by {source}"]

    def _record(self, server_round: int, name: str, name_notes: list[str], proxy: ClientProxy, res: FitRes,
                decoded: dict[int, dict]) -> Path:
        if proxy.cid not in self._sent:
            raise GitoolError("no fit instructions were sent to this client in this round")
        parameters, config = self._sent[proxy.cid]
        where = f"round {server_round}, client {name}"
        if id(parameters) not in decoded:
            decoded[id(parameters)] = self._state(parameters, "before", f"{where}: the global parameters")
        before = decoded[id(parameters)]
        after = self._state(res.parameters, "after", f"{where}: the returned parameters")
        return write_client_update(self, server_round, name, name_notes, before, after, res.num_examples, config,
                                   type(self.strategy).__name__)

    def _state(self, parameters: Parameters, part: str, where: str) -> dict:
        from gitool.files.foreign import read_npy_list
        from gitool.interop import state_of_list

        if parameters.tensor_type not in ("numpy.ndarray", ""):
            raise GitoolError(f"{where}: tensor_type {parameters.tensor_type[:40]!r}; gitool reads Flower's "
                              "numpy.ndarray lists")
        arrays = read_npy_list(list(parameters.tensors), self.layout.budget, len(self.layout.state), where)
        return state_of_list(arrays, part, self.layout, where)


class RecordingMessageStrategy(_Wrapper, MessageStrategy):
    """The recorder for Flower's Message API (``flwr.serverapp.strategy``: a ``ServerApp``
    that calls ``strategy.start(grid=...)``, as ``flwr new`` projects do). Same arguments,
    files and facts as :class:`RecordingStrategy`; what differs is where they come from:

    - the global arrays and the train config are the ``ArrayRecord`` and ``ConfigRecord``
      of each train message ``configure_train`` sends (a client is its destination node);
    - the returned arrays are the ``ArrayRecord`` of the client's reply, and its
      ``num_examples`` the reply's metric under the wrapped strategy's
      ``weighted_by_key`` (``"num-examples"`` by default);
    - arrays are matched to the model by name when the record's keys are the model's
      ``state_dict()`` names (``ArrayRecord(model.state_dict())``), else by order;
    - ``client_name``: ``"node"`` (the node id), a metric of the reply, or a function of
      the reply ``Message``. A reply that carries an error is listed in ``skipped``.
    """

    def __init__(self, strategy: MessageStrategy, out_dir: str | Path, model: Any, *,
                 facts: str | Path | Mapping[str, Any] | None = None,
                 client_name: str | Callable[[Message], Any] = "node",
                 config_keys: Mapping[str, str | tuple[str, ...]] | None = None, strict: bool = False) -> None:
        if not isinstance(strategy, MessageStrategy):
            raise TypeError(f"strategy must be a Flower Message-API strategy (flwr.serverapp.strategy.Strategy), "
                            f"not {type(strategy).__name__}; RecordingStrategy wraps flwr.server.strategy ones")
        _set_up(self, strategy, out_dir, model, facts, client_name, config_keys, strict)
        self._sent: dict[int, tuple[ArrayRecord, dict[str, Any]]] = {}

    # ----------------------------------------------------------- Flower's Message-API Strategy
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._sent = {}
        for message in messages:
            sent_arrays = list(message.content.array_records.values())
            sent_config = list(message.content.config_records.values())
            if len(sent_arrays) == 1:
                self._sent[message.metadata.dst_node_id] = (sent_arrays[0],
                                                            dict(sent_config[0]) if len(sent_config) == 1 else {})
        return messages

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.record_round(server_round, replies)
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> list[Message]:
        return list(self.strategy.configure_evaluate(server_round, arrays, config, grid))

    def aggregate_evaluate(self, server_round: int, replies) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, list(replies))

    def summary(self) -> None:
        self.strategy.summary()

    # ----------------------------------------------------------- recording
    def record_round(self, server_round: int, replies: list[Message]) -> list[Path]:
        """Write one update per train reply of ``server_round``; returns the files written."""
        decoded: dict[int, dict] = {}
        named = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.skipped.append((server_round, _cid_name(node), f"the reply carries an error: "
                                                                    f"{_short(reply.error.reason)}"))
                continue
            name, notes = self._name(reply)
            named.append((name, notes, lambda name, notes, reply=reply:
                          self._record(server_round, name, notes, reply, decoded)))
        written = _record_each(self, server_round, named)
        self._sent = {}
        return written

    def _name(self, reply: Message) -> tuple[str, list[str]]:
        node = reply.metadata.src_node_id
        if callable(self.client_name):
            source = "the recorder's client_name function"
            try:
                value = self.client_name(reply)
            except Exception as exc:  # the operator's function must not stop the federation
                value = f"<{type(exc).__name__}>"
        elif self.client_name == "node":
            return _cid_name(node), []
        else:
            metrics = list(reply.content.metric_records.values())
            value = metrics[0].get(self.client_name) if len(metrics) == 1 else None
            source = f"the client's metric {self.client_name!r}"
        name = client_file_name(value)
        if name is None:
            return _cid_name(node), [f"{source} gave no usable file name ({_short(value)}); named by its node id"]
        return name, [f"named by {source}"]

    def _record(self, server_round: int, name: str, name_notes: list[str], reply: Message,
                decoded: dict[int, dict]) -> Path:
        node = reply.metadata.src_node_id
        if node not in self._sent:
            raise GitoolError("no train message was sent to this client's node in this round")
        arrays, config = self._sent[node]
        where = f"round {server_round}, client {name}"
        if id(arrays) not in decoded:
            decoded[id(arrays)] = self._state(arrays, "before", f"{where}: the global arrays")
        returned = list(reply.content.array_records.values())
        if len(returned) != 1:
            raise GitoolError(f"{where}: the reply holds {len(returned)} array records; gitool reads one")
        after = self._state(returned[0], "after", f"{where}: the returned arrays")
        key = getattr(self.strategy, "weighted_by_key", "num-examples")
        metrics = list(reply.content.metric_records.values())
        num_examples = metrics[0].get(key) if len(metrics) == 1 else None
        return write_client_update(self, server_round, name, name_notes, decoded[id(arrays)], after, num_examples,
                                   config, type(self.strategy).__name__)

    def _state(self, record: ArrayRecord, part: str, where: str) -> dict:
        from gitool.files.foreign import read_npy_list
        from gitool.interop import state_of_list

        keys = list(record.keys())
        for wanted in (list(self.layout.state), list(self.layout.parameters)):
            if len(keys) == len(wanted) and set(keys) == set(wanted):
                keys = wanted  # named as the model names them: the model's order
                break
        blobs = []
        for key in keys:
            array = record[key]
            if array.stype != "numpy.ndarray":
                raise GitoolError(f"{where}: array {_short(key)} is serialised as {_short(array.stype)}; gitool reads "
                                  "numpy.ndarray arrays")
            blobs.append(bytes(array.data))
        arrays = read_npy_list(blobs, self.layout.budget, len(self.layout.state), where)
        return state_of_list(arrays, part, self.layout, where)


def _record_each(recorder, server_round: int, named: list[tuple[str, list[str], Callable]]) -> list[Path]:
    """Run each client's ``record(name, notes)`` in name order; a client that cannot be
    recorded (or shares a name already taken this round) is logged and listed in
    ``recorder.skipped``, and the federation goes on (``strict`` raises instead)."""
    written, taken = [], set()
    for name, name_notes, record in sorted(named, key=lambda item: item[0]):
        try:
            if name in taken:
                raise GitoolError(f"another client of this round is also named {name}")
            taken.add(name)
            path = record(name, name_notes)
        except Exception as exc:  # a client's bad update must not stop the federation
            if recorder.strict:
                raise
            reason = str(exc) if isinstance(exc, GitoolError) else f"{type(exc).__name__}: {exc}"
            recorder.skipped.append((server_round, name, reason))
            log.warning("gitool: round %d, client %s not recorded: %s", server_round, name, reason)
            continue
        written.append(path)
    recorder.written.extend(written)
    return written


def _set_up(recorder, strategy, out_dir, model, facts, client_name, config_keys, strict: bool) -> None:
    """What both recorders hold: the wrapped strategy, the model and its layout, the
    declared facts, the config keys and an output folder that holds no recording yet."""
    from gitool.interop import ModelLayout
    from gitool.models import ModelSpec, is_user_model, trust_factory

    if isinstance(model, str):
        model = ModelSpec(name=model)
    if not isinstance(model, ModelSpec):
        raise TypeError(f"model must be a gitool.models.ModelSpec or a model name, not {type(model).__name__}")
    if is_user_model(model.name):
        trust_factory(model.name)  # named in the operator's code, not read from a file
    recorder.strategy = strategy
    recorder.model = model
    recorder.layout = ModelLayout.of(model)
    recorder.facts_path, recorder.facts = _declared_facts(facts)
    recorder.keys = _config_keys(config_keys)
    recorder.client_name = client_name
    recorder.strict = strict
    recorder.out_dir = Path(out_dir)
    held = sorted(recorder.out_dir.glob("round-*")) if recorder.out_dir.is_dir() else []
    if held:
        raise UsageError(f"{recorder.out_dir} already holds a recording ({held[0].name}, ...); the recorder never "
                         "writes over files: give it an empty or new folder")
    recorder.written = []
    recorder.skipped = []


def write_client_update(recorder, server_round: int, name: str, name_notes: list[str], before: dict, after: dict,
                        num_examples: Any, config: Mapping[str, Any], strategy_name: str) -> Path:
    """One client's round as a gitool update under ``recorder.out_dir``: the global state
    sent, the state returned, and the facts the config and the declared facts give.
    Shared by the recorders of Flower's two strategy APIs."""
    from gitool.files import save_update
    from gitool.interop import update_of_states
    from gitool.paths import refuse_overlap
    from gitool.specs import SpecError, TrainingSpec

    where = f"round {server_round}, client {name}"
    fit = facts_of_fit(config, num_examples, recorder.facts, recorder.keys)
    try:
        TrainingSpec(**fit.facts.get("training", {}))
    except SpecError as exc:
        raise GitoolError(f"{where}: the fit config or the declared facts give {exc.key} that "
                          f"{exc.message}") from None
    update = update_of_states(recorder.model, recorder.layout, {"before": (before, where), "after": (after, where)},
                              fit.facts)
    update.provenance["flower"] = {
        "server_round": server_round,
        "client": name,
        "num_examples": num_examples if isinstance(num_examples, int) and not isinstance(num_examples, bool) else None,
        "fit_config": config_record(config),
        "strategy": strategy_name,
        "derived": fit.derived,
        "notes": name_notes + fit.notes,
    }
    if recorder.facts_path is not None:
        update.provenance["declared_facts"] = str(recorder.facts_path)
    path = recorder.out_dir / ROUND_FOLDER.format(server_round) / f"{name}.update.safetensors"
    if path.exists():
        raise GitoolError(f"{path} exists; the recorder never writes over a file")
    refuse_overlap([("the facts file", recorder.facts_path)], [("the update", path)])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_update(update, path)
    return path


def _declared_facts(facts: str | Path | Mapping[str, Any] | None) -> tuple[Path | None, dict[str, Any]]:
    """The operator's facts: a facts file or a document, checked as ``gitool import --facts``."""
    from gitool.interop import check_facts, read_facts_file

    if facts is None:
        return None, {}
    if isinstance(facts, (str, Path)):
        path, document = Path(facts), read_facts_file(facts)
    elif isinstance(facts, Mapping):
        path, document = None, check_facts(dict(facts), "facts")
    else:
        raise TypeError(f"facts must be a facts file or a dict of sections, not {type(facts).__name__}")
    strange = sorted({"model", "update_kind"} & set(document))
    if strange:
        raise UsageError(f"facts: the recorder knows {' and '.join(strange)} itself (the model is its model= "
                         "argument, every update a delta); leave them out")
    document.pop("model_fields", None)
    return path, document


def _config_keys(overrides: Mapping[str, str | tuple[str, ...]] | None) -> dict[str, tuple[str, ...]]:
    keys = dict(CONFIG_KEYS)
    for name, value in (overrides or {}).items():
        if name not in keys:
            raise UsageError(f"config_keys: {name!r} is none of {', '.join(keys)}")
        keys[name] = (value,) if isinstance(value, str) else tuple(value)
    return keys
