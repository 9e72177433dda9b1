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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gitool import __version__
from gitool.errors import GitoolError, UsageError
from gitool.paths import identity, refuse_overlap
from gitool.resolve import parse_float_range, parse_int_list, parse_normalization, resolve_model, trust_models

# Commands in the order of an attack chain, then the tools around it.
CHAIN_ORDER = ("capture", "labels", "features", "reconstruct", "score", "inspect", "import", "export", "train",
               "models", "demo")


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


def main() -> None:
    """Console entry point: one clear line and an exit code instead of a traceback."""
    from gitool.atomic import Terminated, install_signal_handlers

    install_signal_handlers()
    try:
        app()
    except GitoolError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("[bold red]error:[/] interrupted; files finished before stayed as they were")
        sys.exit(130)
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


def progress_bar(enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=not enabled,
        transient=False,
    )


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
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout, nothing else.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="torch device: cpu, cuda, cuda:1 ...")]
LABEL_METHOD_HELP = __import__("gitool.labels", fromlist=["METHOD_HELP"]).METHOD_HELP
RECON_METHOD_HELP = __import__("gitool.reconstruct", fromlist=["METHOD_HELP"]).METHOD_HELP
TrustOpt = Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Trust the user model factory "
                     "package.module:factory that the update names (importing it runs that module's code); "
                     "gitool never imports code because a file names it. Zoo models need nothing.")]


@contextlib.contextmanager
def option_errors():
    """Turn a spec's refusal (gitool.specs.SpecError) into a usage error naming the option."""
    from gitool.specs import SpecError, as_option_error

    try:
        yield
    except SpecError as exc:
        raise as_option_error(exc, UsageError) from None


def check_seed(seed: int, count: int = 1) -> None:
    """Seeds S .. S + count - 1 must fit the generators (numpy's and torch's take 0 .. 2**63 - 1 here)."""
    from gitool.specs import MAX_SEED

    if not 0 <= seed <= MAX_SEED - (count - 1):
        raise UsageError(f"--seed must be in [0, 2**63 - 1]{' less --repeat' if count > 1 else ''}, got {seed}")


def check_device(device: str) -> None:
    if device == "cpu":  # no need to start torch for the default
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")


