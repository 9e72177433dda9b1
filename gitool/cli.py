"""The `gitool` command line: parse, call the library, print with rich, exit.

Conventions every command shares, so that users' scripts stay stable:
- ``-o/--output FILE`` for the one output; many inputs take ``--out-dir DIR`` and each
  output keeps its input's stem: ``0007.update.safetensors`` -> ``0007.labels.safetensors``;
- ``--json`` prints one JSON document on stdout and nothing else there (messages and
  progress bars go to stderr);
- errors are one line on stderr; exit code 2 for usage errors, 1 for failures.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import typer.core
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gitool import __version__
from gitool.errors import GitoolError, UsageError, attack_errors
from gitool import steps as step  # not `steps`: capture has an option of that name

# Commands in the order of an attack chain, then the tools around it.
CHAIN_ORDER = ("capture", "labels", "features", "reconstruct", "score", "audit", "inspect", "import", "truth",
               "export", "train", "models", "demo")


class ChainOrderGroup(typer.core.TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: CHAIN_ORDER.index(n) if n in CHAIN_ORDER else len(CHAIN_ORDER))


def _metavar(self, ctx) -> str | None:
    """What help shows after an option: nothing for a flag, a word for a value (no <bool>)."""
    if getattr(self, "is_flag", False) or getattr(self, "is_bool_flag", False):
        return None
    if self.metavar is not None:
        return self.metavar
    shown = (self.display_type(ctx) or "").strip("<>")
    word = {"path": "PATH", "int": "N", "float": "X", "str": "TEXT", "list[Path]": "PATH...",
            "list[str]": "TEXT", "list[path]": "PATH..."}.get(shown, shown.upper() or None)
    return word


if hasattr(typer.core, "TyperOption") and hasattr(typer.core.TyperOption, "display_type_rich"):
    typer.core.TyperOption.display_type_rich = _metavar
    typer.core.TyperArgument.display_type_rich = _metavar

app = typer.Typer(
    name="gitool",
    cls=ChainOrderGroup,
    help="Measure how much a federated-learning client's gradient or model update leaks about its "
    "private training data. Chain the steps: capture -> labels -> features -> reconstruct -> score; "
    "inspect any file.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
out = Console()  # results (tables) on stdout
err = Console(stderr=True)  # messages and progress on stderr


INTERRUPTED = "[bold red]error:[/] interrupted; files finished before stayed as they were"


def main() -> None:
    """Console entry point: one clear line and an exit code instead of a traceback."""
    from gitool.atomic import Terminated, install_signal_handlers

    install_signal_handlers()
    try:
        with attack_errors():  # the math's own errors (gitool.attacks.errors) as gitool's
            app()
    except GitoolError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print(INTERRUPTED)
        sys.exit(130)
    except SystemExit as exc:
        # typer answers Ctrl-C inside a command with a bare exit 130 (raised from the
        # KeyboardInterrupt); say what happened, as for an interrupt outside it.
        exit_from = exc.__context__
        if exc.code == 130 and exit_from is not None and isinstance(exit_from.__cause__, KeyboardInterrupt):
            err.print(INTERRUPTED)
        raise
    except Terminated:
        err.print("[bold red]error:[/] terminated; files finished before stayed as they were")
        sys.exit(143)
    except RecursionError:
        err.print("[bold red]error:[/] input nested too deeply to process", highlight=False)
        sys.exit(1)
    except Exception as exc:
        if is_out_of_memory(exc):  # a size the user asked for, not a bug
            wanted = re.search(r"allocate (\d+) bytes", str(exc))
            size = f" ({int(wanted.group(1)) / 2**30:.1f} GiB in one piece)" if wanted else ""
            err.print(f"[bold red]error:[/] out of memory{size}: ask for a smaller model, batch, image size or number "
                      "of classes", highlight=False, soft_wrap=True)
            sys.exit(1)
        # A bug, not bad input: still one line, traceback on request.
        if os.environ.get("GITOOL_DEBUG"):
            raise
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} (set GITOOL_DEBUG=1 for a traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(1)


def is_out_of_memory(exc: BaseException) -> bool:
    """Python's MemoryError, torch's CUDA OutOfMemoryError, or the RuntimeError torch's
    CPU allocator raises (it has no class of its own)."""
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def version_callback(value: bool) -> None:
    if value:
        out.print(f"gitool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """gitool: gradient-inversion attacks for auditing federated learning."""


# --------------------------------------------------------------------------- shared helpers


def emit_json(document: Any) -> None:
    """The one JSON document of ``--json``, on stdout."""
    from gitool.files import jsonable

    sys.stdout.write(json.dumps(jsonable(document), indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


class PlainProgress:
    """Progress as plain lines on stderr, for logs (stderr not a terminal): a line when
    the task starts, then at most one every ``every`` seconds, and one at the end, each
    with the count, the rate and the time left."""

    def __init__(self, every: float = 10.0) -> None:
        self.every, self.description, self.total, self.done = every, "", None, 0
        self.started = self.last = time.monotonic()

    def line(self, final: bool = False, force: bool = False) -> None:
        now = time.monotonic()
        if not (final or force) and now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        left = (f", about {(self.total - self.done) / rate:.0f} s left"
                if self.total and rate > 0 and not final else "")
        err.print(f"{self.description}: {count} in {elapsed:.1f} s ({rate:.2f}/s{left})", highlight=False,
                  soft_wrap=True)

    def start(self, description: str, total: int | None) -> None:
        self.description, self.total, self.done = description, total, 0
        self.started = self.last = time.monotonic()
        err.print(f"{description}: started" + (f", {total} to do" if total else ""), highlight=False)

    def advance(self, info: dict) -> None:
        self.done += 1
        self.line(final=self.total is not None and self.done >= self.total)

    def update(self, completed: int, total: int | None, description: str) -> None:
        first = self.done == 0 and completed > 0  # the first report of a long input shows at once
        self.done, self.total, self.description = completed, total or self.total, description
        self.line(force=first)


@contextlib.contextmanager
def reporting(enabled: bool = True):
    """A :class:`gitool.step.Progress` that draws on stderr: a rich bar on a terminal,
    plain lines in a log, nothing when disabled (--json, one input); failures of an input
    among many are printed in every case."""
    from gitool.steps import Progress as StepProgress

    def failed(path: Path, message: str) -> None:
        err.print(f"[red]failed:[/] {path}: {message}", highlight=False, soft_wrap=True)

    if not enabled:
        yield StepProgress(failed=failed)
        return
    if not err.is_terminal:
        plain = PlainProgress()
        yield StepProgress(start=plain.start, advance=plain.advance, update=plain.update, failed=failed)
        return
    bar = RichProgress()
    try:
        yield StepProgress(start=bar.start, advance=bar.advance, update=bar.update, failed=failed)
    finally:
        bar.stop()


class RichProgress:
    """A rich progress bar on stderr (count, elapsed, time left), drawn from its first use
    on, so a command that reports nothing draws nothing."""

    def __init__(self) -> None:
        self.bar = None
        self.task = None

    def _task(self):
        if self.bar is None:
            # rich.progress is imported here, not at start-up: most commands never draw a bar.
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            # No refresh thread (redrawn here, at most ten times a second): a command may fork
            # worker processes while the bar is up (gitool audit --workers).
            self.bar = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                                MofNCompleteColumn(), rate_column(), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(), console=err, transient=False, auto_refresh=False)
            self.bar.start()
            self.task = self.bar.add_task("", total=None)
            self.drawn = 0.0
        return self.task

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.drawn >= 0.1:
            self.drawn = now
            self.bar.refresh()

    def start(self, description: str, total: int | None) -> None:
        task = self._task()
        self.bar.update(task, description=description, total=total, completed=0)
        self._draw(force=True)

    def advance(self, info: dict) -> None:
        task = self._task()
        self.bar.advance(task)
        self._draw()

    def update(self, completed: int, total: int | None, description: str) -> None:
        task = self._task()
        self.bar.update(task, completed=completed, total=total, description=description)
        self._draw()

    def stop(self) -> None:
        if self.bar is not None:
            self._draw(force=True)
            self.bar.stop()


def rate_column():
    """A rich column of items per second, from rich's moving estimate."""
    from rich.progress import ProgressColumn

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("" if speed is None else f"{speed:.1f}/s", style="progress.data.speed")

    return RateColumn()


