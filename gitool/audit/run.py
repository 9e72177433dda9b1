"""An audit from start to end: check everything that can be checked before any update is
read, run the tasks on a runner, and write the report of what finished (also after
Ctrl-C: the report then says how many updates it covers)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from gitool.audit.layout import AuditInput, find_updates, output_path
from gitool.audit.planner import Selection, parse_methods
from gitool.audit.task import AuditSettings, AuditTask
from gitool.errors import UsageError

REPORT_FILES = ("summary.json", "audit.csv", "report.html")


@dataclass
class AuditOutcome:
    """What an audit did: the records of the finished updates (in name order), whether it
    was interrupted, the report files and the summary they hold."""

    records: list[dict[str, Any]]
    total: int
    interrupted: bool = False
    seconds: float = 0.0  # the tasks
    report_seconds: float = 0.0
    written: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    def problems(self) -> list[tuple[str, str]]:
        """(update, message) for each update that could not be audited (unreadable, lost
        with its worker) and each attack that ended in an internal error: what a run must
        not pass over in silence. An attack that refused an update or could not solve it is
        a finding of the report, not a problem."""
        found = []
        for record in self.records:
            if record.get("status") != "ok":
                found.append((record["update"], f"{record['status']}: {record.get('error')}"))
            found.extend((record["update"], f"{entry['step']} {entry['method']}: {entry['reason']}")
                         for entry in record.get("attacks", []) if entry["status"] == "error")
        return found

    def raise_problems(self) -> None:
        from gitool.errors import GitoolError

        problems = self.problems()
        if problems:
            where, what = problems[0]
            raise GitoolError(f"{len(problems)} update(s) or attack(s) of {self.total} updates could not be audited "
                              f"(first: {where}: {what}); the report covers everything else")


def prepare(inputs: Iterable[str | Path], out_dir: str | Path, methods: str = "auto",
            options: dict[str, Any] | None = None, *, lpips_weights: str | Path | None = None,
            trusted: Iterable[str] = (), resume: bool = True, threads: int = 1) -> tuple[list[AuditInput],
                                                                                          AuditSettings]:
    """The updates to audit and the settings every task shares, after every check that
    needs no update read: the methods and their options (by the registries' own rules),
    the LPIPS weights, and that no output is an input."""
    from gitool.paths import refuse_overlap

    out_dir = Path(out_dir)
    selection = parse_methods(methods)
    options = {key: value for key, value in (options or {}).items() if value is not None}
    if "optimize" in selection.reconstruct and "time_budget" not in options and _takes("optimize", "time_budget"):
        options["time_budget"] = OPTIMIZE_BUDGET
    check_options(selection, options)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out-dir {out_dir} is a file, not a folder")
    if lpips_weights is not None:
        from gitool.lpips import load_lpips

        load_lpips(lpips_weights)  # an unusable file fails now, not in every task
    items = find_updates(inputs)
    outputs = [("--out-dir file", path) for item in items for path in possible_outputs(item, out_dir, selection)]
    outputs += [("--out-dir file", str(out_dir / name)) for name in REPORT_FILES]
    readers = [("the update", item.path) for item in items] + [("the truth", item.truth()) for item in items]
    refuse_overlap(readers + [("--lpips-weights", Path(lpips_weights) if lpips_weights else None)], outputs)
    settings = AuditSettings(out_dir=str(out_dir), selection=selection, options=options,
                             lpips_weights=str(lpips_weights) if lpips_weights else None,
                             trusted=tuple(trusted), resume=resume, threads=threads)
    return items, settings


# Seconds of gradient matching per update unless --time-budget says otherwise: an audit
# runs it on every update, so the default is an audit's, not a single reconstruction's.
OPTIMIZE_BUDGET = 60.0


def _takes(method: str, option: str) -> bool:
    from dataclasses import fields

    from gitool.reconstruct import RECON_METHODS

    return option in {f.name for f in fields(RECON_METHODS[method].options_class())}


# Options every method may be given whether it declares them or not.
SHARED_OPTIONS = frozenset({"seed", "device"})


def method_options(pairs: Iterable[str], methods: str) -> dict[str, Any]:
    """``--option KEY=VALUE`` pairs as typed option values: each KEY is a field of the
    options of a method ``methods`` selects, and its VALUE is read as that field's type
    (int, float, bool, text; ``none`` for an optional one). The values are checked later
    by the methods' own constraints, as every other option."""
    import typing
    from dataclasses import fields

    hints: dict[str, Any] = {}
    for entry in _entries(parse_methods(methods)):
        cls = entry.options_class()
        resolved = typing.get_type_hints(cls)
        hints.update({f.name: resolved[f.name] for f in fields(cls)})
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in hints:
            raise UsageError(f"--option {pair!r}: give KEY=VALUE with KEY an option of the selected methods: "
                             f"{', '.join(sorted(hints)) or 'none'}")
        values[key] = _typed(text.strip(), hints[key], f"--option {key}")
    return values


def _typed(text: str, hint: Any, where: str) -> Any:
    import typing

    args = typing.get_args(hint)
    if type(None) in args:
        if text.lower() in ("none", "null", ""):
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if text.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "yes", "1")
        if hint in (int, float):
            return hint(text)
    except ValueError:
        raise UsageError(f"{where}: expected {'true or false' if hint is bool else hint.__name__}, got {text!r}") \
            from None
    return text


