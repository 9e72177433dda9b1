"""Benchmark of the label-count methods on batches and multi-step updates (issue 4).

For every row of the grid (model, untrained/trained, K, B, m, optimiser, Dirichlet
alpha) it captures ``--updates`` client updates from synthetic data, runs every method
on the same updates and prints a markdown table of mean cAcc, iAcc and seconds per
update. The auxiliary statistics (``--aux synthetic`` drawn with another seed than the
clients' images) are computed once per global model before the timing starts; the
time column is the rest of each method's work.

    python benchmarks/labels_batch.py --grid quick      # a few rows, minutes
    python benchmarks/labels_batch.py --grid subset     # every factor varied at least once
    python benchmarks/labels_batch.py --grid full       # the whole grid (hours on 2 cores)

Untrained models use PyTorch's default initialisation (``--init default``), as in the
paper; trained models are trained here on synthetic data first (Adam, 15 epochs;
the held-out accuracy goes to stderr). LeNet uses ReLU (its DLG default, sigmoid,
does not train here).
ResNet-18 runs at width ``--resnet-width`` (16 by default, to fit 2 CPU cores) and
every model at ``--image-size`` (16 by default).

``--bounds`` adds a column ``rlu*``: RLU's least squares with the auxiliary statistics
taken at the client's *real* intermediate models (replayed from the truth, which the
server never sees). It is the best any drift model built on auxiliary statistics can
do, so ``rlu*`` minus ``rlu`` is what RLU's drift simulation loses and 1 minus ``rlu*``
is what the auxiliary statistics themselves cannot explain (for m = 1 they coincide
with RLU). With batch norm each step's statistics are measured with the client's own
batch of that step normalising the auxiliary samples.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gitool.attacks import rlu as rlu_math  # noqa: E402
from gitool.attacks.label_counts import largest_remainder  # noqa: E402
from gitool.aux_stats import aux_statistics, model_outputs  # noqa: E402
from gitool.capture import CaptureConfig, SampleChoice, capture, local_training  # noqa: E402
from gitool.data import open_source  # noqa: E402
from gitool.errors import GitoolError  # noqa: E402
from gitool.files import DefenceSpec, InputSpec, TrainingSpec  # noqa: E402
from gitool.labels import recover_labels  # noqa: E402
from gitool.labels_batch import output_layer, rlu_observation  # noqa: E402
from gitool.metrics import score_counts  # noqa: E402
from gitool.models import ModelSpec, build_model, init_parameters  # noqa: E402

from gitool.labels import LABEL_METHODS  # noqa: E402

# Every registered count method (the registry says which accept batches), in registry order.
METHODS = tuple(name for name, method in LABEL_METHODS.items() if "batch" in method.accepts)
# Synthetic images are drawn per seed: the clients' with 0, the global model's training
# set with TRAIN_SEED and the server's auxiliary set with AUX_SEED, so the three differ.
AUX_SEED = 7
TRAIN_SEED = 1


@dataclass(frozen=True)
class Row:
    model: str
    state: str  # untrained | trained
    classes: int
    batch: int
    steps: int
    optimizer: str
    alpha: float


def grid(name: str) -> list[Row]:
    if name == "full":
        return [Row(*values) for values in itertools.product(
            ("lenet", "resnet18"), ("untrained", "trained"), (10, 100), (8, 32, 64), (1, 10),
            ("sgd", "momentum", "fedprox"), (0.5, 0.1))]
    base = dict(classes=10, batch=32, optimizer="sgd", alpha=0.5)
    rows = []
    if name in ("quick", "subset"):
        models = ("lenet",) if name == "quick" else ("lenet", "resnet18")
        for model, state, steps in itertools.product(models, ("untrained", "trained"), (1, 10)):
            rows.append(Row(model, state, steps=steps, **base))
    if name == "subset":
        for state in ("untrained", "trained"):
            for change in (dict(batch=8), dict(batch=64), dict(optimizer="momentum"), dict(optimizer="fedprox"),
                           dict(alpha=0.1), dict(classes=100)):
                rows.append(Row("lenet", state, steps=10, **{**base, **change}))
    if name == "subset":  # rows where idlg (B = 1) and yin (N <= K) apply
        rows.append(Row("lenet", "untrained", steps=1, **{**base, "batch": 8}))
        rows.append(Row("lenet", "untrained", steps=1, **{**base, "batch": 1}))
    if not rows:
        raise SystemExit(f"unknown grid {name!r}")
    return rows


_MODELS: dict[tuple, dict] = {}
_ACCURACY: dict[tuple, float] = {}


def global_state(args, row: Row) -> dict[str, torch.Tensor]:
    """The global weights of a row's model (trained once per model/K and reused)."""
    key = (row.model, row.state, row.classes)
    if key in _MODELS:
        return _MODELS[key]
    spec = model_spec(args, row)
    torch.manual_seed(0)
    model = build_model(spec)
    init_parameters(model, "default", torch.Generator().manual_seed(0))
    if row.state == "trained":
        from gitool.train import train_model

        source = open_source(data_spec(row), spec.input_shape, num_classes=row.classes, seed=TRAIN_SEED)
        started = time.perf_counter()
        report = train_model(model, source, InputSpec(shape=spec.input_shape), epochs=args.train_epochs,
                             lr=args.train_lr, batch_size=64, seed=0)
        print(f"trained {row.model} K={row.classes}: held-out accuracy {report.heldout_accuracy:.3f} "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        _ACCURACY[key] = report.heldout_accuracy
    _MODELS[key] = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return _MODELS[key]


def model_spec(args, row: Row) -> ModelSpec:
    options = {"width": str(args.resnet_width)} if row.model == "resnet18" else {}
    # The DLG LeNet's default sigmoid does not train on this data; ReLU does (as LeNet5 in the paper).
    activation = "relu" if row.model == "lenet" else None
    return ModelSpec(name=row.model, num_classes=row.classes, input_shape=(3, args.image_size, args.image_size),
                     activation=activation, options=options)


def data_spec(row: Row) -> str:
    return "synthetic" if row.classes <= 10 else "synthetic:16"


def path_oracle(update, truth, aux):
    """RLU's counts with the auxiliary statistics measured at the client's real
    intermediate models theta_0 .. theta_{m-1} (replayed from the truth): the bound
    described in the module docstring. With batch norm in train mode each step's
    statistics are measured with that step's own batch normalising the auxiliary samples,
    as the client's step did. The replay redraws the client's dropout masks (same seed);
    None when it does not reproduce the update."""
    import copy

    from gitool.capture import DTYPES
    from gitool.models import DROPOUT_TYPES

    dtype = DTYPES[update.training.dtype]
    model = update.build_model(dtype=dtype)
    layer = output_layer(update, model=model)  # read before local_training moves the model
    use_bias = layer.bias is not None
    batch_norm = rlu_math.has_batch_statistics(model)
    inputs = truth.inputs.to(dtype)
    b = update.training.batch_size
    systems = []

    def measure(step):
        probe = model
        if batch_norm:  # normalise with the client's batch of this step
            probe = copy.deepcopy(model).eval()
            norms = [m for m in probe.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            for norm in norms:
                norm.momentum = 1.0
                norm.train()
            with torch.no_grad():
                probe(inputs[step * b:(step + 1) * b])
            probe.eval()
        probs, features = model_outputs(probe, aux.inputs.to(dtype))
        systems.append(rlu_math.step_system(probs.double(), features.double(), aux.labels, layer.weight.shape[0],
                                            not use_bias))

    seed = int(update.provenance.get("seed", 0))
    torch.manual_seed(seed)  # as capture: seed, then build the model (its init draws), then train
    build_model(update.model)
    replay = local_training(model, inputs, truth.labels.to(dtype), update.training, DefenceSpec(), update.kind,
                            torch.Generator().manual_seed(seed), before_step=measure)
    dropout = any(isinstance(m, DROPOUT_TYPES) for m in model.modules())
    if dropout and not all(torch.allclose(replay.values[n], update.values[n].to(dtype), rtol=1e-4, atol=1e-6)
                           for n in update.values):
        return None
    estimate, _ = rlu_math.solve_counts_nnls(rlu_math.weighted_system(systems, layer.coefficients),
                                             rlu_observation(layer), layer.total)
    return largest_remainder(estimate, layer.total)


def run_row(args, row: Row) -> dict:
    spec = model_spec(args, row)
    state = global_state(args, row)
    data = data_spec(row)
    source = open_source(data, spec.input_shape, num_classes=row.classes, seed=0)
    lr = 0.05 if row.optimizer == "momentum" else 0.01
    training = TrainingSpec(batch_size=row.batch, steps=row.steps, lr=lr, optimizer=row.optimizer,
                            momentum=0.9 if row.optimizer == "momentum" else 0.0,
                            prox_mu=0.5 if row.optimizer == "fedprox" else 0.0)
    options = {"aux": data, "aux_per_class": args.aux_per_class, "seed": AUX_SEED, "device": "cpu"}
    scores: dict[str, list] = {m: [] for m in METHODS + ("rlu*",)}
    for index in range(args.updates):
        config = CaptureConfig(input=InputSpec(shape=spec.input_shape), training=training,
                               choice=SampleChoice(dirichlet_alpha=row.alpha), seed=1000 + index)
        update, truth = capture(source, spec, config, init_state=state)
        # The cached statistics are computed once per global model, before any timing.
        aux = aux_statistics(update, data, args.aux_per_class, AUX_SEED, "cpu")
        if args.bounds:
            started = time.perf_counter()
            counts = path_oracle(update, truth, aux)
            if counts is not None:
                metrics = score_counts(counts, truth.counts)
                scores["rlu*"].append((metrics["cAcc"], metrics["iAcc"], time.perf_counter() - started))
        for method in METHODS:
            started = time.perf_counter()
            try:
                outcome = recover_labels(update, method, options)
            except GitoolError:  # e.g. idlg on B > 1, yin with N > K: not applicable
                continue
            elapsed = time.perf_counter() - started
            metrics = score_counts(outcome.counts, truth.counts)
            scores[method].append((metrics["cAcc"], metrics["iAcc"], elapsed))
    return {m: np.mean(v, axis=0) if v else None for m, v in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="quick", choices=("quick", "subset", "full"))
    parser.add_argument("--updates", type=int, default=20, help="updates per row")
    parser.add_argument("--aux-per-class", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--resnet-width", type=int, default=16)
    parser.add_argument("--train-epochs", type=int, default=15)
    parser.add_argument("--train-lr", type=float, default=0.003)
    parser.add_argument("--only", default="", help="comma-separated row numbers (1-based) of the grid to run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the target is for 2 CPU cores)")
    parser.add_argument("--bounds", action="store_true", help="add the rlu* column (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = METHODS + (("rlu*",) if args.bounds else ())
    rows = grid(args.grid)
    if args.only:
        rows = [rows[int(i) - 1] for i in args.only.split(",")]
    header = "| model | state | K | B | m | opt | alpha | " + " | ".join(
        f"{m} cAcc/iAcc/s" for m in methods) + " |"
    print(header)
    print("|" + "---|" * (7 + len(methods)))
    for row in rows:
        result = run_row(args, row)
        cells = []
        for method in methods:
            value = result[method]
            cells.append("n/a" if value is None else f"{value[0]:.3f}/{value[1]:.3f}/{value[2]:.3f}")
        accuracy = _ACCURACY.get((row.model, row.state, row.classes))
        state = row.state if accuracy is None else f"{row.state} ({100 * accuracy:.0f}%)"
        print(f"| {row.model} | {state} | {row.classes} | {row.batch} | {row.steps} | {row.optimizer} | "
              f"{row.alpha} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