def check_output(path: Path | None, what: str = "--output") -> None:
    if path is not None and path.parent and not path.parent.exists():
        raise UsageError(f"{what}: folder {path.parent} does not exist")


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
    check_device(device)
    if repeat < 1:
        raise UsageError("--repeat must be at least 1")
    check_seed(seed, repeat)
    if repeat > 1 and out_dir is None:
        raise UsageError("--repeat N needs --out-dir DIR")
    if out_dir is None and output is None:
        raise UsageError("give -o/--output FILE (or --out-dir DIR)")
    if out_dir is not None and (output is not None or truth is not None):
        raise UsageError("--out-dir names its files itself; drop -o/--truth")
    if label_smoothing is not None and (mixup is not None or mixup_coef is not None):
        raise UsageError("choose label smoothing or mixup, not both")
    if mixup is not None and mixup_coef is not None:
        raise UsageError("choose --mixup ALPHA or --mixup-coef C, not both")
    family, eps_fixed, eps_range = "hard", None, None
    if label_smoothing is not None:
        family = "smoothing"
        lo, hi = parse_float_range(label_smoothing, "--label-smoothing")
        eps_fixed, eps_range = (lo, None) if lo == hi else (None, (lo, hi))
    elif mixup is not None or mixup_coef is not None:
        family = "mixup"
    if optimizer == "fedprox" and prox_mu == 0:
        raise UsageError("--optimizer fedprox needs --prox-mu > 0")
    from gitool.capture import CaptureConfig, SampleChoice, capture as run_capture
    from gitool.data import open_source
    from gitool.files import DefenceSpec, InputSpec, LossSpec, TrainingSpec, save_capture

    spec, init_state, checkpoint_meta, init = resolve_model(model, num_classes, image_size, activation, bias, model_opt,
                                                      init)
    from gitool.models import build_model

    build_model(spec)  # validate the model before touching data
    if normalize is None and "normalize" in checkpoint_meta:  # attack the model as it was trained
        mean, std = tuple(checkpoint_meta["normalize"]["mean"]), tuple(checkpoint_meta["normalize"]["std"])
    else:
        mean, std = parse_normalization(normalize or "none", spec.input_shape[0])
    with option_errors():
        loss = LossSpec(family=family, label_smoothing=eps_fixed, label_smoothing_range=eps_range,
                        mixup_alpha=mixup, mixup_coef=mixup_coef)
        training = TrainingSpec(batch_size=batch_size, steps=steps, lr=lr, optimizer=optimizer,
                                momentum=momentum if optimizer == "momentum" else 0.0,
                                prox_mu=prox_mu if optimizer == "fedprox" else 0.0,
                                weight_decay=weight_decay, model_mode=mode, dtype=dtype)
        defence = DefenceSpec(dp_clip=dp_clip, dp_noise=dp_noise, prune=prune)
        InputSpec(shape=tuple(spec.input_shape), mean=mean, std=std)
    source = open_source(data, tuple(spec.input_shape), num_classes=spec.num_classes, seed=0)
    choice = SampleChoice(indices=parse_int_list(indices, "--indices"), classes=parse_int_list(classes, "--classes"),
                          dirichlet_alpha=dirichlet)
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"--out-dir {out_dir} is a file")
        pairs = [(out_dir / f"{i:04d}.update.safetensors", out_dir / f"{i:04d}.truth.safetensors")
                 for i in range(repeat)]
    else:
        check_output(output)
        truth = truth or output.parent / f"{_stem(output)}.truth.safetensors"
        check_output(truth, "--truth")
        if identity(truth) == identity(output):  # the truth would silently replace the update
            raise UsageError(f"the update and the truth would both be {output}; name the update "
                             "STEM.update.safetensors or give another --truth")
        pairs = [(output, truth)]
    refuse_overlap([("--init", Path(init) if init not in (None, "uniform", "default") else None)],
                   [(what, path) for pair in pairs for what, path in zip(("the update", "the truth"), pair)])
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    written = []
    started = time.perf_counter()
    with progress_bar(enabled=repeat > 1) as bar:
        task = bar.add_task("capturing", total=repeat)
        for i in range(repeat):
            config = CaptureConfig(loss=loss, training=training, defence=defence,
                                   input=InputSpec(shape=tuple(spec.input_shape), mean=mean, std=std),
                                   choice=choice, send=send, init=init, seed=seed + i, device=device)
            update, truth_obj = run_capture(source, spec, config, init_state=init_state, provenance={"data": data})
            update_path, truth_path = pairs[i]
            save_capture(update, truth_obj, update_path, truth_path)
            written.append({"update": str(update_path), "truth": str(truth_path), "seed": seed + i,
                            "kind": update.kind})
            bar.advance(task)
    elapsed = time.perf_counter() - started
    if json_output:
        emit_json({"written": written, "seconds": elapsed})
        return
    last = written[-1]
    err.print(f"wrote {len(written)} capture(s) in {elapsed:.2f} s: {spec.name}, K={spec.num_classes}, "
              f"B={batch_size}, m={steps}, {family}, sends the {last['kind']}")
    for row in written[:5]:
        out.print(f"  {row['update']}  {row['truth']}", highlight=False)
    if len(written) > 5:
        out.print(f"  ... and {len(written) - 5} more in {out_dir}", highlight=False)


def _stem(path: Path) -> str:
    from gitool.files import stem_of

    return stem_of(path)


# --------------------------------------------------------------------------- inspect


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="Any gitool file.")],
    json_output: JsonOpt = False,
) -> None:
    """Show a file's kind, version, metadata and a table of its tensors (shape, dtype, norm, range).

    Any parseable gitool file is shown, also one that the attack commands would refuse:
    the reason is printed as a warning (and in --json as "problem"). Statistics are
    computed piece by piece, so a huge tensor costs no more memory than a small one.

    Example: gitool inspect run/0000.update.safetensors
    """
    from gitool.inspect import inspect_file

    document = inspect_file(file)
    if json_output:
        emit_json(document)
        return
    out.print(f"[bold]{document['path']}[/]: gitool [cyan]{document['kind']}[/] file, format {document['version']} "
              f"({document['producer']})", highlight=False)
    from rich.pretty import Pretty

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