# Model options shared by capture, train and import.
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m",
    help="Model: a registry name (see `gitool models`) or a user factory `package.module:callable` (importing "
         "it runs that module's code).",
    rich_help_panel="model")]
NumClassesOpt = Annotated[Optional[int], typer.Option(
    "--num-classes", "-K",
    help="Number of classes K.",
    rich_help_panel="model")]
ImageSizeOpt = Annotated[Optional[str], typer.Option(
    "--image-size",
    help="Input size: S (3xSxS) or CxHxW.",
    rich_help_panel="model")]
ActivationOpt = Annotated[Optional[str], typer.Option(
    "--activation",
    help="relu | leakyrelu | sigmoid | tanh (default: the model's own).",
    rich_help_panel="model")]
NoBiasOpt = Annotated[Optional[bool], typer.Option(
    "--bias/--no-bias",
    help="A bias on the last (classifier) layer, or none; default: as the model's paper (`gitool models`).",
    rich_help_panel="model")]
InitOpt = Annotated[Optional[str], typer.Option(
    "--init",
    help="uniform (all parameters U(-0.5, 0.5), DLG's untrained setting) | default (PyTorch's) | a checkpoint "
         "file (.safetensors, or .pt loaded weights-only); default: as the model's paper (`gitool models`).",
    rich_help_panel="model")]
ModelOptOpt = Annotated[Optional[list[str]], typer.Option(
    "--model-opt",
    help="Model-specific KEY=VALUE, repeatable (e.g. channels=77,22,3,3 for rconv-lenet, widths=4096,1024,256 "
         "for fcn4).",
    rich_help_panel="model")]
ModelOutputOpt = Annotated[Optional[str], typer.Option(
    "--model-output",
    help="For a user model whose forward returns several values: which one is the logits, an index into the "
         "tuple (0) or a dict key (logits). Recorded in the update, so every command runs the model through it.",
    rich_help_panel="model")]
# Training, loss, defence and input facts: declared once, shared by capture and import
# (capture gives them defaults, import leaves an option nobody gave unknown).
BatchSizeOpt = Annotated[Optional[int], typer.Option(
    "--batch-size", "-B",
    help="Samples per local step (B).",
    rich_help_panel="local training")]
StepsOpt = Annotated[Optional[int], typer.Option(
    "--steps",
    help="Local steps m (m > 1 sends the update delta).",
    rich_help_panel="local training")]
LrOpt = Annotated[Optional[float], typer.Option(
    "--lr",
    help="Local learning rate eta.",
    rich_help_panel="local training")]
OptimizerOpt = Annotated[Optional[str], typer.Option(
    "--optimizer",
    help="sgd | momentum | fedprox.",
    rich_help_panel="local training")]
MomentumOpt = Annotated[Optional[float], typer.Option(
    "--momentum",
    help="Momentum for --optimizer momentum.",
    rich_help_panel="local training")]
ProxMuOpt = Annotated[Optional[float], typer.Option(
    "--prox-mu",
    help="FedProx mu for --optimizer fedprox.",
    rich_help_panel="local training")]
WeightDecayOpt = Annotated[Optional[float], typer.Option(
    "--weight-decay",
    help="L2 weight decay in local steps.",
    rich_help_panel="local training")]
ModeOpt = Annotated[Optional[str], typer.Option(
    "--mode",
    help="Model mode in local training: train | eval (batch norm).",
    rich_help_panel="local training")]
LabelSmoothingOpt = Annotated[Optional[str], typer.Option(
    "--label-smoothing",
    help="Label smoothing eps, or a range LO:HI drawn per sample.",
    rich_help_panel="labels the client trained on")]
MixupOpt = Annotated[Optional[float], typer.Option(
    "--mixup",
    help="Mixup with coefficient ~ Beta(ALPHA, ALPHA) per sample, partner of another class.",
    rich_help_panel="labels the client trained on")]
MixupCoefOpt = Annotated[Optional[float], typer.Option(
    "--mixup-coef",
    help="Mixup with a fixed coefficient C.",
    rich_help_panel="labels the client trained on")]
DpClipOpt = Annotated[Optional[float], typer.Option(
    "--dp-clip",
    help="DP-SGD: clip per-sample gradients to C.",
    rich_help_panel="defences")]
DpNoiseOpt = Annotated[Optional[float], typer.Option(
    "--dp-noise",
    help="DP-SGD: noise multiplier sigma (noise std sigma x C).",
    rich_help_panel="defences")]
PruneOpt = Annotated[Optional[float], typer.Option(
    "--prune",
    help="Zero this fraction of each tensor's smallest entries (top-k pruning).",
    rich_help_panel="defences")]
NormalizeOpt = Annotated[Optional[str], typer.Option(
    "--normalize",
    help="none | half | cifar10 | cifar100 | imagenet | MEAN/STD (comma lists); capture: default the --init "
         "checkpoint's, else none.",
    rich_help_panel="private data")]
