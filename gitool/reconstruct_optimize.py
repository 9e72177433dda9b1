"""``gitool reconstruct --method optimize``: gradient matching with recovered labels and features.

Adapter from an update file plus labels / features results to
`gitool.attacks.gradient_matching`; the math is documented there. Options (all optional):

    distance        cosine (Inverting Gradients) | l2 (DLG)              default: see below
    terms           g | f | gf                                           default g
    feature_weight  f in front of the feature term                       default 1
    tv              total-variation weight                               default: see below
    layer_weights   {param name: weight} or "name=w,name=w"              default all 1
    optimizer       adam | lbfgs                                         default: see below
    iterations      per restart                                          default 2000 (adam) / 200 (lbfgs)
    lr              step size                                            default 0.1 (adam) / 1 (lbfgs)
    restarts        random starts; the lowest objective wins             default 1
    signed          Adam on the sign of the image gradient (IG's code)   default: see below
    lbfgs_inner     L-BFGS inner steps per iteration                     default 20
    line_search     L-BFGS strong-Wolfe line search (False: DLG's plain steps) default True
    joint_labels    optimise the labels too (DLG); implied without labels
    time_budget     seconds; stop there and keep the best iterate (0: none)  default 0
    seed, device, dtype (float32 | float64), report_every,
    save_every + save_dir   PNG of the current images every N iterations

Defaults by model, chosen by benchmarks/reconstruct_optimize.py (results in
benchmarks/results/reconstruct_optimize_curve_2026-12-02.md): a model without batch norm
gets L-BFGS with the squared-L2 distance and no TV (DLG; LeNet 32x32 on photos reaches its
plateau within about 20-30 s), a model with batch norm gets Inverting Gradients' signed
Adam with the cosine distance and TV 1e-2 (what makes an eval-mode ResNet-18 work). Each
option given overrides its default alone.

The run stops early, keeping each restart's best iterate (lowest objective seen), when the
time budget is spent or, inside `gitool.interrupts.deferred` (the reconstruct command), on
SIGINT / SIGTERM; the diagnostics record ``stopped`` (``budget``, ``interrupted`` or None)
and ``iterations_done``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gitool.attacks.gradient_matching import ClientTraining, GradientMatcher, MatchConfig, labels_from_counts
from gitool.errors import UsageError
from gitool.facts import require_facts
from gitool.reconstruct import ReconOutcome
from gitool.specs import Interval, OneOf, Optional_, check_fields, fact

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_layer_weights(value: Any) -> dict[str, float] | None:
    """{name: weight} from a dict or a "name=w,name=w" string."""
    if value is None or value == "" or isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items()} if value else None
    out = {}
    for item in str(value).split(","):
        name, sep, weight = item.strip().partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(weight)
        except ValueError:
            raise UsageError(f"--layer-weights wants NAME=WEIGHT,..., got {item.strip()!r}") from None
    return out


def _given(options: dict[str, Any], key: str, default: Any) -> Any:
    """The option's value, or ``default`` only when it was not given (0 is a value, and
    an impossible one is refused by MatchConfig.validate, never replaced)."""
    value = options.get(key)
    return default if value is None else value


def has_batch_norm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def model_defaults(batch_norm: bool) -> dict[str, Any]:
    """The defaults of optimizer, distance, tv and signed for a model with or without batch
    norm (measured: see the module docstring)."""
    if batch_norm:
        return {"optimizer": "adam", "distance": "cosine", "tv": 1e-2, "signed": True}
    return {"optimizer": "lbfgs", "distance": "l2", "tv": 0.0, "signed": False}


def match_config(options: dict[str, Any], batch_norm: bool = False) -> MatchConfig:
    auto = model_defaults(batch_norm)
    optimizer = str(_given(options, "optimizer", auto["optimizer"]))
    lbfgs = optimizer == "lbfgs"
    return MatchConfig(
        distance=str(_given(options, "distance", auto["distance"])),
        terms=str(_given(options, "terms", "g")),
        feature_weight=float(_given(options, "feature_weight", 1.0)),
        tv=float(_given(options, "tv", auto["tv"])),
        layer_weights=parse_layer_weights(options.get("layer_weights")),
        optimizer=optimizer,
        iterations=int(_given(options, "iterations", 200 if lbfgs else 2000)),
        lr=float(_given(options, "lr", 1.0 if lbfgs else 0.1)),
        restarts=int(_given(options, "restarts", 1)),
        signed=bool(_given(options, "signed", auto["signed"] and not lbfgs)),
        lbfgs_inner=int(_given(options, "lbfgs_inner", 20)),
        line_search=bool(options.get("line_search", True)),
        seed=int(_given(options, "seed", 0)),
        report_every=max(1, int(_given(options, "report_every", 10 if lbfgs else 50))),
    )


def fixed_labels(update, labels) -> torch.Tensor | None:
    """N x K labels from a labels result: its soft labels, or one-hot rows built from its
    counts (with the update's label-smoothing factor when it is a fixed one)."""
    if labels is None:
        return None
    n = update.num_samples
    soft = labels.get("labels")
    if soft is not None and soft.shape[0] == n:
        return soft.to(torch.float64)
    counts = labels.get("counts")
    if counts is None and soft is not None:
        counts = torch.bincount(soft.argmax(dim=1), minlength=soft.shape[1])
    if counts is None:
        raise UsageError(f"{labels.path or 'the labels'} hold neither 'labels' nor 'counts'")
    eps = update.loss.label_smoothing if update.loss.family == "smoothing" and update.loss.label_smoothing else 0.0
    return labels_from_counts(counts, n, float(eps))


@dataclass(frozen=True)
class OptimizeOptions:
    """Options of --method optimize, each with its default and constraint (None: the
    model's default, see :func:`model_defaults`, or the optimiser's own: 2000 Adam or 200
    L-BFGS iterations, lr 0.1 or 1)."""

    distance: str | None = fact(None, Optional_(OneOf(("cosine", "l2"))))
    tv: float | None = fact(None, Optional_(Interval(float, 0.0, None)))
    terms: str = fact("g", OneOf(("g", "f", "gf")))
    feature_weight: float = fact(1.0, Interval(float, 0.0, None))
    optimizer: str | None = fact(None, Optional_(OneOf(("adam", "lbfgs"))))
    iterations: int | None = fact(None, Optional_(Interval(int, 1, None)))
    lr: float | None = fact(None, Optional_(Interval(float, 0.0, None, closed="neither")))
    restarts: int = fact(1, Interval(int, 1, 10_000))
    signed: bool | None = None
    line_search: bool = True
    joint_labels: bool = False
    layer_weights: Any = None
    save_every: int = fact(0, Interval(int, 0, None))
    time_budget: float = fact(0.0, Interval(float, 0.0, None))  # seconds; 0: no limit
    save_dir: str | None = None
    seed: int = fact(0, Interval(int, 0, 2**63 - 1))
    report_every: int | None = fact(None, Optional_(Interval(int, 1, None)))
    lbfgs_inner: int | None = fact(None, Optional_(Interval(int, 1, None)))
    dtype: str = fact("float32", OneOf(("float32", "float64")))
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_fields(self, "options")


def stop_rule(time_budget: float, started: float, also=None):
    """should_stop for the matcher: ``"budget"`` once ``time_budget`` seconds (0: never)
    have passed since ``started`` (time.monotonic), ``"interrupted"`` after a deferred
    SIGINT / SIGTERM."""
    from gitool import interrupts

    deadline = started + time_budget if time_budget > 0 else None

    def should_stop() -> str | None:
        if deadline is not None and time.monotonic() >= deadline:
            return "budget"
        return interrupts.requested() or (also() if also is not None else None)

    return should_stop


def reconstruct_optimize(update, options, labels=None, features=None, progress=None,
                         snapshot=None, stop=None) -> ReconOutcome:
    """Library callers (e.g. the benchmark) may pass ``snapshot(restart, iteration, images)``,
    called every ``save_every`` iterations instead of writing PNGs, and ``stop()``, a further
    stopping rule returning a reason or None."""
    started = time.monotonic()
    options = dict(options) if isinstance(options, dict) else asdict(options)
    time_budget = float(options.get("time_budget") or 0.0)
    if not 0 <= time_budget < float("inf"):
        raise UsageError(f"--time-budget must be a finite number of seconds >= 0, got {time_budget}")
    for result in (labels, features):
        if result is not None:
            result.check_source(update)
    config = match_config(options)
    config.validate()
    # Matching re-runs the client's step(s): every fact of its training must be known.
    require_facts(update, ["batch_size", "model_mode", "normalization", "input_shape"]
                  + (["steps", "lr", "optimizer", "weight_decay"] if update.kind == "delta" else [])
                  + (["loss_family"] if labels is None or labels.get("labels") is None else []),
                  for_method="--method optimize")
    joint = bool(options.get("joint_labels"))
    if joint and labels is not None:
        raise UsageError("--joint-labels optimises the labels itself: leave out --labels (or --joint-labels)")
    if config.terms != "g" and features is None:
        raise UsageError(f"--terms {config.terms} needs --features FEATURES (the recovered last-layer input)")
    dtype_name = str(options.get("dtype") or "float32")
    if dtype_name not in DTYPES:
        raise UsageError(f"unknown dtype {dtype_name!r}; choose float32 or float64")
    dtype = DTYPES[dtype_name]
    device = torch.device(str(options.get("device") or "cpu"))

    model = update.build_model(dtype=dtype, device=device)
    config = match_config(options, has_batch_norm(model))
    config.validate()
    y = fixed_labels(update, labels)
    feature_rows = features.require("features") if features is not None else None
    t = update.training
    training = ClientTraining(kind=update.kind, batch_size=t.batch_size, steps=t.steps, lr=t.lr,
                              optimizer=t.optimizer, momentum=t.momentum, prox_mu=t.prox_mu,
                              weight_decay=t.weight_decay)
    if update.kind == "gradient":
        training.steps = 1
    target = {n: v.to(device=device, dtype=dtype) for n, v in update.values.items()}
    matcher = GradientMatcher(
        model, update.input.normalize, target, training, config,
        labels=None if y is None else y.to(device=device, dtype=dtype),
        features=None if feature_rows is None else feature_rows.to(device=device, dtype=dtype),
        num_samples=update.num_samples, pruned=bool(update.defence.prune),
    )

    save_every = int(options.get("save_every") or 0)
    if save_every and snapshot is None:
        save_dir = options.get("save_dir")
        if not save_dir:
            raise UsageError("--save-every needs a folder for the PNGs (save_dir)")
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)

        def snapshot(restart: int, iteration: int, images: torch.Tensor) -> None:
            from gitool.plotting import save_image_grid

            save_image_grid(images.cpu(), save_dir / f"restart{restart + 1:02d}_iter{iteration:06d}.png")

    outcome = matcher.run(update.input.shape, device=device, dtype=dtype, progress=progress,
                          snapshot=snapshot, snapshot_every=save_every,
                          should_stop=stop_rule(time_budget, started, stop))
    label_source = "jointly optimised (DLG)" if y is None else "fixed from the labels file"
    diagnostics = {
        "loss": outcome.loss,
        "restart_losses": outcome.restart_losses,
        "chosen_restart": outcome.restart_losses.index(min(outcome.restart_losses)) + 1,
        "history": [list(h) for h in outcome.history],
        "labels": "joint" if y is None else "fixed",
        "matched_tensors": matcher.matched,
        "config": {k: v for k, v in config.__dict__.items() if k != "layer_weights"},
        "stopped": outcome.stopped,  # None: every iteration ran; "budget" | "interrupted"
        "iterations_done": outcome.iterations_done,
        "time_budget": time_budget,
    }
    if y is None:
        diagnostics["joint_labels"] = outcome.labels.cpu().to(torch.float64).tolist()
    summary = [
        f"{config.optimizer} x {config.iterations} iterations, {config.restarts} restart(s), "
        f"distance {config.distance}, terms {config.terms}, tv {config.tv:g}",
    ]
    if outcome.stopped:
        why = f"the {time_budget:g} s time budget" if outcome.stopped == "budget" else "a signal"
        summary.append(f"stopped by {why} after {outcome.iterations_done} of {config.iterations * config.restarts} "
                       "iterations; kept the best iterate")
    summary += [
        f"labels {label_source}; final objective {outcome.loss:.4g} (restart {diagnostics['chosen_restart']})",
    ]
    return ReconOutcome(method="optimize", images=outcome.images.cpu().to(torch.float64).clamp(0, 1),
                        diagnostics=diagnostics, summary=summary)