def _fmt_stat(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


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
    import torch

    from gitool.data import open_source
    from gitool.files import Checkpoint, InputSpec, load_state, save_checkpoint
    from gitool.models import build_model, init_parameters
    from gitool.train import check_settings, train_model

    check_device(device)
    check_seed(seed)
    check_output(output)
    refuse_overlap([("--init", Path(init) if init not in (None, "uniform", "default") else None)], [("--output", output)])
    check_settings(epochs=epochs, lr=lr, batch_size=batch_size)
    spec, init_state, _, _ = resolve_model(model, num_classes, image_size, activation, bias, model_opt, init)
    mean, std = parse_normalization(normalize, spec.input_shape[0])
    torch.manual_seed(seed)
    net = build_model(spec)
    if init_state is not None:
        load_state(net, init_state, what="checkpoint weights")
    else:
        init_parameters(net, init, torch.Generator().manual_seed(seed))
    source = open_source(data, tuple(spec.input_shape), num_classes=spec.num_classes, seed=0)
    input_spec = InputSpec(shape=tuple(spec.input_shape), mean=mean, std=std)
    started = time.perf_counter()
    with progress_bar(enabled=not json_output) as bar:
        task = bar.add_task(f"training {spec.name}", total=epochs)
        report = train_model(net, source, input_spec, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                             device=device, progress=lambda epoch, loss: bar.update(
                                 task, completed=epoch, description=f"training {spec.name} loss {loss:.3f}"))
    net = net.to("cpu")
    meta = {"data": data, "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
            "normalize": {"mean": mean, "std": std}, "train_accuracy": report.train_accuracy,
            "heldout_accuracy": report.heldout_accuracy, "final_loss": report.final_loss}
    save_checkpoint(Checkpoint(model=spec, state=dict(net.state_dict()), meta=meta), output)
    document = {"output": str(output), "seconds": time.perf_counter() - started, **meta}
    if json_output:
        emit_json(document)
        return
    out.print(f"wrote {output}: {spec.name} trained {epochs} epochs on {data}, train accuracy "
              f"{report.train_accuracy:.1%}, held-out accuracy {report.heldout_accuracy:.1%}", highlight=False)


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
    if truth is None and truth_dir is None:  # before any torch import
        raise UsageError("give --truth FILE (or --truth-dir DIR for many files)")
    from gitool import metrics
    from gitool.files import RESULT_KINDS, load_result, load_truth, stem_of

    paths: list[Path] = []
    for item in results:
        if item.is_dir():
            found = sorted(p for kind in RESULT_KINDS for p in item.glob(f"*.{kind}.safetensors"))
            if not found:
                raise GitoolError(f"{item}: no labels, features or reconstruction files in this folder")
            paths.extend(found)
        else:
            paths.append(item)
    if truth is None and truth_dir is None:
        raise UsageError("give --truth FILE (or --truth-dir DIR for many files)")
    if truth is not None and len(paths) > 1:
        raise UsageError("--truth takes one result file; use --truth-dir DIR for many")
    if png is not None and len(paths) != 1:
        raise UsageError("--png draws one reconstruction: give exactly one file")
    check_output(png, "--png")
    truth_paths = [truth if truth is not None else truth_dir / f"{stem_of(path)}.truth.safetensors" for path in paths]
    refuse_overlap([("the result", path) for path in paths] + [("the truth", t) for t in truth_paths]
                   + [("--lpips-weights", lpips_weights)], [("--png", png)])
    lpips_net = None
    if lpips_weights is not None:
        from gitool.lpips import load_lpips

        lpips_net = load_lpips(lpips_weights)
    rows = []
    for path, truth_path in zip(paths, truth_paths):
        result = load_result(path)
        truth_obj = load_truth(truth_path)
        _check_truth_fits_its_update(truth_obj)
        row = {"file": str(path), "kind": result.kind, "method": result.method, "truth": str(truth_path),
               **metrics.score(result, truth_obj)}
        mismatch = result.other_update_than(truth_obj)
        if mismatch:
            row["warning"] = mismatch
            err.print(f"[bold yellow]warning:[/] {mismatch}", highlight=False, soft_wrap=True)
        if result.kind == "reconstruction":
            row["lpips"] = None
            if lpips_net is not None:
                from gitool.lpips import lpips_distance

                recovered = result.require("images")[: len(row["matching"])]
                values = lpips_distance(lpips_net, recovered, truth_obj.images[row["matching"]])
                row["lpips"] = float(values.mean())
                row["lpips_per_image"] = [float(v) for v in values]
        rows.append(row)
        if png is not None:
            if result.kind != "reconstruction":
                raise UsageError(f"--png draws reconstructions; {path} is a {result.kind} file")
            from gitool.plotting import save_score_grid

            save_score_grid(result.require("images"), truth_obj.images, row, png, title=Path(row["file"]).name)
    kinds = sorted({r["kind"] for r in rows})
    summary = {kind: metrics.aggregate([r for r in rows if r["kind"] == kind], kind) for kind in kinds}
    notes = [LPIPS_SKIPPED] if "reconstruction" in kinds and lpips_net is None else []
    mismatched = [row for row in rows if "warning" in row]
    if json_output:
        emit_json({"files": rows, "summary": summary, "notes": notes})
        _refuse_mismatch(mismatched, allow_mismatch)
        return
    for note in notes:
        err.print(f"note: {note}", highlight=False)
    if png is not None:
        err.print(f"wrote {png}", highlight=False)
    for kind in kinds:
        columns = [c for c in metrics.HEADLINE[kind] if any(c in r for r in rows if r["kind"] == kind)]
        table = Table(title=f"{kind}")
        table.add_column("file", overflow="fold")
        table.add_column("method")
        for column in columns:
            table.add_column(column, justify="right")
        for row in (r for r in rows if r["kind"] == kind):
            table.add_row(Path(row["file"]).name, row["method"], *(_fmt(row.get(c)) for c in columns))
        if len([r for r in rows if r["kind"] == kind]) > 1:
            agg = summary[kind]
            table.add_row(f"mean of {agg['files']}", "", *(_fmt(agg.get(c)) for c in columns), style="bold")
        out.print(table)
    _refuse_mismatch(mismatched, allow_mismatch)


def _check_truth_fits_its_update(truth) -> None:
    from gitool.files import check_fits_update, pointed_update

    update = pointed_update(truth.meta.get("update"), truth.path)
    if update is not None:
        check_fits_update("truth", {n: getattr(truth, n) for n in truth.TENSORS}, update, truth.path)


def _refuse_mismatch(mismatched: list[dict], allowed: bool) -> None:
    """Scores of a result against another update's truth are garbage that looks fine:
    they are printed, and the command fails unless the user said it is intended."""
    if mismatched and not allowed:
        raise GitoolError(f"{len(mismatched)} result(s) were scored against the truth of another update (first: "
                          f"{mismatched[0]['file']}); their numbers mean nothing. Pass --allow-mismatch if the "
                          "pairing is intended (a re-imported export)")


LPIPS_SKIPPED = ("LPIPS skipped: it needs pretrained network weights, none are bundled and nothing can be "
                 "downloaded here (give local ones with --lpips-weights)")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4f}"
    return str(value)


