"""The method protocol: every attack is one registry entry.

An entry (:class:`Method`) declares, as plain data that imports nothing heavy:

- ``name`` and a one-line ``summary`` (what ``--method`` help, docs/methods.md and the
  benchmarks show);
- ``accepts``: the updates it can attack, among ``single`` (a one-step gradient of one
  sample), ``batch`` (a one-step gradient of B > 1 samples) and ``multistep`` (a delta of
  m > 1 local steps, FedAvg);
- ``facts``: the training facts it needs (names of :data:`gitool.facts.FACTS`), checked
  the same way whether the method was named or picked by ``auto``; ``delta_facts`` adds
  what turning a delta back into gradients needs (lr, optimizer, weight decay);
- ``options``: a dataclass (``"module:Class"``) whose fields hold every default and
  constraint once (``gitool.specs.fact``), so that ``--aux-per-class 0`` is refused by
  the same rule wherever it comes from;
- ``run``: the adapter (``"module:function"``) that turns the update into the math of
  ``gitool.attacks`` and returns an outcome;
- ``reads``: ``classifier`` when the adapter needs only the classifier's tensors, so a
  command loads just those (``load_update(path, tensors="classifier")``); otherwise the
  rest is read before the adapter runs.

Calling an entry checks the update, parses the options, runs the adapter and times it
(one timing key, ``outcome.seconds``). Adding a method: one function in
``gitool/attacks``, one adapter, one entry, one test.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

from gitool.errors import UsageError, attack_errors

ACCEPTS = ("single", "batch", "multistep")


def shape_of(update) -> str:
    """Which of :data:`ACCEPTS` an update is."""
    if update.kind == "delta" and update.training.steps > 1:
        return "multistep"
    return "single" if update.num_samples == 1 else "batch"


def describe_shape(update) -> str:
    kind = shape_of(update)
    if kind == "multistep":
        return f"a delta of {update.training.steps} local steps of batches of {update.training.batch_size}"
    if kind == "batch":
        return f"a {update.kind} of one step on a batch of {update.training.batch_size}"
    return f"a {update.kind} of one sample"


def _load(reference: str) -> Any:
    module_name, attribute = reference.split(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        raise UsageError(f"{reference} is not available in this build of gitool") from None


@dataclass(frozen=True)
class Method:
    name: str
    task: str  # labels | reconstruct
    summary: str
    accepts: tuple[str, ...]
    facts: tuple[str, ...]
    options: str  # "module:Class", a dataclass of options with defaults and constraints
    run: str  # "module:function"
    delta_facts: bool = False
    needs_aux: bool = False
    reads: str = "all"  # "classifier": the adapter reads the classifier's tensors only

    # --------------------------------------------------------------- checks
    def alternatives(self, registry: dict[str, Method], update) -> list[str]:
        kind = shape_of(update)
        return [name for name, method in registry.items() if kind in method.accepts]

    def check(self, update, registry: dict[str, Method] | None = None) -> None:
        """Refuse an update this method cannot attack, or one lacking a fact it needs."""
        from gitool.facts import require_facts

        facts = list(self.facts)
        if self.delta_facts and update.kind == "delta":
            facts += ["lr", "optimizer", "weight_decay"]
        require_facts(update, facts, for_method=f"--method {self.name}")
        kind = shape_of(update)
        if kind not in self.accepts:
            others = self.alternatives(registry or {}, update)
            hint = f"; methods for it: {', '.join(others)}" if others else ""
            raise UsageError(f"--method {self.name} attacks {' or '.join(self.accepts_words())}; "
                             f"{update.path or 'this update'} is {describe_shape(update)}{hint}")

    def accepts_words(self) -> list[str]:
        words = {"single": "a single-sample gradient", "batch": "a one-step batch gradient",
                 "multistep": "a multi-step update"}
        return [words[a] for a in self.accepts]

    # --------------------------------------------------------------- options
    def options_class(self) -> type:
        return _load(self.options)

    def parse_options(self, given: dict[str, Any] | None, require_aux: bool = True) -> Any:
        """The options object from ``given`` (keys the method does not declare are
        ignored; None means "not given": the declared default)."""
        from gitool.specs import SpecError

        cls = self.options_class()
        names = {f.name for f in fields(cls)}
        values = {key: value for key, value in (given or {}).items() if key in names and value is not None}
        try:
            options = cls(**values)
        except SpecError as exc:
            raise UsageError(f"--{exc.name.replace('_', '-')} {exc.message}") from None
        if require_aux and self.needs_aux and not getattr(options, "aux", None):
            raise UsageError(f"--method {self.name} needs --aux SOURCE (labelled auxiliary data)")
        return options

    # --------------------------------------------------------------- running
    def function(self) -> Callable:
        return _load(self.run)

    def __call__(self, update, given: dict[str, Any] | None = None, registry: dict[str, Method] | None = None,
                 **extra: Any):
        self.check(update, registry)
        options = self.parse_options(given)
        try:
            function = self.function()
        except UsageError:
            others = [name for name in self.alternatives(registry or {}, update) if name != self.name]
            raise UsageError(f"--method {self.name} is not available in this build of gitool; other methods for "
                             f"{describe_shape(update)}: {', '.join(others) or 'none'}") from None
        if self.reads != "classifier" and hasattr(update, "read_all"):
            update.read_all()
        started = time.perf_counter()
        with attack_errors():
            outcome = function(update, options, **extra)
        outcome.seconds = time.perf_counter() - started
        if not outcome.options:
            outcome.options = asdict(options)
        return outcome


def method_help(registry: dict[str, Method], lead: str = "") -> str:
    """The ``--method`` help text, from the registry."""
    listed = "; ".join(f"{m.name}: {m.summary} [{', '.join(m.accepts)}]" for m in registry.values())
    return f"{lead}{listed}."


def resolve(registry: dict[str, Method], name: str, what: str) -> Method:
    if name not in registry:
        raise UsageError(f"unknown {what} {name!r}; choose one of {', '.join(registry)}")
    return registry[name]


def markdown_table(registry: dict[str, Method]) -> str:
    """The registry as the Markdown table docs/methods.md shows."""
    lines = ["| method | accepts | needs facts | what it does |", "| --- | --- | --- | --- |"]
    for m in registry.values():
        facts = list(m.facts) + (["lr, optimizer, weight_decay (deltas)"] if m.delta_facts else [])
        facts += ["--aux data"] if m.needs_aux else []
        lines.append(f"| `{m.name}` | {', '.join(m.accepts)} | {', '.join(facts) or '-'} | {m.summary} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # print the tables for docs/methods.md
    from gitool.labels import LABEL_METHODS
    from gitool.reconstruct import RECON_METHODS

    for title, registry in (("labels", LABEL_METHODS), ("reconstruct", RECON_METHODS)):
        print(f"`gitool {title} --method`:\n\n{markdown_table(registry)}")