OutDirOpt = Annotated[Optional[Path], typer.Option("--out-dir", help="Folder for many updates: each output keeps "
                      "its input's stem (0007.update.safetensors -> 0007.labels.safetensors, ...).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout, nothing else.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="torch device: cpu, cuda, cuda:1 ...")]
LABEL_METHOD_HELP = __import__("gitool.labels", fromlist=["METHOD_HELP"]).METHOD_HELP
RECON_METHOD_HELP = __import__("gitool.reconstruct", fromlist=["METHOD_HELP"]).METHOD_HELP
AUDIT_METHODS_HELP = ("Steps and methods, comma-separated: auto (labels,features,analytic), all (and optimize), "
                      "labels, features, analytic (fc or conv as the model allows), or method names of `gitool labels "
                      "--method` and `gitool reconstruct --method`; the first method of a step is its main result.")
TrustOpt = Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Trust the user model factory "
                     "package.module:factory that the update names (importing it runs that module's code); "
                     "gitool never imports code because a file names it. Zoo models need nothing.")]


# --------------------------------------------------------------------------- capture


@app.command()
def capture(
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="The update file to write.")] = None,
    truth: Annotated[Optional[Path], typer.Option("--truth", help="The truth file (default: the output's stem "
                     "+ .truth.safetensors beside it).")] = None,
    repeat: Annotated[int, typer.Option("--repeat", help="Write N independent captures (seeds S, S+1, ...).")] = 1,
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", help="Folder for --repeat: 0000.update.safetensors "
                       "+ 0000.truth.safetensors, ...")] = None,
    model: ModelOpt = None,
    num_classes: NumClassesOpt = None,
    image_size: ImageSizeOpt = None,
    activation: ActivationOpt = None,
    bias: NoBiasOpt = None,
    init: InitOpt = None,
    model_opt: ModelOptOpt = None,
    model_output: ModelOutputOpt = None,
    data: Annotated[str, typer.Option("--data", "-d", help="Data source: synthetic, digits, samples, folder:PATH, "
                    "cifar10:PATH, cifar100:PATH.", rich_help_panel="private data")] = "synthetic",
    normalize: NormalizeOpt = None,
    batch_size: BatchSizeOpt = 1,
    steps: StepsOpt = 1,
    lr: LrOpt = 0.01,
    optimizer: OptimizerOpt = "sgd",
    momentum: MomentumOpt = 0.9,
    prox_mu: ProxMuOpt = 0.0,
    weight_decay: WeightDecayOpt = 0.0,
    label_smoothing: LabelSmoothingOpt = None,
    mixup: MixupOpt = None,
    mixup_coef: MixupCoefOpt = None,
    dp_clip: DpClipOpt = None,
    dp_noise: DpNoiseOpt = None,
    prune: PruneOpt = None,
    indices: Annotated[Optional[str], typer.Option("--indices", help="Exact item indices, comma-separated (B x m).", rich_help_panel="private data")]
    = None,
    classes: Annotated[Optional[str], typer.Option("--classes", help="Classes, comma-separated: one per sample, "
                       "or a pool to draw from.", rich_help_panel="private data")] = None,
    dirichlet: Annotated[Optional[float], typer.Option("--dirichlet", help="Class mix ~ Dirichlet(ALPHA) "
                         "(heterogeneous client).", rich_help_panel="private data")] = None,
    mode: ModeOpt = "train",
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | float64 (analytic attacks are exact "
                     "in float64).", rich_help_panel="local training")] = "float32",
    send: Annotated[Optional[str], typer.Option("--send", help="gradient | delta (default: gradient for one "
                    "step, delta for m > 1).", rich_help_panel="local training")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for init, sampling, labels and noise.")] = 0,
    device: DeviceOpt = "cpu",
    json_output: JsonOpt = False,
) -> None:
    """Simulate a client: local training on private samples, then dump the update and the truth.

    One step (m = 1) sends the gradient (FedSGD); m > 1 sends theta_after - theta_before
    (FedAvg). Only `score` may read the truth file.

    Example: gitool capture --model lenet --data samples --label-smoothing 0.1 -o run/c.update.safetensors
    """
    options = dict(locals())
    json_output = options.pop("json_output")
    with reporting(enabled=repeat > 1 and not json_output) as progress:
        report = step.capture(**options, progress=progress)
    written = report["written"]
    if json_output:
        emit_json({"written": written, "seconds": report["seconds"]})
        return
    err.print(f"wrote {len(written)} capture(s) in {report['seconds']:.2f} s: {report['model']}, "
              f"K={report['num_classes']}, B={batch_size}, m={steps}, {report['family']}, sends the "
              f"{written[-1]['kind']}", soft_wrap=True)
    for row in written[:5]:
        out.print(f"  {row['update']}  {row['truth']}", highlight=False)
    if len(written) > 5:
        out.print(f"  ... and {len(written) - 5} more in {out_dir}", highlight=False)


# --------------------------------------------------------------------------- labels