# --------------------------------------------------------------------------- reconstruct


def _explain_table(rows: list[dict]) -> Table:
    table = Table(title="layers, top first (counts before solving; numerical ranks follow the solve)")
    for column in ("layer", "kind", "unknowns", "gradient eqs", "weight eqs", "solvable"):
        table.add_column(column, justify="right" if "eqs" in column or column == "unknowns" else "left")
    for row in rows:
        table.add_row(row["layer"], row["kind"], str(row["unknowns"]), str(row["gradient_equations"]),
                      str(row["weight_equations"]), row["solvable"])
    return table


def _layers_table(layers: list[dict]) -> Table:
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


def _fmt_short(value: Any) -> str:
    return "-" if value is None else f"{value:.2g}"


@app.command()
def reconstruct(
    update_path: Annotated[Path, typer.Argument(metavar="UPDATE", help="The update file (from `gitool capture`).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Reconstruction file to write.")],
    labels_path: Annotated[Optional[Path], typer.Option("--labels", "-l", help="Recovered labels (from `gitool "
                           "labels`).")] = None,
    features_path: Annotated[Optional[Path], typer.Option("--features", "-f", help="Recovered last-layer features "
                             "(from `gitool features`); without it a single-sample gradient with a classifier bias "
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
    distance: Annotated[str, typer.Option("--distance", help="optimize: cosine (Inverting Gradients, over all "
                        "layers) | l2 (DLG).", rich_help_panel="--method optimize")] = "cosine",
    tv: Annotated[float, typer.Option("--tv", help="optimize: total-variation weight (paper: 1e-2 untrained, "
                  "1e-3 trained).", rich_help_panel="--method optimize")] = 1e-2,
    terms: Annotated[str, typer.Option("--terms", help="optimize: g (every gradient) | f (the feature term "
                     "instead of the last-layer weight gradient) | gf (both).",
                     rich_help_panel="--method optimize")] = "g",
    feature_weight: Annotated[float, typer.Option("--feature-weight", help="optimize: weight f of the feature "
                              "term.", rich_help_panel="--method optimize")] = 1.0,
    optimizer: Annotated[str, typer.Option("--optimizer", help="optimize: adam (lr x 0.1 at 3/8, 5/8, 7/8) | "
                         "lbfgs (20 inner steps per iteration, strong-Wolfe line search).",
                         rich_help_panel="--method optimize")] = "adam",
    iterations: Annotated[Optional[int], typer.Option("--iterations", help="optimize: iterations per restart "
                          "(default 4800 adam, 300 lbfgs).", rich_help_panel="--method optimize")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="optimize: step size (default 0.1 adam, 1 lbfgs).",
                  rich_help_panel="--method optimize")] = None,
    restarts: Annotated[int, typer.Option("--restarts", help="optimize: random starts; the lowest objective wins "
                        "(never the truth).", rich_help_panel="--method optimize")] = 1,
    signed: Annotated[bool, typer.Option("--signed", help="optimize: Adam steps on the sign of the image gradient "
                      "(Inverting Gradients' code; what makes eval-mode ResNet-18 work).",
                      rich_help_panel="--method optimize")] = False,
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
    seed: Annotated[int, typer.Option("--seed", help="optimize: seed of the random starts.",
                    rich_help_panel="--method optimize")] = 0,
    model: TrustOpt = None,
    device: DeviceOpt = "cpu",
    json_output: JsonOpt = False,
) -> None:
    """Reconstruct the client's input images from the update, the recovered labels and features.

    Example: gitool reconstruct run/c.update.safetensors --labels run/c.labels.safetensors --features run/c.features.safetensors --method fc -o run/c.reconstruction.safetensors --png run/c.png
    """
    from gitool.reconstruct import RECON_METHODS
    from gitool.reconstruct import reconstruct as run_reconstruction

    if method not in RECON_METHODS:  # before any torch import: a usage error answers at once
        raise UsageError(f"--method must be one of {', '.join(RECON_METHODS)}, got {method!r}")
    from gitool.files import load_result, load_update, new_result, save_result

    check_device(device)
    check_seed(seed)
    trust_models(model)
    check_output(output)
    check_output(png, "--png")
    refuse_overlap([("the update", update_path), ("--labels", labels_path), ("--features", features_path)],
                   [("--output", output), ("--png", png)])
    options = {"solver": solver, "constraints": constraints, "tol": tol, "max_iter": max_iter,
               "condition_limit": condition_limit, "dense_limit": dense_limit, "device": device}
    if method == "optimize":
        if save_every and save_dir is None:
            save_dir = output.parent / f"{_stem(output)}.optimize-steps"
        options = {"distance": distance, "tv": tv, "terms": terms, "feature_weight": feature_weight,
                   "optimizer": optimizer, "iterations": iterations, "lr": lr, "restarts": restarts,
                   "signed": signed, "line_search": line_search, "joint_labels": joint_labels,
                   "layer_weights": layer_weights, "save_every": save_every,
                   "save_dir": str(save_dir) if save_dir else None, "seed": seed, "device": device}
    RECON_METHODS[method].parse_options(options)  # bad values fail before any file is read
    update = load_update(update_path)
    labels = load_result(labels_path, ["labels"]) if labels_path is not None else None
    features = load_result(features_path, ["features"]) if features_path is not None else None
    if explain and method in ("fc", "conv") and not json_output:
        from gitool import reconstruct_analytic

        err.print(_explain_table(reconstruct_analytic.explain(update, method)))
    started = time.perf_counter()
    with progress_bar(enabled=not json_output) as bar:
        task = bar.add_task(f"reconstruct ({method})", total=None)
        def progress(done: int, total: int, info: dict) -> None:
            what = (f"loss {info['loss']:.3e}, restart {info.get('restart', 1)}" if "loss" in info
                    else info.get("layer", ""))
            bar.update(task, completed=done, total=total, description=f"{method}: {what}")

        outcome = run_reconstruction(update, labels, features, method, options, progress)
    seconds = time.perf_counter() - started
    result = new_result("reconstruction", {"images": outcome.images}, method=method, update=update,
                        options=outcome.options, diagnostics=outcome.diagnostics, wall_time=seconds)
    save_result(result, output)
    if png is not None:
        from gitool.plotting import save_image_grid

        save_image_grid(outcome.images, png, captions=[f"#{i}" for i in range(outcome.images.shape[0])])
    document = {"output": str(output), "png": str(png) if png else None, "method": method, "seconds": seconds,
                "images": list(outcome.images.shape), "diagnostics": outcome.diagnostics}
    if json_output:
        for line in outcome.diagnostics.get("warnings", []):
            err.print(line, highlight=False)
        emit_json(document)
        return
    if outcome.diagnostics.get("layers"):
        out.print(_layers_table(outcome.diagnostics["layers"]))
    for line in outcome.summary:
        out.print(line, highlight=False)
    out.print(f"wrote {output}" + (f" and {png}" if png else ""), highlight=False)


# --------------------------------------------------------------------------- labels and features


def _label_method(name: str, update):
    """The registry entry for ``name`` ("auto" picks from the update)."""
    from gitool.labels import label_method

    method = label_method(update, name)
    return method.name, method


def _label_row(path: Path, output: Path, name: str, outcome, seconds: float) -> dict[str, Any]:
    diagnostics = outcome.diagnostics
    row: dict[str, Any] = {"update": str(path), "output": str(output), "method": name, "seconds": seconds,
                           "diagnostics": diagnostics}
    if outcome.labels is not None:
        row["labels"] = outcome.labels
        if outcome.labels.shape[0] == 1:
            values = outcome.labels[0]
            top = values.topk(min(2, values.numel()))
            row["top"] = [(int(i), float(v)) for v, i in zip(top.values, top.indices)]
    if outcome.counts is not None:
        row["counts"] = outcome.counts
    return row


@app.command()
def labels(
    updates: Annotated[list[Path], typer.Argument(help="Update files, or folders of *.update.safetensors.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="The labels file (one update).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", help="Folder for many updates: each output keeps its "
                       "input's stem (0007.update -> 0007.labels).")] = None,
    method: Annotated[str, typer.Option("--method", help=LABEL_METHOD_HELP)] = "auto",
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
                             "(default 100; fewer cost RLU points on trained models).", rich_help_panel="batch methods")] = None,
    drift: Annotated[Optional[str], typer.Option("--drift", help="rlu, m > 1: how the statistics drift over the "
                     "local steps: simulate (the m steps on the auxiliary set, default) | midpoint (one model "
                     "between the global and the received one; cheaper).", rich_help_panel="batch methods")] = None,
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
    from gitool.labels import LABEL_METHODS

    if method != "auto" and method not in LABEL_METHODS:  # usage errors first: they need no torch
        raise UsageError(f"--method must be auto or one of {', '.join(LABEL_METHODS)}, got {method!r}")
    if output is not None and out_dir is not None:
        raise UsageError("give -o/--output FILE for one update or --out-dir DIR for many, not both")
    if output is None and out_dir is None:
        raise UsageError("give -o/--output FILE (or --out-dir DIR for many updates)")
    from gitool.files import expand_inputs, load_update, new_result, output_name, save_result

    check_device(device)
    check_seed(seed)
    trust_models(model)
    options = {"family": family, "search": search, "seed": seed, "device": device, "aux": aux,
               "aux_per_class": aux_per_class, "drift": drift}
    for entry in ([LABEL_METHODS[method]] if method != "auto" else LABEL_METHODS.values()):
        # impossible values fail before any file is read, whichever method auto will pick
        entry.parse_options(options, require_aux=method != "auto")
    paths = expand_inputs(updates, "update")
    if output is not None and out_dir is not None:
        raise UsageError("give -o/--output FILE for one update or --out-dir DIR for many, not both")
    if output is None and out_dir is None:
        raise UsageError("give -o/--output FILE (or --out-dir DIR for many updates)")
    if output is not None and len(paths) > 1:
        raise UsageError(f"{len(paths)} updates: use --out-dir DIR (outputs keep each input's stem)")
    if plot is not None and len(paths) > 1:
        raise UsageError("--plot draws one search: give one update")
    if plot is not None and search == "pso":
        raise UsageError("--plot draws the scan's loss curve over lambda; it needs --search scan")
    check_output(output)
    check_output(plot, "--plot")
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out-dir {out_dir} is a file")
    targets = {path: output if output is not None else out_dir / output_name(path, "labels") for path in paths}
    refuse_overlap([("the update", path) for path in paths],
                   [("--output" if output is not None else "--out-dir file", t) for t in targets.values()]
                   + [("--plot", plot)])
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    rows, failures = [], []
    with progress_bar(enabled=len(paths) > 1 and not json_output) as bar:
        task = bar.add_task("recovering labels", total=len(paths))
        for path in paths:
            try:
                update = load_update(path, tensors="classifier")  # the method reads the rest if it needs it
                name, entry = _label_method(method, update)
                outcome = entry(update, options, LABEL_METHODS)
                seconds = outcome.seconds
                tensors = {key: value for key, value in (("labels", outcome.labels), ("counts", outcome.counts))
                           if value is not None}
                target = targets[path]
                result = new_result("labels", tensors, method=name, update=update, options=outcome.options,
                                    diagnostics=outcome.diagnostics, wall_time=seconds)
                save_result(result, target)
                if plot is not None:
                    if outcome.curve is None:
                        raise UsageError(f"--plot: method {name!r} has no search curve to draw")
                    from gitool.plotting import plot_curve

                    plot_curve(outcome.curve, plot)
                rows.append(_label_row(path, target, name, outcome, seconds) | {"summary": outcome.summary})
            except GitoolError as exc:
                if len(paths) == 1:
                    raise
                failures.append({"update": str(path), "error": str(exc)})
                err.print(f"[red]failed:[/] {path}: {exc}", highlight=False, soft_wrap=True)
            bar.advance(task)
    if json_output:
        emit_json({"files": [{k: v for k, v in row.items() if k != "summary"} for row in rows],
                   "failed": failures})
    else:
        _print_label_rows(rows)
    if failures:
        raise GitoolError(f"{len(failures)} of {len(paths)} updates failed (first: {failures[0]['update']}: "
                          f"{failures[0]['error']})")


