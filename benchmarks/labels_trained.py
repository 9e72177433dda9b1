"""Label counts on trained models (issue 13): photographs, RLU's models, FedAvg-trained global models.

Every row attacks ``--updates`` client updates of one global model with every label-count
method that applies, on the same updates, and prints mean iAcc (instance accuracy) per
method:

- data: ``photos`` (crops of the photographs scikit-image ships, 10 classes, 32x32,
  normalised to [-1, 1]); the clients draw from seed 0, the global model's training set
  from seed 1, the held-out set from seed 2 and the server's auxiliary set from seed 7;
- models: ``lenet5`` (84-unit bottleneck) and ``vgg`` (VGG16 with batch norm and dropout,
  width ``--vgg-width``, head ``--vgg-hidden``), both with PyTorch's init as in the paper;
- global models: trained by FedAvg from that init, each round ``--fedavg-clients``
  clients with Dirichlet(0.5) class mixes running 10 local SGD steps of 32 (lr
  ``--fedavg-lr``), weights averaged; the model is kept when its held-out accuracy first
  reaches each target (about 50% and about 90%; the table shows the accuracy reached).
  They are trained once and cached in ``--cache`` (git-ignored);
- clients: Dirichlet(0.5) class mixes, B in {32, 64}, m in {1, 10}, SGD (lr 0.01), momentum
  0.9 (lr 0.05) or FedProx (mu 0.5, lr 0.01), the model in train mode (batch norm with batch
  statistics, dropout on), as the paper.

Columns besides the methods: the held-out accuracy of the global model and the mean
1 - p_y over the client's samples at the global model (p_y the softmax of the true class,
each step's batch normalised by itself, no dropout): the error mass a cross-entropy update
is made of, so a confident model's update carries little about its counts. ``rlu*`` is
RLU's least squares with the auxiliary statistics measured at the client's *real*
intermediate models (replayed from the truth): the bound the auxiliary statistics allow.
``rlu-mid`` is RLU with the midpoint drift model (``--drift midpoint``, m > 1 only).

``--record FILE`` appends one JSON line per finished update (every method's cAcc, iAcc and
seconds); a rerun with the same file skips what is recorded, so a killed grid resumes.

    python benchmarks/labels_trained.py --only 1-4 --updates 5            # a first look
    python benchmarks/labels_trained.py --record trained.jsonl            # the whole grid (hours)
    python benchmarks/labels_trained.py --record trained.jsonl --table    # the table of what is recorded
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from labels_batch import path_oracle  # noqa: E402

from gitool.aux_stats import aux_statistics  # noqa: E402
from gitool.capture import CaptureConfig, SampleChoice, capture  # noqa: E402
from gitool.data import open_source  # noqa: E402
from gitool.errors import GitoolError  # noqa: E402
from gitool.files import InputSpec, TrainingSpec  # noqa: E402
from gitool.labels import LABEL_METHODS, recover_labels  # noqa: E402
from gitool.metrics import score_counts  # noqa: E402
from gitool.models import ModelSpec, build_model, dropout_off, init_parameters  # noqa: E402

# The count methods that apply to N = B m > K samples (idlg needs N = 1, yin N <= K).
METHODS = tuple(name for name, method in LABEL_METHODS.items() if "batch" in method.accepts
                and name not in ("idlg", "yin"))
COLUMNS = ("rlu", "rlu*", "rlu-mid", "rlu-published") + tuple(m for m in METHODS if m not in ("rlu", "rlu-published"))
CLIENT_SEED, TRAIN_SEED, HELDOUT_SEED, AUX_SEED = 0, 1, 2, 7
DATA = "photos"
IMAGE = (3, 32, 32)
NORMALISE = InputSpec(shape=IMAGE, mean=(0.5,), std=(0.5,))
TARGETS = (0.5, 0.9)


@dataclass(frozen=True)
class Row:
    model: str
    target: float  # held-out accuracy the global model was trained to
    batch: int
    steps: int
    optimizer: str

    def key(self) -> str:
        return f"{self.model}/{self.target}/{self.batch}/{self.steps}/{self.optimizer}"


def grid() -> list[Row]:
    """Smallest rows first: LeNet-5 before VGG, m = 1 before m = 10, B = 32 before 64. One
    step sends the gradient itself, which no optimiser has touched yet: m = 1 rows are
    the same updates for SGD, momentum and FedProx, so only sgd is listed."""
    return [Row(model, target, batch, steps, optimizer)
            for model, target, steps, batch in itertools.product(("lenet5", "vgg"), TARGETS, (1, 10), (32, 64))
            for optimizer in (("sgd",) if steps == 1 else ("sgd", "momentum", "fedprox"))]


def model_spec(args, name: str) -> ModelSpec:
    options = {"width": str(args.vgg_width), "hidden": str(args.vgg_hidden)} if name == "vgg" else {}
    return ModelSpec(name=name, num_classes=10, input_shape=IMAGE, options=options)


# --------------------------------------------------------------------------- global models


def fedavg_models(args, name: str) -> dict[float, tuple[dict[str, torch.Tensor], float]]:
    """{target: (global state, held-out accuracy)} for ``name``, trained once and cached."""
    from safetensors.torch import load_file, save_file

    cache = Path(args.cache)
    paths = {target: cache / f"{name}-{int(100 * target)}-{settings_tag(args, name)}.safetensors"
             for target in TARGETS}
    if all(path.exists() for path in paths.values()):
        return {target: read_state(path, load_file) for target, path in paths.items()}
    spec = model_spec(args, name)
    train = open_source(f"{DATA}:{args.train_per_class}", IMAGE, seed=TRAIN_SEED)
    heldout = open_source(f"{DATA}:100", IMAGE, seed=HELDOUT_SEED)
    images = NORMALISE.normalize(train.images(range(len(train))))
    labels = torch.as_tensor(train.labels)
    test_images = NORMALISE.normalize(heldout.images(range(len(heldout))))
    test_labels = torch.as_tensor(heldout.labels)
    torch.manual_seed(0)
    model = build_model(spec)
    init_parameters(model, "default", torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    by_class = [np.flatnonzero(train.labels == c) for c in range(10)]
    found: dict[float, tuple[dict[str, torch.Tensor], float]] = {}
    started = time.perf_counter()
    for round_ in range(1, args.fedavg_rounds + 1):
        states = []
        for _ in range(args.fedavg_clients):
            local = copy.deepcopy(model).train()
            optimiser = torch.optim.SGD(local.parameters(), lr=args.fedavg_lr)
            mix = rng.dirichlet(np.full(10, 0.5))
            items = np.array([rng.choice(by_class[c]) for c in rng.choice(10, size=32 * 10, p=mix)])
            for step in range(10):
                batch = items[32 * step:32 * (step + 1)]
                loss = torch.nn.functional.cross_entropy(local(images[batch]), labels[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            states.append(local.state_dict())
        model.load_state_dict({key: (sum(s[key].double() for s in states) / len(states)).to(states[0][key].dtype)
                               for key in states[0]})
        accuracy = heldout_accuracy(model, test_images, test_labels)
        if round_ % 10 == 0:
            print(f"{name} FedAvg round {round_}: held-out accuracy {accuracy:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        for target in TARGETS:
            if target not in found and accuracy >= target:
                found[target] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, accuracy)
                cache.mkdir(parents=True, exist_ok=True)
                save_file(found[target][0], str(paths[target]), metadata={"heldout": str(accuracy),
                                                                           "round": str(round_)})
                print(f"{name}: kept the global model of round {round_} for ~{int(100 * target)}% "
                      f"(held-out accuracy {accuracy:.3f})", file=sys.stderr, flush=True)
        if len(found) == len(TARGETS):
            break
    missing = [t for t in TARGETS if t not in found]
    if missing:
        raise SystemExit(f"{name}: FedAvg did not reach {missing} held-out accuracy in {args.fedavg_rounds} rounds")
    return found


def settings_tag(args, name: str) -> str:
    tag = f"lr{args.fedavg_lr}-c{args.fedavg_clients}-n{args.train_per_class}"
    return tag + (f"-w{args.vgg_width}-h{args.vgg_hidden}" if name == "vgg" else "")


def read_state(path: Path, load_file) -> tuple[dict[str, torch.Tensor], float]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        accuracy = float(handle.metadata()["heldout"])
    return load_file(str(path)), accuracy


def heldout_accuracy(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(images[i:i + 500]).argmax(1) == labels[i:i + 500]).sum())
                      for i in range(0, len(labels), 500))
    model.train(was)
    return correct / len(labels)


# --------------------------------------------------------------------------- one update


def error_mass(update, truth) -> float:
    """Mean 1 - p_y over the client's samples at the global model, each step's batch
    normalised by itself (batch norm in train mode), dropout off."""
    model = update.build_model(dtype=torch.float32)
    b = update.training.batch_size
    inputs, classes = truth.inputs.to(torch.float32), truth.labels.argmax(dim=1)
    values = []
    with torch.no_grad(), dropout_off(model):
        for start in range(0, len(classes), b):
            probs = torch.softmax(model(inputs[start:start + b]), dim=1)
            values.append(1 - probs.gather(1, classes[start:start + b, None]).squeeze(1))
    return float(torch.cat(values).mean())


def attack_update(args, row: Row, state: dict[str, torch.Tensor], index: int) -> dict:
    spec = model_spec(args, row.model)
    source = open_source(DATA, IMAGE, seed=CLIENT_SEED)
    lr = 0.05 if row.optimizer == "momentum" else 0.01
    training = TrainingSpec(batch_size=row.batch, steps=row.steps, lr=lr, optimizer=row.optimizer,
                            momentum=0.9 if row.optimizer == "momentum" else 0.0,
                            prox_mu=0.5 if row.optimizer == "fedprox" else 0.0)
    config = CaptureConfig(input=NORMALISE, training=training, choice=SampleChoice(dirichlet_alpha=0.5),
                           init="default", seed=1000 + index)
    update, truth = capture(source, spec, config, init_state=state)
    options = {"aux": DATA, "aux_per_class": args.aux_per_class, "seed": AUX_SEED, "device": "cpu"}
    aux = aux_statistics(update, DATA, args.aux_per_class, AUX_SEED, "cpu")  # cached: not timed below
    scores: dict[str, list[float]] = {}

    def score(name, counts, seconds):
        metrics = score_counts(counts, truth.counts)
        scores[name] = [metrics["cAcc"], metrics["iAcc"], seconds]

    for method in METHODS:
        started = time.perf_counter()
        try:
            outcome = recover_labels(update, method, options)
        except GitoolError:
            continue
        score(method, outcome.counts, time.perf_counter() - started)
    if row.steps > 1:
        started = time.perf_counter()
        outcome = recover_labels(update, "rlu", {**options, "drift": "midpoint"})
        score("rlu-mid", outcome.counts, time.perf_counter() - started)
    started = time.perf_counter()
    counts = path_oracle(update, truth, aux)
    if counts is not None:
        score("rlu*", counts, time.perf_counter() - started)
    return {"row": row.key(), "aux_per_class": args.aux_per_class, "update": index,
            "heldout": None, "error_mass": error_mass(update, truth), "methods": scores}


# --------------------------------------------------------------------------- table


def read_record(path: Path | None) -> list[dict]:
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(rows: list[Row], records: list[dict], aux_per_class: int, updates: int | None = None) -> str:
    """The markdown table of the recorded updates (the first ``updates`` of each row)."""
    header = ("| model | target | B | m | opt | held-out acc | mean 1-p_y | "
              + " | ".join(COLUMNS) + " | n | rlu s/update |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        mine = [r for r in records if r["row"] == row.key() and r["aux_per_class"] == aux_per_class
                and (updates is None or r["update"] < updates)]
        if not mine:
            continue

        def mean(method, field=1):
            values = [r["methods"][method][field] for r in mine if method in r["methods"]]
            return f"{np.mean(values):.3f}" if values else "n/a"

        lines.append(f"| {row.model} | {int(100 * row.target)}% | {row.batch} | {row.steps} | {row.optimizer} | "
                     f"{mine[0]['heldout']:.3f} | {np.mean([r['error_mass'] for r in mine]):.3f} | "
                     + " | ".join(mean(m) for m in COLUMNS) + f" | {len(mine)} | {mean('rlu', 2)} |")
    return "\n".join(lines)


def parse_only(text: str, count: int) -> list[int]:
    chosen = []
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        chosen += list(range(int(low), int(high or low) + 1))
    if any(not 1 <= i <= count for i in chosen):
        raise SystemExit(f"--only: rows are numbered 1..{count}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=20, help="updates per row (the table shows the first N)")
    parser.add_argument("--aux-per-class", type=int, default=None,
                        help="auxiliary images per class (default: rlu's default)")
    parser.add_argument("--only", default="", help="rows to run, 1-based, e.g. 1-4,13 (default: all, in order)")
    parser.add_argument("--record", type=Path, default=None, help="JSON lines of finished updates (resumes)")
    parser.add_argument("--table", action="store_true", help="print the table of the record and stop")
    parser.add_argument("--cache", default=str(Path(__file__).resolve().parent / "results" / "trained_cache"))
    parser.add_argument("--fedavg-rounds", type=int, default=1500)
    parser.add_argument("--fedavg-clients", type=int, default=5)
    parser.add_argument("--fedavg-lr", type=float, default=0.05)
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--vgg-width", type=int, default=16)
    parser.add_argument("--vgg-hidden", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.aux_per_class is None:
        from gitool.labels_batch import RLUOptions

        args.aux_per_class = RLUOptions().aux_per_class
    torch.set_num_threads(args.threads)
    rows = grid()
    numbers = parse_only(args.only, len(rows)) if args.only else list(range(1, len(rows) + 1))
    chosen = [rows[i - 1] for i in numbers]
    records = read_record(args.record)
    if not args.table:
        for row in chosen:
            state, accuracy = fedavg_models(args, row.model)[row.target]
            done = {r["update"] for r in records if r["row"] == row.key() and r["aux_per_class"] == args.aux_per_class}
            for index in range(args.updates):
                if index in done:
                    continue
                record = attack_update(args, row, state, index) | {"heldout": accuracy}
                records.append(record)
                if args.record is not None:
                    with open(args.record, "a") as handle:
                        handle.write(json.dumps(record) + "\n")
                print(f"{row.key()} update {index}: " + ", ".join(
                    f"{m} {v[1]:.3f}" for m, v in record["methods"].items()), file=sys.stderr, flush=True)
    print(table(chosen, records, args.aux_per_class, args.updates))


if __name__ == "__main__":
    main()