@app.command()
def labels(
    updates: Annotated[list[Path], typer.Argument(help="Update files, or folders of *.update.safetensors.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="The labels file (one update).")] = None,
    out_dir: OutDirOpt = None,
    method: Annotated[str, typer.Option("--method", help=LABEL_METHOD_HELP)] = "auto",
    per_sample: Annotated[bool, typer.Option("--per-sample", help="Each sample's label of a one-step batch "
                          "gradient (B <= K - 1), with its softmax output, so that `gitool features` gives the B "
                          "features in the same row order (= --method per-sample).")] = False,
    family: Annotated[Optional[str], typer.Option("--family", help="Label family prior for the single-sample "
                      "methods: auto (fit smoothing and mixup, keep the clearly better) | hard | smoothing | mixup; "
                      "default: the family the update records, auto when it is unknown.",
                      rich_help_panel="single-sample methods")] = None,
    search: Annotated[Optional[str], typer.Option("--search", help="lambda search: scan (dense grid over both signs, "
                      "every minimum refined to round-off, default) | pso (the paper's particle swarm, slow; for "
                      "comparison).", rich_help_panel="single-sample methods")] = None,
    aux: Annotated[Optional[str], typer.Option("--aux", help="Auxiliary data source for the batch methods that "
                   "need one (a --data spec).", rich_help_panel="batch methods")] = None,
    aux_per_class: Annotated[Optional[int], typer.Option("--aux-per-class", help="Auxiliary samples per class "
                             "(default 100; fewer cost RLU points on trained models).",
                             rich_help_panel="batch methods")] = None,
    drift: Annotated[Optional[str], typer.Option("--drift", help="rlu, m > 1: how the statistics drift over the "
                     "local steps: simulate (the m steps on the auxiliary set, default) | midpoint (one model "
                     "between the global and the received one; cheaper).", rich_help_panel="batch methods")] = None,
    batch_draws: Annotated[Optional[int], typer.Option("--batch-draws", help="rlu, m > 1: average the simulated "
                           "system over this many random splits of the counts into the client's batches (0: the mean "
                           "batch, default; 4 gained up to 0.05 iAcc with momentum, at 4x the time).",
                           rich_help_panel="batch methods")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for randomised searches (pso) and methods.")] = 0,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="PNG of the search loss over lambda, the chosen "
                    "minimum marked (one update).")] = None,
    model: TrustOpt = None,
    device: DeviceOpt = "cpu",
    json_output: JsonOpt = False,
) -> None:
    """Recover the soft label (single-sample gradient) or the label counts (batch) from updates.

    A single-sample gradient gives its exact soft label: through the last-layer bias, or without one by the lambda search of Wang et al. (ICLR 2024) with a label-structure prior (hard, label smoothing, mixup). Writes a labels file per update (labels 1 x K and counts) with the method, options and diagnostics.

    Example: gitool labels run/c.update.safetensors -o run/c.labels.safetensors   (many: gitool labels runs/ --out-dir out/)
    """
    with reporting(enabled=not json_output) as progress:
        batch = step.labels(updates=updates, output=output, out_dir=out_dir, method=method, per_sample=per_sample,
                             family=family,
                             search=search, aux=aux, aux_per_class=aux_per_class, drift=drift, batch_draws=batch_draws,
                             seed=seed, plot=plot,
                             model=model,
                             device=device, progress=progress if len(updates) > 1 or updates[0].is_dir() else None)
    if json_output:
        emit_json({"files": [{k: v for k, v in row.items() if k != "summary"} for row in batch.rows],
                   "failed": batch.failures})
    else:
        print_label_rows(batch.rows)
    batch.raise_failures(len(batch.rows) + len(batch.failures))


# --------------------------------------------------------------------------- features


@app.command()
def features(
    updates: Annotated[list[Path], typer.Argument(help="Updates (single-sample gradients, or one-step batch "
                       "gradients with labels from `gitool labels --per-sample`), or folders of "
                       "*.update.safetensors.")],
    labels_file: Annotated[Path, typer.Option("--labels", "-l", help="Its labels file from `gitool labels` (for "
                           "many updates: the folder of STEM.labels.safetensors).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="The features file to write (one "
                      "update).")] = None,
    out_dir: OutDirOpt = None,
    model: TrustOpt = None,
    device: DeviceOpt = "cpu",
    json_output: JsonOpt = False,
) -> None:
    """Recover the last layer's input feature x of a single-sample gradient from its labels.

    With a last-layer bias x is the bias ratio; without one x = lambda G_r with the lambda that explains the label. Checks that (x, label) reproduce the gradient and warns (in the output and the file) when the relative residual is above tolerance. For a one-step batch, per-sample labels (`gitool labels --per-sample`, with each sample's softmax output) give the B features X = (Delta^T)^+ dL/dW, rows in the labels' order.

    Example: gitool features run/c.update.safetensors --labels run/c.labels.safetensors -o run/c.features.safetensors   (many: gitool features runs/ --labels runs/ --out-dir runs/)
    """
    with reporting(enabled=not json_output) as progress:
        batch = step.features(updates=updates, labels_path=labels_file, output=output, out_dir=out_dir, model=model,
                               device=device, progress=progress if len(updates) > 1 or updates[0].is_dir() else None)
    if json_output:
        emit_json(batch.rows[0] if len(batch.rows) == 1 and not batch.failures and output is not None
                  else {"files": batch.rows, "failed": batch.failures})
    else:
        print_feature_rows(batch.rows)
    batch.raise_failures(len(batch.rows) + len(batch.failures))


# --------------------------------------------------------------------------- audit


@app.command()
def audit(
    inputs: Annotated[list[Path], typer.Argument(help="Update files, or folders searched recursively for "
                      "*.update.safetensors (captures, imports, Flower recordings).")],
    out_dir: Annotated[Path, typer.Option("--out-dir", "-o", help="Folder for the results (mirroring the inputs' "
                       "folders), summary.json, audit.csv and report.html.")],
    methods: Annotated[str, typer.Option("--methods", help=AUDIT_METHODS_HELP)] = "auto",
    aux: Annotated[Optional[str], typer.Option("--aux", help="Labelled auxiliary data (a --data spec) for the label "
                   "counts of batches and multi-step updates (RLU); without it they are counted without auxiliary "
                   "data (iLRG or LLG).")] = None,
    aux_per_class: Annotated[Optional[int], typer.Option("--aux-per-class", help="Auxiliary samples per class.")]
    = None,
    family: Annotated[Optional[str], typer.Option("--family", help="Label family prior for single-sample labels "
                      "(default: what each update records).")] = None,
    time_budget: Annotated[Optional[float], typer.Option("--time-budget", help="Seconds per update for --methods "
                           "optimize (default 60).")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", help="Any option of a selected method as "
                      "KEY=VALUE, repeatable (e.g. --option optimizer=lbfgs --option iterations=50 for optimize, "
                      "--option solver=iterative for conv); names as in `gitool labels/reconstruct --help`.")] = None,
    lpips_weights: Annotated[Optional[Path], typer.Option("--lpips-weights", help="Local AlexNet LPIPS weights for "
                             "the image scores.")] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Worker processes on this machine.")] = 1,
    scheduler: Annotated[Optional[str], typer.Option("--scheduler", help="Run the tasks on a Dask cluster: its "
                         "scheduler's address tcp://HOST:PORT (pip install 'gitool[dask]'; the workers must see the "
                         "same files at the same paths).")] = None,
    retries: Annotated[int, typer.Option("--retries", help="With --scheduler: reruns of a task that failed.")] = 2,
    threads: Annotated[int, typer.Option("--threads", help="torch threads per worker.")] = 1,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Keep valid results of an earlier run (made "
                      "from the same update by the same method and options) instead of recomputing them.")] = True,
    seed: Annotated[int, typer.Option("--seed", help="Seed for randomised methods.")] = 0,
    model: TrustOpt = None,
    device: DeviceOpt = "cpu",
    json_output: JsonOpt = False,
) -> None:
    """Attack every update of a federated run, score what leaked, and write a report.

    Each update gets the attacks its facts allow (soft label and feature of one sample,
    analytic reconstruction where the model permits it, label counts of batches and
    multi-step updates), written under --out-dir with the names the single commands use.
    A truth file beside an update (STEM.truth.safetensors) is read after the attacks, to
    score them; without one the report gives the attacks' own checks. A rerun reuses
    valid results; Ctrl-C keeps what finished and still writes the report.

    Example: gitool audit runs/ --out-dir audit/ --workers 2   (then open audit/report.html)
    """
    options = dict(locals())
    json_output = options.pop("json_output")
    from gitool.audit.run import audit as run_audit

    with reporting(enabled=not json_output) as progress:
        outcome = run_audit(**options, progress=progress)
    if json_output:
        emit_json({"updates": outcome.total, "audited": len(outcome.records), "interrupted": outcome.interrupted,
                   "seconds": outcome.seconds, "report_seconds": outcome.report_seconds, "written": outcome.written,
                   "findings": outcome.summary["findings"], "overall": outcome.summary["overall"]})
    else:
        findings = outcome.summary["findings"]
        out.print(f"[bold]{findings['headline']}[/]", highlight=False)
        for sentence in findings["sentences"]:
            out.print(f"- {sentence}", highlight=False, soft_wrap=True)
        out.print(f"wrote {', '.join(outcome.written.values())} ({len(outcome.records)} updates in "
                  f"{outcome.seconds:.1f} s)", highlight=False, soft_wrap=True)
    if outcome.interrupted:
        err.print(f"[bold red]interrupted:[/] {len(outcome.records)} of {outcome.total} updates finished; their "
                  "results and the report are kept, and the same command finishes the rest", highlight=False,
                  soft_wrap=True)
        raise typer.Exit(130)
    outcome.raise_problems()