def _print_label_rows(rows: list[dict[str, Any]]) -> None:
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
        ok = "yes" if d.get("converged") and not d.get("ambiguous") else ("ambiguous" if d.get("ambiguous") else "no")
        table.add_row(Path(row["update"]).name, row["method"], str(d.get("family", "-")), top or "-", extra,
                      _fmt(d.get("loss")), _fmt(d.get("residual")), ok, f"{1e3 * row['seconds']:.1f}")
    out.print(table)


@app.command()
def features(
    update: Annotated[Path, typer.Argument(help="The update (a single-sample gradient).")],
    labels_file: Annotated[Path, typer.Option("--labels", "-l", help="Its labels file from `gitool labels`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The features file to write.")],
    model: TrustOpt = None,
    device: DeviceOpt = "cpu",
    json_output: JsonOpt = False,
) -> None:
    """Recover the last layer's input feature x of a single-sample gradient from its labels.

    With a last-layer bias x is the bias ratio; without one x = lambda G_r with the lambda that explains the label. Checks that (x, label) reproduce the gradient and warns (in the output and the file) when the relative residual is above tolerance.

    Example: gitool features run/c.update.safetensors --labels run/c.labels.safetensors -o run/c.features.safetensors
    """
    from gitool.files import load_result, load_update, new_result, save_result
    from gitool.labels_single import recover_features

    check_device(device)
    trust_models(model)
    check_output(output)
    refuse_overlap([("the update", update), ("--labels", labels_file)], [("--output", output)])
    loaded = load_update(update, tensors="classifier")  # x needs the classifier's tensors alone
    labels_result = load_result(labels_file, ("labels",))
    labels_result.check_source(loaded)
    started = time.perf_counter()
    feature, diagnostics = recover_features(loaded, labels_result, {"device": device})
    seconds = time.perf_counter() - started
    result = new_result("features", {"features": feature}, method=diagnostics["method"], update=loaded,
                        options={"device": device, "labels": str(labels_file)}, diagnostics=diagnostics,
                        wall_time=seconds)
    save_result(result, output)
    if json_output:
        emit_json({"update": str(update), "labels": str(labels_file), "output": str(output), "seconds": seconds,
                   "shape": list(feature.shape), "diagnostics": diagnostics})
        return
    out.print(f"wrote {output}: feature of {feature.shape[1]} values (norm {diagnostics['norm']:.4g}) by the "
              f"{diagnostics['method']} path; (feature, label) reproduce the gradient to a relative residual of "
              f"{diagnostics['residual']:.2e}", highlight=False, soft_wrap=True)
    if "warning" in diagnostics:
        err.print(f"[yellow]warning:[/] {diagnostics['warning']}", highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- models and data


@app.command("models")
def list_models(json_output: JsonOpt = False) -> None:
    """List the model zoo and the data sources with their options.

    Example: gitool models --json
    """
    from gitool.data import describe_sources
    from gitool.models import describe_models

    models = describe_models()
    sources = describe_sources()
    if json_output:
        emit_json({"models": [row._asdict() for row in models], "data": sources})
        return
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
    with progress_bar(enabled=not json_output) as bar:
        task = bar.add_task("demo", total=None)
        summary = run_demo(out_dir, on_step=lambda name, i, n: bar.update(task, description=name, completed=i,
                                                                          total=n))
    if json_output:
        emit_json(summary)
        return
    table = Table(title=f"gitool demo: {summary['seconds']:.1f} s, files in {out_dir}")
    table.add_column("step")
    table.add_column("result")
    for step in summary["steps"]:
        table.add_row(step["name"], step["headline"])
    out.print(table)


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
    from gitool.files import save_update
    from gitool.interop import import_update, merge_facts, read_facts_file, spec_in_weights

    check_output(output)
    refuse_overlap([("--before", before), ("--after", after), ("--delta", delta), ("--grad", grad),
                    ("--facts", facts)], [("--output", output)])
    file_facts = read_facts_file(facts) if facts is not None else {}
    base = file_facts.get("model")
    base_has_shape = "input_shape" in file_facts.get("model_fields", ())
    if base is None and model is None:
        base = spec_in_weights(before)
        base_has_shape = base is not None
    if base is None and model is None:
        raise UsageError("give --model (the architecture the weights belong to), or a facts file with a model")
    file_shape = file_facts.get("input", {}).get("shape")
    shape_text = image_size or ("x".join(map(str, file_shape)) if file_shape else None)
    spec, _, _, _ = resolve_model(model, num_classes, shape_text, activation, bias, model_opt, "default",
                               base=base)
    shape_known = shape_text is not None or (base_has_shape and model in (None, base.name))

    given = {}
    training = {name: value for name, value in (("batch_size", batch_size), ("steps", steps), ("lr", lr),
                                                ("optimizer", optimizer), ("momentum", momentum),
                                                ("prox_mu", prox_mu), ("weight_decay", weight_decay),
                                                ("model_mode", mode)) if value is not None}
    if optimizer is not None:  # an optimiser given here replaces the file's coefficients too
        training = {"momentum": 0.0, "prox_mu": 0.0, **training}
    if training:
        given["training"] = training
    families = [hard_labels, label_smoothing is not None, mixup is not None or mixup_coef is not None]
    if sum(families) > 1:
        raise UsageError("choose one label family: --hard-labels, --label-smoothing or --mixup/--mixup-coef")
    if mixup is not None and mixup_coef is not None:
        raise UsageError("choose --mixup ALPHA or --mixup-coef C, not both")
    if hard_labels:
        given["loss"] = {"family": "hard"}
    elif label_smoothing is not None:
        lo, hi = parse_float_range(label_smoothing, "--label-smoothing")
        given["loss"] = ({"family": "smoothing", "label_smoothing": lo} if lo == hi
                         else {"family": "smoothing", "label_smoothing_range": (lo, hi)})
    elif mixup is not None or mixup_coef is not None:
        given["loss"] = {"family": "mixup", "mixup_alpha": mixup, "mixup_coef": mixup_coef}
    if normalize is not None:
        mean, std = parse_normalization(normalize, spec.input_shape[0])
        given["input"] = {"mean": mean, "std": std}
    defence = {name: value for name, value in (("dp_clip", dp_clip), ("dp_noise", dp_noise), ("prune", prune))
               if value is not None}
    if no_defence and defence:
        raise UsageError("--no-defence contradicts --dp-clip/--dp-noise/--prune")
    if no_defence or defence:
        given["defence"] = defence

    update = import_update(spec, before, after=after, delta=delta, gradient=grad,
                           facts=merge_facts(file_facts, given), input_shape_known=shape_known, facts_path=facts)
    save_update(update, output)
    unknown = update.provenance["unknown_facts"]
    if json_output:
        emit_json({"output": str(output), "kind": update.kind, "model": update.model.to_dict(),
                   "dtype": update.training.dtype, "unknown_facts": unknown,
                   "sources": update.provenance["imported"]})
        return
    shape = "x".join(map(str, spec.input_shape))
    out.print(f"wrote {output}: a {update.kind} of {spec.name} (K={spec.num_classes}, {shape}, "
              f"{update.training.dtype})", highlight=False)
    if unknown:
        err.print(f"unknown facts (attacks that need them will ask): {', '.join(unknown)}", highlight=False)


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
    from gitool.files import load_update
    from gitool.interop import export_update

    trust_models(model)
    check_output(output)
    refuse_overlap([("the update", update_file)], [("--output", output)])  # also when -o only names a stem
    written = export_update(load_update(update_file), output, fmt,
                            check=lambda paths: refuse_overlap([("the update", update_file)],
                                                               [(f"the {part} file", p) for part, p in paths.items()]))
    if json_output:
        emit_json({"update": str(update_file), "written": {part: str(path) for part, path in written.items()}})
        return
    for part, path in written.items():
        out.print(f"wrote {path}  ({part})", highlight=False)


if __name__ == "__main__":
    main()