def _entries(selection: Selection) -> list:
    """The registry entries a selection may run."""
    from gitool.labels import LABEL_METHODS
    from gitool.reconstruct import RECON_METHODS

    entries = [entry for name in selection.labels
               for entry in (LABEL_METHODS.values() if name == "auto" else [LABEL_METHODS[name]])]
    entries += [entry for name in selection.reconstruct
                for entry in ([RECON_METHODS["fc"], RECON_METHODS["conv"]] if name == "analytic"
                              else [RECON_METHODS[name]])]
    return entries


def check_options(selection: Selection, options: dict[str, Any]) -> None:
    """Impossible option values fail before any file is read, for every method that may
    run; an option none of them takes (``--time-budget`` without optimize) is refused."""
    from dataclasses import fields

    entries = _entries(selection)
    named = {name for name in selection.labels if name != "auto"}
    for entry in entries:
        entry.parse_options(options, require_aux=entry.name in named)
    taken = {f.name for entry in entries for f in fields(entry.options_class())} | SHARED_OPTIONS
    unused = sorted(key for key in options if key not in taken)
    if unused:
        names = ", ".join("--" + key.replace("_", "-") for key in unused)
        raise UsageError(f"{names}: no method of --methods {','.join(selection.methods) or '-'} takes it in this "
                         "gitool")


def possible_outputs(item: AuditInput, out_dir: Path, selection: Selection) -> list[str]:
    """Every file the audit may write for ``item``: each step's main result and, where a
    step has several methods, each method's own."""
    paths = []
    for step, methods in (("labels", selection.labels), ("features", ("features",) if selection.features else ()),
                          ("reconstruct", selection.reconstruct)):
        if not methods:
            continue
        paths.append(output_path(out_dir, item.name, step))
        if len(methods) > 1:  # which one is the main result depends on the update
            paths.extend(output_path(out_dir, item.name, step, name) for name in _concrete(methods))
    return paths


def _concrete(methods: tuple[str, ...]) -> list[str]:
    """Registry names for "auto" (any label method) and "analytic" (fc, conv)."""
    from gitool.labels import LABEL_METHODS

    groups = {"auto": tuple(LABEL_METHODS), "analytic": ("fc", "conv")}
    return [name for method in methods for name in groups.get(method, (method,))]


def run(items: list[AuditInput], settings: AuditSettings, *, workers: int = 1, scheduler: Any = None,
        retries: int = 2, on_record: Callable[[dict[str, Any]], None] | None = None, report: bool = True,
        context: dict[str, Any] | None = None) -> AuditOutcome:
    """Audit ``items`` and write the report. Ctrl-C or SIGTERM stop the run; the report of
    the finished updates is still written and the outcome says ``interrupted``."""
    from gitool.atomic import Terminated, deferred_sync
    from gitool.audit import runners

    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [AuditTask(item, settings) for item in items]
    records: list[dict[str, Any]] = []

    def collect(record: dict[str, Any]) -> None:
        records.append(record)
        if on_record is not None:
            on_record(record)

    started = time.perf_counter()
    interrupted = False
    with deferred_sync():  # one sync for all the files written here and by local workers
        try:
            if scheduler is not None:
                runners.run_dask(tasks, collect, scheduler, retries=retries)
            elif workers > 1:
                runners.run_pool(tasks, workers, collect)
            else:
                runners.run_serial(tasks, collect)
        except (KeyboardInterrupt, Terminated):
            interrupted = True
        seconds = time.perf_counter() - started
        records.sort(key=lambda r: r["name"])
        outcome = AuditOutcome(records=records, total=len(tasks), interrupted=interrupted, seconds=seconds)
        if report:
            from gitool.audit.report import write_report

            outcome.summary, outcome.written = write_report(records, out_dir, total=len(tasks),
                                                            interrupted=interrupted, settings=settings,
                                                            context=context or {})
            outcome.report_seconds = time.perf_counter() - started - seconds
    return outcome


def audit(*, inputs: list[Path], out_dir: Path, methods: str = "auto", aux: str | None = None,
          aux_per_class: int | None = None, family: str | None = None, time_budget: float | None = None,
          lpips_weights: Path | None = None, workers: int = 1, scheduler: str | None = None, retries: int = 2,
          threads: int = 1, resume: bool = True, seed: int = 0, model: list[str] | None = None, device: str = "cpu",
          option: list[str] | None = None, progress=None) -> AuditOutcome:
    """``gitool audit`` on files: check the options, find and check the inputs, run the
    tasks (reporting each finished update to ``progress``, a `gitool.steps.Progress`),
    write the report."""
    from gitool.resolve import trust_models
    from gitool.steps import check_device, check_seed

    if workers < 1 or threads < 1 or retries < 0:
        raise UsageError("--workers and --threads must be at least 1, --retries at least 0")
    if scheduler is not None and workers != 1:
        raise UsageError("--scheduler runs the tasks on the cluster's workers; drop --workers")
    check_device(device)
    check_seed(seed)
    trust_models(model)
    options = {**method_options(option or [], methods), "aux": aux, "aux_per_class": aux_per_class,
               "family": family, "time_budget": time_budget, "seed": seed, "device": device}
    items, settings = prepare(inputs, out_dir, methods, options, lpips_weights=lpips_weights, trusted=model or (),
                              resume=resume, threads=threads)

    def finished(record: dict[str, Any]) -> None:
        if progress is not None:
            if record.get("status") != "ok":
                progress.failed(Path(record["update"]), record.get("error") or record["status"])
            progress.advance(record)

    if progress is not None:
        progress.start("audit", len(items))
    return run(items, settings, workers=workers, scheduler=scheduler, retries=retries, on_record=finished,
               context={"inputs": [str(i) for i in inputs], "methods": methods})