# --------------------------------------------------------------------------- reconstruct


@app.command()
def reconstruct(
    updates: Annotated[list[Path], typer.Argument(metavar="UPDATE...", help="The update file (from `gitool "
                       "capture`), or several, or folders of *.update.safetensors.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Reconstruction file to write (one "
                      "update).")] = None,
    out_dir: OutDirOpt = None,
    labels_path: Annotated[Optional[Path], typer.Option("--labels", "-l", help="Recovered labels (from `gitool "
                           "labels`; for many updates the folder of STEM.labels.safetensors).")] = None,
    features_path: Annotated[Optional[Path], typer.Option("--features", "-f", help="Recovered last-layer features "
                             "(from `gitool features`; for many updates their folder); without it a single-sample gradient with a classifier bias "
                             "uses the bias ratio x = dW_i / db_i.")] = None,
    method: Annotated[str, typer.Option("--method", help=RECON_METHOD_HELP)] = "conv",
    png: Annotated[Optional[Path], typer.Option("--png", help="Also write the reconstructed images as a PNG "
                   "grid.")] = None,
    explain: Annotated[bool, typer.Option("--explain", help="Before solving, print per layer the unknowns, "
                       "gradient and weight equations and whether the counts allow a solution.")] = False,
    solver: Annotated[str, typer.Option("--solver", help="auto (dense up to --dense-limit unknowns, else "
                      "iterative) | dense (Cholesky of the normal equations, refined) | iterative (matrix-free "
                      "CGLS with conv as the operator).")] = "auto",
    constraints: Annotated[str, typer.Option("--constraints", help="auto (gradient rows; add the forward/weight "
                           "rows where they fall short) | gradient | both.")] = "auto",
    tol: Annotated[float, typer.Option("--tol", help="Iterative solver: stop at this relative normal-equation "
                   "residual.")] = 1e-13,
    max_iter: Annotated[int, typer.Option("--max-iter", help="Iterative solver: most iterations per layer.")]
    = 3000,
    condition_limit: Annotated[float, typer.Option("--condition-limit", help="A layer whose condition number "
                               "exceeds this counts as rank-deficient.")] = 1e8,
    dense_limit: Annotated[int, typer.Option("--dense-limit", help="Largest dense system (unknowns) before "
                           "--solver auto switches to the iterative solver.")] = 4096,
    distance: Annotated[Optional[str], typer.Option("--distance", help="optimize: cosine (Inverting Gradients, "
                        "over all layers) | l2 (DLG). Default: l2 for a model without batch norm, cosine with.",
                        rich_help_panel="--method optimize")] = None,
    tv: Annotated[Optional[float], typer.Option("--tv", help="optimize: total-variation weight (paper: 1e-2 "
                  "untrained, 1e-3 trained). Default: 0 without batch norm, 1e-2 with.",
                  rich_help_panel="--method optimize")] = None,
    terms: Annotated[str, typer.Option("--terms", help="optimize: g (every gradient) | f (the feature term "
                     "instead of the last-layer weight gradient) | gf (both).",
                     rich_help_panel="--method optimize")] = "g",
    feature_weight: Annotated[float, typer.Option("--feature-weight", help="optimize: weight f of the feature "
                              "term.", rich_help_panel="--method optimize")] = 1.0,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", help="optimize: adam (lr x 0.1 at 3/8, 5/8, "
                         "7/8) | lbfgs (20 inner steps per iteration, strong-Wolfe line search). Default (chosen by "
                         "benchmark): lbfgs for a model without batch norm, adam with.",
                         rich_help_panel="--method optimize")] = None,
    iterations: Annotated[Optional[int], typer.Option("--iterations", help="optimize: iterations per restart "
                          "(default 2000 adam, 200 lbfgs).", rich_help_panel="--method optimize")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="optimize: step size (default 0.1 adam, 1 lbfgs).",
                  rich_help_panel="--method optimize")] = None,
    restarts: Annotated[int, typer.Option("--restarts", help="optimize: random starts; the lowest objective wins "
                        "(never the truth).", rich_help_panel="--method optimize")] = 1,
    signed: Annotated[Optional[bool], typer.Option("--signed/--no-signed", help="optimize: Adam steps on the sign "
                      "of the image gradient (Inverting Gradients' code; what makes eval-mode ResNet-18 work). "
                      "Default: on for a model with batch norm.", rich_help_panel="--method optimize")] = None,
    line_search: Annotated[bool, typer.Option("--line-search/--no-line-search", help="optimize: L-BFGS with a "
                           "strong-Wolfe line search (off: DLG's plain steps).",
                           rich_help_panel="--method optimize")] = True,
    joint_labels: Annotated[bool, typer.Option("--joint-labels", help="optimize: learn the labels jointly (DLG; "
                            "implied without --labels).", rich_help_panel="--method optimize")] = False,
    layer_weights: Annotated[Optional[str], typer.Option("--layer-weights", help="optimize: per-layer weights "
                             "NAME=W,NAME=W (parameter names as `gitool inspect` lists them).",
                             rich_help_panel="--method optimize")] = None,
    save_every: Annotated[int, typer.Option("--save-every", help="optimize: PNG of the current images every N "
                          "iterations (0: never), into --save-dir.", rich_help_panel="--method optimize")] = 0,
    save_dir: Annotated[Optional[Path], typer.Option("--save-dir", help="optimize: folder for --save-every "
                        "(default: STEM.optimize-steps next to --output).", rich_help_panel="--method optimize")]
    = None,
    time_budget: Annotated[float, typer.Option("--time-budget", help="optimize: stop after this many seconds and "
                           "write the best iterate (lowest objective seen); 0: no limit. Ctrl-C / SIGTERM do the "
                           "same, then exit 130 / 143.", rich_help_panel="--method optimize")] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="optimize: seed of the random starts.",
                    rich_help_panel="--method optimize")] = 0,
    model: TrustOpt = None,
    device: DeviceOpt = "cpu",
    json_output: JsonOpt = False,
) -> None:
    """Reconstruct the client's input images from the update, the recovered labels and features.

    Example: gitool reconstruct run/c.update.safetensors --labels run/c.labels.safetensors --features run/c.features.safetensors --method fc -o run/c.reconstruction.safetensors --png run/c.png
    """
    options = {"solver": solver, "constraints": constraints, "tol": tol, "max_iter": max_iter,
               "condition_limit": condition_limit, "dense_limit": dense_limit}
    if method == "optimize":
        options = {"distance": distance, "tv": tv, "terms": terms, "feature_weight": feature_weight,
                   "optimizer": optimizer, "iterations": iterations, "lr": lr, "restarts": restarts,
                   "signed": signed, "line_search": line_search, "joint_labels": joint_labels,
                   "layer_weights": layer_weights, "save_every": save_every,
                   "save_dir": str(save_dir) if save_dir else None, "time_budget": time_budget}
    many = len(updates) > 1 or updates[0].is_dir()
    with reporting(enabled=not json_output) as progress:
        batch = step.reconstruct_files(
            updates=updates, output=output, out_dir=out_dir, labels_path=labels_path, features_path=features_path,
            method=method, png=png, options=options, seed=seed, model=model, device=device,
            explain=(lambda rows: err.print(explain_table(rows))) if explain and not json_output else None,
            on_iteration=None if many else lambda done, total, info: progress.update(done, total, iteration_line(
                method, info)), progress=progress if many else None)
    print_reconstructions(batch.rows, json_output, batch.failures)
    batch.raise_failures(len(batch.rows) + len(batch.failures))


# --------------------------------------------------------------------------- score


@app.command()
def score(
    results: Annotated[list[Path], typer.Argument(help="labels / features / reconstruction files, or folders.")],
    truth: Annotated[Optional[Path], typer.Option("--truth", "-t", help="The truth file (one result).")] = None,
    truth_dir: Annotated[Optional[Path], typer.Option("--truth-dir", help="Folder of truth files matched by "
                         "stem (0007.labels -> 0007.truth).")] = None,
    png: Annotated[Optional[Path], typer.Option("--png", help="For one reconstruction: a PNG grid with the truth "
                   "above and the matched reconstruction below, PSNR / SSIM in the captions.")] = None,
    lpips_weights: Annotated[Optional[Path], typer.Option("--lpips-weights", help="Local AlexNet LPIPS weights "
                             "(torchvision features.* + lpips lin*.weight, .safetensors or torch state dict); "
                             "without them LPIPS is skipped.")] = None,
    allow_mismatch: Annotated[bool, typer.Option("--allow-mismatch", help="Score a result against the truth of "
                              "another update without failing (a re-imported export, say); the mismatch is still "
                              "reported.")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Compare recovered labels, counts, features or images with the truth (methods.md section 4 conventions).

    Images: PSNR (peak 1, per image, then averaged) and SSIM (Gaussian 11x11, sigma 1.5)
    after one-to-one Hungarian matching on MSE; LPIPS (AlexNet) only with --lpips-weights,
    since gitool bundles no network weights and downloads nothing (the output says so).

    Example: gitool score run/c.labels.safetensors --truth run/c.truth.safetensors
    """
    report = step.score(results=results, truth=truth, truth_dir=truth_dir, png=png, lpips_weights=lpips_weights,
                         warn=lambda line: err.print(f"[bold yellow]warning:[/] {line}", highlight=False,
                                                     soft_wrap=True))
    if json_output:
        emit_json(report)
    else:
        print_scores(report, png)
    step.refuse_mismatch(report["files"], allow_mismatch)


# --------------------------------------------------------------------------- inspect


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="Any gitool file.")],
    model: TrustOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Show a file's kind, version, metadata and a table of its tensors (shape, dtype, norm, range).

    Any parseable gitool file is shown, also one that the attack commands would refuse:
    the reason is printed as a warning (and in --json as "problem"). Statistics are
    computed piece by piece, so a huge tensor costs no more memory than a small one.

    Example: gitool inspect run/0000.update.safetensors
    """
    document = step.inspect(file=file, model=model)
    if json_output:
        emit_json(document)
        return
    print_inspection(document)


# --------------------------------------------------------------------------- import and export


@app.command("import")
def import_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="The update file to write.")],
    before: Annotated[Path, typer.Option("--before", help="The global weights the server sent: .safetensors, "
                      ".pt/.pth (loaded weights-only), or an .npz list in state_dict order (buffers included).")],
    after: Annotated[Optional[Path], typer.Option("--after", help="The client's weights after local training: "
                     "the update is after - before.")] = None,
    delta: Annotated[Optional[Path], typer.Option("--delta", help="The update itself, after - before (as some "
                     "stacks send it).")] = None,
    grad: Annotated[Optional[Path], typer.Option("--grad", help="A gradient state dict (one step, the mean over "
                    "the batch as PyTorch's default loss reduction gives).")] = None,
    facts: Annotated[Optional[Path], typer.Option("--facts", help="Training facts, .toml or .json: sections "
                     "training, loss, input, defence (docs/FORMAT.md); options below override it.")] = None,
    model: ModelOpt = None,
    num_classes: NumClassesOpt = None,
    image_size: ImageSizeOpt = None,
    activation: ActivationOpt = None,
    bias: NoBiasOpt = None,
    model_opt: ModelOptOpt = None,
    model_output: ModelOutputOpt = None,
    batch_size: BatchSizeOpt = None,
    steps: StepsOpt = None,
    lr: LrOpt = None,
    optimizer: OptimizerOpt = None,
    momentum: MomentumOpt = None,
    prox_mu: ProxMuOpt = None,
    weight_decay: WeightDecayOpt = None,
    mode: ModeOpt = None,
    hard_labels: Annotated[bool, typer.Option("--hard-labels", help="The client trained on plain one-hot "
                           "labels.", rich_help_panel="labels the client trained on")] = False,
    label_smoothing: LabelSmoothingOpt = None,
    mixup: MixupOpt = None,
    mixup_coef: MixupCoefOpt = None,
    normalize: NormalizeOpt = None,
    no_defence: Annotated[bool, typer.Option("--no-defence", help="The client applied no DP noise and no "
                          "pruning.", rich_help_panel="defences")] = False,
    dp_clip: DpClipOpt = None,
    dp_noise: DpNoiseOpt = None,
    prune: PruneOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Turn weights saved by another federated-learning stack into an update file gitool attacks.

    Give the global weights (--before) and what the client produced: its weights after
    local training (--after), the difference (--delta) or a gradient (--grad). Training
    facts the files cannot tell come from options or --facts; a fact nobody gave is
    recorded as unknown, and an attack that needs it says so instead of guessing.

    Example: gitool import --model mynet:make --before before.pt --after after.pt --batch-size 4 --steps 2 --lr 0.01 --optimizer sgd --hard-labels -o client.update.safetensors
    """
    options = dict(locals())
    json_output = options.pop("json_output")
    update = step.import_files(**options)
    unknown = update.provenance["unknown_facts"]
    if json_output:
        emit_json({"output": str(output), "kind": update.kind, "model": update.model.to_dict(),
                   "dtype": update.training.dtype, "unknown_facts": unknown,
                   "sources": update.provenance["imported"]})
        return
    shape = "x".join(map(str, update.model.input_shape))
    out.print(f"wrote {output}: a {update.kind} of {update.model.name} (K={update.model.num_classes}, {shape}, "
              f"{update.training.dtype})", highlight=False)
    if unknown:
        err.print(f"unknown facts (attacks that need them will ask): {', '.join(unknown)}", highlight=False)


@app.command("truth")
def truth_command(
    update_file: Annotated[Path, typer.Argument(metavar="UPDATE", help="The update the private batch belongs to.")],
    private: Annotated[Path, typer.Option("--private", help="The client's private batch: torch.save({'images': "
                       "images, 'labels': labels}, 'private.pt') (.pt read weights-only; or the same names in "
                       ".safetensors or .npz). N = B x m samples in step order; images in [0, 1] or 'inputs' as "
                       "the model saw them; labels as N class indices or N x K soft labels.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The truth file to write.")],
    model: TrustOpt = None,
    device: DeviceOpt = "cpu",
    json_output: JsonOpt = False,
) -> None:
    """Make the truth file of an imported update from the client's own private batch, so that `gitool score` can tell what leaked.

    The client's local training is replayed on the batch from the update's global weights
    (for the last-layer features at each step); the replay must give back the update, and
    how closely it does is printed and recorded.

    Example: gitool truth client.update.safetensors --private private.pt --model mynet:make -o client.truth.safetensors
    """
    report = step.truth(update_file=update_file, private=private, output=output, model=model, device=device)
    if json_output:
        emit_json({key: report[key] for key in ("output", "samples", "replay_error", "replays")})
        return
    count = report["samples"]
    out.print(f"wrote {output}: {count} sample{'s' if count != 1 else ''} of {report['model']}", highlight=False)
    (out if report["replays"] else err).print(report["summary"], highlight=False, soft_wrap=True)


@app.command("export")
def export_command(
    update_file: Annotated[Path, typer.Argument(help="The update file to write out.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="OUT.pt (one bundle) or OUT.npz (writes "
                      "OUT.before.npz, OUT.delta.npz + OUT.after.npz or OUT.gradient.npz); OUT.facts.json "
                      "beside it in both cases.")],
    fmt: Annotated[Optional[str], typer.Option("--format", help="pt | npz (default: from the output's "
                   "suffix).")] = None,
    model: TrustOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Write an update out for other tools: a torch bundle of plain tensors (loads with
    weights_only=True) or Flower-style NumPy lists in state_dict order, with a JSON facts file.

    Example: gitool export run/c.update.safetensors -o out.npz
    """
    written = step.export(update_file=update_file, output=output, fmt=fmt, model=model)
    if json_output:
        emit_json({"update": str(update_file), "written": {part: str(path) for part, path in written.items()}})
        return
    for part, path in written.items():
        out.print(f"wrote {path}  ({part})", highlight=False)


# --------------------------------------------------------------------------- train


@app.command()
def train(
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint to write (.safetensors).")],
    model: ModelOpt = None,
    num_classes: NumClassesOpt = None,
    image_size: ImageSizeOpt = None,
    activation: ActivationOpt = None,
    bias: NoBiasOpt = None,
    init: InitOpt = "default",
    model_opt: ModelOptOpt = None,
    model_output: ModelOutputOpt = None,
    data: Annotated[str, typer.Option("--data", "-d", help="Data source to train on.")] = "synthetic",
    normalize: Annotated[str, typer.Option("--normalize", help="Normalisation used in training.")] = "none",
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the data.")] = 10,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate (cosine schedule).")] = 3e-3,
    batch_size: Annotated[int, typer.Option("--batch-size", "-B", help="Mini-batch size.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed for init and shuffling.")] = 0,
    device: DeviceOpt = "cpu",
    json_output: JsonOpt = False,
) -> None:
    """Train a model of the zoo on a data source and write a checkpoint, so trained models can be attacked.

    Example: gitool train --model lenet --data synthetic:300 --epochs 5 -o lenet.safetensors
    """
    options = dict(locals())
    json_output = options.pop("json_output")
    with reporting(enabled=not json_output) as progress:
        document = step.train(**options, on_epoch=lambda name, epoch, total, loss: progress.update(
            epoch, total, f"training {name}" + (f" loss {loss:.3f}" if epoch else "")))
    if json_output:
        emit_json({k: v for k, v in document.items() if k != "model"})
        return
    out.print(f"wrote {output}: {document['model']} trained {epochs} epochs on {data}, train accuracy "
              f"{document['train_accuracy']:.1%}, held-out accuracy {document['heldout_accuracy']:.1%}",
              highlight=False)


# --------------------------------------------------------------------------- models and data


@app.command("models")
def list_models(json_output: JsonOpt = False) -> None:
    """List the model zoo and the data sources with their options.

    Example: gitool models --json
    """
    from gitool.data import describe_sources
    from gitool.models import describe_models

    models, sources = describe_models(), describe_sources()
    if json_output:
        emit_json({"models": [row._asdict() for row in models], "data": sources})
        return
    print_models(models, sources)


# --------------------------------------------------------------------------- demo


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out-dir", "-o", help="Folder for every file of the demo.")]
    = Path("gitool-demo"),
    json_output: JsonOpt = False,
) -> None:
    """Run the whole attack chain on the bundled samples and write every file, PNG and a summary.json.

    Example: gitool demo --out-dir gitool-demo
    """
    from gitool.demo import run_demo

    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out-dir {out_dir} is a file, not a folder")
    with reporting(enabled=not json_output) as progress:
        summary = run_demo(out_dir, on_step=lambda name, i, n: progress.update(i, n, name))
    if json_output:
        emit_json(summary)
        return
    table = Table(title=f"gitool demo: {summary['seconds']:.1f} s, files in {out_dir}")
    table.add_column("step")
    table.add_column("result")
    for row in summary["steps"]:
        table.add_row(row["name"], row["headline"])
    out.print(table)


# --------------------------------------------------------------------------- printing results


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4f}"
    return str(value)


def _fmt_short(value: Any) -> str:
    return "-" if value is None else f"{value:.2g}"


def _fmt_stat(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


def print_inspection(document: dict[str, Any]) -> None:
    from rich.pretty import Pretty

    out.print(f"[bold]{document['path']}[/]: gitool [cyan]{document['kind']}[/] file, format {document['version']} "
              f"({document['producer']})", highlight=False)
    out.print(Pretty(document["metadata"], max_length=12, max_string=200, max_depth=6))
    table = Table(title=f"{len(document['tensors'])} tensors", show_lines=False)
    for column in ("name", "shape", "dtype", "norm", "min", "max"):
        table.add_column(column, justify="right" if column in ("norm", "min", "max") else "left",
                         overflow="fold", no_wrap=column != "name")
    for row in document["tensors"]:
        table.add_row(row["name"], "x".join(map(str, row["shape"])) or "scalar", row["dtype"], _fmt_stat(row["norm"]),
                      _fmt_stat(row["min"]), _fmt_stat(row["max"]))
    out.print(table)
    if document["problem"]:
        err.print(f"[bold yellow]warning:[/] the attack commands would refuse this file: {document['problem']}",
                  highlight=False, soft_wrap=True)
    if document["unchecked"]:
        err.print(f"[bold yellow]warning:[/] {document['unchecked']}", highlight=False, soft_wrap=True)


def print_scores(report: dict[str, Any], png: Path | None) -> None:
    from gitool import metrics

    rows, summary = report["files"], report["summary"]
    for note in report["notes"]:
        err.print(f"note: {note}", highlight=False)
    if png is not None:
        err.print(f"wrote {png}", highlight=False)
    for kind in summary:
        mine = [r for r in rows if r["kind"] == kind]
        columns = [c for c in metrics.HEADLINE[kind] if any(c in r for r in mine)]
        table = Table(title=f"{kind}")
        table.add_column("file", overflow="fold")
        table.add_column("method")
        for column in columns:
            table.add_column(column, justify="right", overflow="fold")
        for row in mine:
            table.add_row(Path(row["file"]).name, row["method"], *(_fmt(row.get(c)) for c in columns))
        if len(mine) > 1:
            agg = summary[kind]
            table.add_row(f"mean of {agg['files']}", "", *(_fmt(agg.get(c)) for c in columns), style="bold")
        out.print(table)


def explain_table(rows: list[dict]) -> Table:
    table = Table(title="layers, top first (counts before solving; numerical ranks follow the solve)")
    for column in ("layer", "kind", "unknowns", "gradient eqs", "weight eqs", "solvable"):
        table.add_column(column, justify="right" if "eqs" in column or column == "unknowns" else "left")
    for row in rows:
        table.add_row(row["layer"], row["kind"], str(row["unknowns"]), str(row["gradient_equations"]),
                      str(row["weight_equations"]), row["solvable"])
    return table


def layers_table(layers: list[dict]) -> Table:
    from rich import box

    table = Table(title="per layer, top first", box=box.SIMPLE)
    for column in ("layer", "rows used", "unknowns", "rank/iters", "cond", "residual", "s"):
        table.add_column(column, justify="left" if column in ("layer", "rows used") else "right")
    for layer in layers:
        rank = layer.get("rank") if layer.get("rank") is not None else layer.get("iterations")
        rows = {"gradient": "grad", "both": "grad+fwd"}.get(layer.get("constraints"), "-")
        table.add_row(layer["layer"], f"{rows} {layer.get('solver', '')}", _fmt(layer.get("unknowns")), _fmt(rank),
                      _fmt_short(layer.get("condition")), _fmt_short(layer.get("gradient_residual")),
                      _fmt_short(layer.get("seconds")))
    return table


def iteration_line(method: str, info: dict) -> str:
    what = (f"loss {info['loss']:.3e}, restart {info.get('restart', 1)}, iteration {info.get('iteration', '?')}"
            if "loss" in info else info.get("layer", ""))
    return f"{method}: {what}"


def print_reconstructions(rows: list[dict[str, Any]], json_output: bool, failures: list[dict]) -> None:
    if json_output:
        for row in rows:
            for line in row["diagnostics"].get("warnings", []):
                err.print(line, highlight=False)
        documents = [{k: v for k, v in row.items() if k not in ("summary", "update")} for row in rows]
        emit_json(documents[0] if len(rows) == 1 and not failures else
                  {"files": [{"update": row["update"], **doc} for row, doc in zip(rows, documents)],
                   "failed": failures})
        return
    for row in rows:
        if len(rows) > 1:
            out.print(f"[bold]{row['update']}[/]", highlight=False)
        if row["diagnostics"].get("layers"):
            out.print(layers_table(row["diagnostics"]["layers"]))
        for line in row["summary"]:
            out.print(line, highlight=False)
        out.print(f"wrote {row['output']}" + (f" and {row['png']}" if row["png"] else ""), highlight=False)


def print_label_rows(rows: list[dict[str, Any]]) -> None:
    if len(rows) == 1:
        for line in rows[0]["summary"]:
            style = "yellow" if line.startswith("warning") else None
            out.print(line, style=style, highlight=False, soft_wrap=True)
        out.print(f"wrote {rows[0]['output']}", highlight=False)
        return
    table = Table(title=f"labels: {len(rows)} file(s)")
    for column in ("file", "method", "family", "top classes", "eps / mix coef", "loss", "residual", "ok", "ms"):
        table.add_column(column, justify="right" if column in ("loss", "residual", "ms") else "left",
                         overflow="fold")  # fold, never cut, a name the user may copy
    for row in rows:
        d = row["diagnostics"]
        top = ", ".join(f"{c}: {v:.3f}" for c, v in row.get("top", []))
        if d.get("family") == "mixup":
            extra = f"{d.get('mixup_coef', 0):.4f}"
        elif "label_smoothing" in d:
            extra = f"{d['label_smoothing']:.4f}"
        else:
            extra = "-"
        if d.get("ambiguous"):
            ok = "ambiguous"
        else:  # count methods report no convergence: nothing to say, rather than a false "no"
            ok = "-" if "converged" not in d else "yes" if d["converged"] else "no"
        table.add_row(Path(row["update"]).name, row["method"], str(d.get("family", "-")), top or "-", extra,
                      _fmt(d.get("loss")), _fmt(d.get("residual")), ok, f"{1e3 * row['seconds']:.1f}")
    out.print(table)


def print_feature_rows(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        d = row["diagnostics"]
        what = (f"feature of {row['shape'][1]} values" if row["shape"][0] == 1
                else f"{row['shape'][0]} features of {row['shape'][1]} values")
        out.print(f"wrote {row['output']}: {what} (norm {d['norm']:.4g}) by the "
                  f"{d['method']} path; (feature, label) reproduce the gradient to a relative residual of "
                  f"{d['residual']:.2e}", highlight=False, soft_wrap=True)
        if "warning" in d:
            err.print(f"[yellow]warning:[/] {d['warning']}", highlight=False, soft_wrap=True)


def print_models(models: list, sources: list[tuple[str, str]]) -> None:
    table = Table(title="models (--model NAME, or package.module:factory); init, bias and options as their papers")
    for column in ("name", "description", "options", "init", "bias", "paper"):
        table.add_column(column, overflow="fold")
    for row in models:
        table.add_row(row.name, row.description, ", ".join(f"{k}={v}" for k, v in row.options.items()), row.init,
                      "yes" if row.last_bias else "no", row.paper)
    out.print(table)
    table = Table(title="data sources (--data SPEC)")
    table.add_column("spec")
    table.add_column("description")
    for name, description in sources:
        table.add_row(name, description)
    out.print(table)


if __name__ == "__main__":
    main()
