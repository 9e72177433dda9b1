"""Label counts for batches and multi-step updates: ``gitool labels --method NAME``.

Adapters from an `Update` to the math in `gitool.attacks.label_counts`:
idlg, yin, llg, llg+ (``llg_plus``), zlg, ilrg and rlu. Each returns a `LabelOutcome`
with ``counts`` (K integers summing to N = B x m) and, for a single sample, a one-hot
``labels`` row.

Options: :class:`CountOptions` (device), :class:`AuxCountOptions` (``aux``, a data
source spec of labelled auxiliary data; ``aux_per_class``; ``seed``) and
:class:`RLUOptions` (those and ``refine_rounds``), each with its defaults and constraints.

What the server is assumed to know (methods.md section 0): the global weights, the
architecture, B, m, the learning rate eta and the optimiser (sgd, momentum with its
gamma, fedprox with its mu, weight decay). The client's loss is the batch-mean
cross-entropy. An update from any other optimiser (Adam, ...) is refused: its steps are
not linear in the gradients, which every method here relies on.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from gitool.specs import MAX_SEED, Interval, OneOf, check_fields, fact

from gitool.attacks import label_counts as lc
from gitool.attacks import rlu as rlu_math
from gitool.errors import UsageError
from gitool.facts import require_facts
from gitool.labels import LabelOutcome

SUPPORTED_OPTIMIZERS = ("sgd", "momentum", "fedprox")


@dataclass(frozen=True)
class CountOptions:
    """Options of the methods that read the update alone."""

    device: str = "cpu"

    def __post_init__(self) -> None:
        check_fields(self, "options")


# Auxiliary images per class, chosen by measurement (benchmarks/labels_trained.py, LeNet-5
# on photos trained to 56% and 90%, B = 32, m = 1 and 10, 10 updates each): RLU's mean
# iAcc over the four rows was 0.78 with 10, 0.80 with 50 and 0.81 with 100 per class;
# the confident model's rows gain most (m = 10: 0.68, 0.74, 0.76).
DEFAULT_AUX_PER_CLASS = 100


@dataclass(frozen=True)
class AuxCountOptions(CountOptions):
    """Options of the methods that measure statistics on labelled auxiliary data."""

    aux: str | None = None
    aux_per_class: int = fact(DEFAULT_AUX_PER_CLASS, Interval(int, 1, 100_000))
    seed: int = fact(0, Interval(int, 0, MAX_SEED))


# How RLU models the statistics along the client's m local steps (`recover_rlu`).
DRIFT_MODELS = ("simulate", "midpoint")


@dataclass(frozen=True)
class RLUOptions(AuxCountOptions):
    """RLU's options: those of the auxiliary methods, the refinement rounds and the drift
    model for m > 1 (``simulate`` the m steps on the auxiliary set, or take the
    statistics at one ``midpoint`` of the straight path to the received model)."""

    refine_rounds: int = fact(3, Interval(int, 0, 100))
    drift: str = fact("simulate", OneOf(DRIFT_MODELS))
    # 0: each simulated step trains on the mean batch n/m; k > 0: the system is averaged over
    # k seeded random splits of the counts into the client's batches (measured on momentum
    # rows: +0.00 to +0.05 iAcc for k = 4, at k times the simulation's time).
    batch_draws: int = fact(0, Interval(int, 0, 64))


@dataclass
class OutputLayer:
    """The classifier of an update as the math wants it (float64, on the device).

    ``weight_grad``/``bias_grad`` are the equivalent mean gradient over all N samples
    (see `equivalent_gradient`); ``weight_delta``/``bias_delta`` the raw update (zero
    for a gradient); ``coefficients`` c_s and ``response`` R of the optimiser."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    weight_grad: torch.Tensor
    bias_grad: torch.Tensor | None
    weight_delta: torch.Tensor
    bias_delta: torch.Tensor | None
    response: torch.Tensor
    coefficients: torch.Tensor
    total: int
    batch_size: int
    steps: int


def check_optimizer(update) -> None:
    training = update.training
    if training.optimizer not in SUPPORTED_OPTIMIZERS:
        raise UsageError(f"optimizer {training.optimizer!r} is not supported for label counts: only sgd, momentum "
                         f"and fedprox updates are linear in the gradients (Adam's are not)")


def output_layer(update, device: str = "cpu", model=None) -> OutputLayer:
    """The classifier and its equivalent mean gradient.

    For a gradient this is the gradient itself. For an update over m steps,
    delta = drift - eta sum_s c_s g_s (c_s from `optimizer_response`); assuming the step
    gradients g_s are alike, the mean gradient is -(delta - drift) / (eta sum_s c_s),
    which is again the mean over all N = B m samples of the per-sample gradients."""
    # N = B x m fixes every count's total; a delta also needs how it was made from gradients.
    require_facts(update, ["batch_size", "steps"] + (["lr", "optimizer", "weight_decay"]
                                                      if update.kind == "delta" else []),
                  for_method="label counts")
    check_optimizer(update)
    training = update.training
    layer = update.last_layer(model)
    steps = training.steps if update.kind == "delta" else 1
    response = lc.optimizer_response(steps, training.lr, training.optimizer, training.momentum, training.prox_mu,
                                     training.weight_decay)
    coefficients = response[steps]

    def move(tensor):
        return None if tensor is None else tensor.to(device=device, dtype=torch.float64)

    weight, bias = move(layer.weight), move(layer.bias)
    weight_value, bias_value = move(layer.weight_grad), move(layer.bias_grad)
    if update.kind == "gradient":
        return OutputLayer(weight, bias, weight_value, bias_value, torch.zeros_like(weight_value),
                           None if bias is None else torch.zeros_like(bias), response, coefficients,
                           training.batch_size, training.batch_size, 1)

    def mean_gradient(delta, theta0):
        return lc.mean_gradient(delta, theta0, steps, training.lr, training.optimizer, training.momentum,
                                training.prox_mu, training.weight_decay, float(coefficients.sum()))

    return OutputLayer(weight, bias, mean_gradient(weight_value, weight),
                       None if bias is None else mean_gradient(bias_value, bias), weight_value, bias_value,
                       response, coefficients, training.num_samples, training.batch_size, steps)


def load_aux(update, options: AuxCountOptions, method: str, model=None):
    from gitool.aux_stats import aux_statistics

    if not options.aux:
        raise UsageError(f"--method {method} needs --aux SOURCE (labelled auxiliary data)")
    return aux_statistics(update, str(options.aux), options.aux_per_class, options.seed, options.device,
                          model=model)


def _outcome(method: str, counts: torch.Tensor, layer: OutputLayer, diagnostics: dict,
             extra_lines: list[str] | None = None) -> LabelOutcome:
    counts = counts.to(torch.int64).cpu()
    labels = None
    if layer.total == 1:
        labels = torch.zeros(1, counts.numel(), dtype=torch.float64)
        labels[0, int(torch.argmax(counts))] = 1.0
    present = [f"{j}x{int(c)}" if c > 1 else str(j) for j, c in enumerate(counts.tolist()) if c > 0]
    diagnostics = {"method": method, "num_samples": layer.total, "batch_size": layer.batch_size,
                   "steps": layer.steps, **diagnostics}
    summary = [f"{method}: {int(counts.sum())} labels over {int((counts > 0).sum())} classes: {' '.join(present)}",
               *(extra_lines or [])]
    return LabelOutcome(method=method, labels=labels, counts=counts, diagnostics=diagnostics, summary=summary)


def _device(options: CountOptions) -> str:
    return options.device


# --------------------------------------------------------------------------- methods


def idlg(update, options: CountOptions) -> LabelOutcome:
    """iDLG: one sample; the only class whose weight-gradient row sum is negative."""
    layer = output_layer(update, _device(options))
    if layer.total != 1:
        raise UsageError(f"--method idlg recovers one label (B = 1, one step); this update has N = {layer.total} "
                         f"samples: use rlu, ilrg, zlg or llg")
    row_sums = layer.weight_grad.sum(dim=1)
    counts = torch.zeros(row_sums.numel(), dtype=torch.int64)
    counts[lc.idlg_label(row_sums)] = 1
    return _outcome("idlg", counts, layer, {"negative_rows": int((row_sums < 0).sum())})


def yin(update, options: CountOptions) -> LabelOutcome:
    """GradInversion's rule: the N classes with the most negative weight-gradient entry."""
    layer = output_layer(update, _device(options))
    num_classes = layer.weight.shape[0]
    if layer.total > num_classes:
        raise UsageError(f"--method yin assumes N distinct labels, but N = {layer.total} > K = {num_classes} classes; "
                         "use rlu, ilrg, zlg or llg")
    return _outcome("yin", lc.yin_counts(layer.weight_grad.cpu(), layer.total), layer, {})


def llg(update, options: CountOptions) -> LabelOutcome:
    """LLG: impact from the gradient itself, no auxiliary data."""
    layer = output_layer(update, _device(options))
    counts = lc.llg_counts(layer.weight_grad.sum(dim=1).cpu(), layer.total)
    return _outcome("llg", counts, layer, {})


def llg_plus(update, options: AuxCountOptions) -> LabelOutcome:
    """LLG+: impact and per-class offsets measured on auxiliary data."""
    layer = output_layer(update, _device(options))
    aux = load_aux(update, options, "llg+")
    counts = lc.llg_counts(layer.weight_grad.sum(dim=1).cpu(), layer.total, aux.llg_impact / layer.total,
                           aux.llg_offsets.cpu())
    return _outcome("llg+", counts, layer, {"aux_size": aux.size})


def zlg(update, options: AuxCountOptions) -> LabelOutcome:
    """ZLG: n_j = N (p_bar_j - g_j / O_bar), clipped and rounded to sum to N."""
    layer = output_layer(update, _device(options))
    aux = load_aux(update, options, "zlg")
    estimate = lc.zlg_estimate(layer.weight_grad.sum(dim=1).cpu(), layer.total, aux.expected_softmax.cpu(),
                               aux.mean_feature_sum)
    return _outcome("zlg", lc.largest_remainder(estimate, layer.total), layer, {"aux_size": aux.size})


def ilrg(update, options: CountOptions) -> LabelOutcome:
    """iLRG: class-average embeddings and a pseudo-inverse; needs the last-layer bias."""
    layer = output_layer(update, _device(options))
    if layer.bias is None:
        raise UsageError("--method ilrg needs a last-layer bias (its embeddings are G_j / db_j); "
                         "this model has none: use rlu or zlg")
    estimate, residual = lc.ilrg_estimate(layer.weight, layer.bias, layer.weight_grad, layer.bias_grad, layer.total)
    counts = lc.largest_remainder(estimate.cpu(), layer.total)
    return _outcome("ilrg", counts, layer, {"residual": residual})


def rlu_published(update, options: AuxCountOptions) -> LabelOutcome:
    """The estimator of the published RLU code: n_j ~ max(0, s_j - g_b,j) rescaled to N,
    s the off-class softmax of the mean auxiliary logits (`lc.published_rlu_estimate`).

    For m > 1 the published code averages s along a path from the global to the
    received model; here s is the mean of its values at those two ends."""
    device = _device(options)
    model = update.build_model(dtype=torch.float64, device=device)
    layer = output_layer(update, device, model)
    if layer.bias is None:
        raise UsageError("--method rlu-published reads the last-layer bias update; this model has none: use rlu")
    aux = load_aux(update, options, "rlu-published", model)
    num_classes = layer.weight.shape[0]

    def shift(features, weight, bias):
        return torch.softmax(lc.off_class_mean_logits(features @ weight.T + bias, aux.labels, num_classes), dim=0)

    shifts = [shift(aux.features, layer.weight, layer.bias)]
    if layer.steps > 1:
        from gitool.aux_stats import model_outputs

        _, received_features = model_outputs(received_model(update, model), aux.inputs)
        shifts.append(shift(received_features, layer.weight + layer.weight_delta, layer.bias + layer.bias_delta))
    estimate = lc.published_rlu_estimate(layer.bias_grad, torch.stack(shifts).mean(dim=0), layer.total)
    return _outcome("rlu-published", lc.largest_remainder(estimate.cpu(), layer.total), layer, {"aux_size": aux.size})


def received_model(update, model):
    """A copy of ``model`` (the global one) with the update's delta added: the model the
    server receives."""
    received = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in received.named_parameters():
            if name in update.values:
                param.add_(update.values[name].to(param))
    return received


def rlu(update, options: RLUOptions) -> LabelOutcome:
    """RLU (Chen & Vikalo 2024); see `recover_rlu`."""
    device = _device(options)
    model = update.build_model(dtype=torch.float64, device=device)
    layer = output_layer(update, device, model)
    aux = load_aux(update, options, "rlu", model)
    counts, diagnostics = recover_rlu(update, layer, aux, model, options.refine_rounds, options.drift,
                                      options.batch_draws)
    use_bias = layer.bias is not None
    diagnostics.update(aux_size=aux.size, signal="bias" if use_bias else "weight_row_sums",
                       optimizer=update.training.optimizer)
    lines = [f"rlu: relative residual {diagnostics['residual']:.2e}, {diagnostics['refinement_rounds']} refinement "
             f"round(s), {aux.size} auxiliary samples"
             + ("" if use_bias else "; no last-layer bias: used the weight rows' sums")]
    return _outcome("rlu", counts, layer, diagnostics, lines)


SIMULATION_SIZE = 200
# With batch norm, the simulated path's system is measured at this many of the m + 1
# steps and interpolated in between (each measurement is one more forward pass).
SIMULATION_POINTS = 6
# Seed of the splits of the counts into batches (``batch_draws``): same update, same counts.
SIMULATION_SEED = 0
# A refinement round that moves at most this fraction of the N labels ends the refinement.
REFINE_TOLERANCE = 0.02


def simulation_subset(labels: torch.Tensor, num_classes: int, size: int) -> torch.Tensor:
    """Indices of the first ceil(size / K) auxiliary samples of every class."""
    per_class = max(1, -(-size // num_classes))
    keep = [torch.nonzero(labels == cls).flatten()[:per_class] for cls in range(num_classes)]
    return torch.cat(keep)


def rlu_observation(layer: OutputLayer) -> torch.Tensor:
    """u = -N g_b, the right-hand side of RLU's system: the bias update, or without a
    last-layer bias the weight rows' sums (`gitool.attacks.rlu.step_system`)."""
    return -layer.total * (layer.bias_grad if layer.bias is not None else layer.weight_grad.sum(dim=1))


def recover_rlu(update, layer: OutputLayer, aux, model, refine_rounds: int = 3, drift: str = "simulate",
                batch_draws: int = 0):
    """RLU (see `gitool.attacks.rlu` for the method and its assumptions).

    u = -N g_b is read off the bias update. For m = 1 the system is the global model's
    on the auxiliary set, solved once. For m > 1 the first estimate places the steps
    between the global and the received model; with ``drift`` "simulate" each
    refinement round simulates the m local steps on the auxiliary set with the current
    counts, calibrates the simulated path against the received model and solves again,
    until the counts settle (`_refine`). With "midpoint" the statistics of one model,
    theta_0 + t* delta on the straight path to the received model
    (`rlu_math.effective_fraction`), stand for every step: one forward pass instead of
    m simulated steps per round.

    Without a last-layer bias the same system is written on the weight rows' sums: the
    stated approximation is that the client's per-class feature sums resemble the
    auxiliary set's."""
    from gitool.aux_stats import model_outputs

    num_classes = layer.weight.shape[0]
    use_bias = layer.bias is not None
    observed = rlu_observation(layer)
    batch_norm = rlu_math.has_batch_statistics(model)

    def system_of(probs, features):
        return rlu_math.step_system(probs, features, aux.labels, num_classes, not use_bias)

    global_system = system_of(aux.probs, aux.features)
    if layer.steps == 1:
        estimate, residual = rlu_math.solve_counts_nnls(global_system, observed, layer.total)

        def refined_system(estimate):  # batch norm: S with the estimated class mix in the batch
            return system_of(*rlu_math.outputs_with_batch_mix(model, aux.inputs, aux.labels, estimate,
                                                              layer.batch_size))

        return _refine(refined_system, estimate, residual, observed, layer.total, refine_rounds if batch_norm else 0)

    received = received_model(update, model)
    # float32 is precise enough for this approximation and twice as fast.
    received_probs, received_features = model_outputs(copy.deepcopy(received).float(), aux.inputs.float())
    received_system = system_of(received_probs.double(), received_features.double())
    system = rlu_math.drifted_system(aux.features, received_features.double(), aux.labels, layer.weight, layer.bias,
                                     layer.weight_delta, layer.bias_delta if use_bias else None,
                                     rlu_math.path_fractions(layer.response), layer.coefficients, num_classes,
                                     use_feature_sums=not use_bias)
    estimate, residual = rlu_math.solve_counts_nnls(system, observed, layer.total)
    if drift == "midpoint":
        fraction = rlu_math.effective_fraction(layer.response, layer.coefficients)
        midpoint = copy.deepcopy(model).float()
        with torch.no_grad():
            for name, param in midpoint.named_parameters():
                if name in update.values:
                    param.add_(update.values[name].to(param), alpha=fraction)

        def midpoint_system(estimate):
            if batch_norm:  # normalised with the estimated class mix in the batch
                return system_of(*rlu_math.outputs_with_batch_mix(midpoint, aux.inputs, aux.labels, estimate,
                                                                  layer.batch_size))
            probs, features = model_outputs(midpoint, aux.inputs.float())
            return system_of(probs.double(), features.double())

        # Without batch norm the system does not depend on the estimate: one round solves it.
        return _unless_runaway(_refine(midpoint_system, estimate, residual, observed, layer.total,
                                       refine_rounds if batch_norm else 1), global_system, observed, layer.total)
    training = update.training
    # The simulation is the costly part (m forward and backward passes per round): it
    # runs on at most SIMULATION_SIZE auxiliary samples, the same number per class.
    keep = simulation_subset(aux.labels, num_classes, SIMULATION_SIZE)

    def simulated_system(estimate):
        start, end = global_system, received_system
        if batch_norm:  # both ends measured with the estimated class mix in the batch
            start = system_of(*rlu_math.outputs_with_batch_mix(model, aux.inputs, aux.labels, estimate,
                                                               layer.batch_size))
            end = system_of(*rlu_math.outputs_with_batch_mix(received, aux.inputs, aux.labels, estimate,
                                                             layer.batch_size))
        # The client's batches are a random split of its labels: with batch_draws the system
        # is averaged over that many seeded splits of the current counts, else each step
        # trains on the mean batch n/m.
        generator = torch.Generator().manual_seed(SIMULATION_SEED)
        counts = lc.largest_remainder(estimate, layer.total)
        mixes_per_draw = [rlu_math.batch_mixes(counts, layer.steps, layer.batch_size, generator)
                          for _ in range(batch_draws)] or [estimate]
        draws = []
        for mixes in mixes_per_draw:
            simulated, progress = rlu_math.simulate_drift(
                model, aux.inputs[keep], aux.labels[keep], mixes.to(aux.inputs.device), steps=layer.steps,
                batch_size=layer.batch_size, lr=training.lr, optimizer=training.optimizer,
                momentum=training.momentum, prox_mu=training.prox_mu, weight_decay=training.weight_decay,
                use_feature_sums=not use_bias, points=SIMULATION_POINTS)
            draws.append(rlu_math.weighted_system(rlu_math.calibrate(simulated, progress, start, end),
                                                  layer.coefficients))
        return rlu_math.expected_system(draws)

    return _unless_runaway(_refine(simulated_system, estimate, residual, observed, layer.total, refine_rounds),
                           global_system, observed, layer.total)


# The drift-modelled counts give way to the global model's when their own least-squares
# residual is worse by more than this (relative residuals, ||A n - u|| / ||u||).
RUNAWAY_MARGIN = 0.1


def _unless_runaway(refined: tuple[torch.Tensor, dict], global_system: torch.Tensor, observed: torch.Tensor,
                    total: int, margin: float = RUNAWAY_MARGIN) -> tuple[torch.Tensor, dict]:
    """The drift-modelled counts, or the counts of the global model's system when these
    explain the update clearly better.

    On a confident model whose local steps overfit a skewed batch (momentum, m = 10) the
    modelled path can run away: over-counting a class trains the simulation on it, which
    asks for more of it, and the counts stop explaining u (measured on LeNet-5 at 90%,
    momentum, B = 64: residual 0.54-0.74 and iAcc down to 0.15, where the global model's
    statistics left a residual of 0.01-0.27 and gave 0.57-0.65). The residual is the
    method's own fit, not the truth; the margin keeps the drift model wherever it fits
    about as well (then it is the better guess)."""
    counts, diagnostics = refined
    estimate, residual = rlu_math.solve_counts_nnls(global_system, observed, total)
    diagnostics["global_residual"] = residual
    if diagnostics["residual"] > residual + margin:
        diagnostics.update(fallback="global model's statistics (the drift model fits the update worse)",
                           drift_residual=diagnostics["residual"], residual=residual)
        return lc.largest_remainder(estimate, total), diagnostics
    return counts, diagnostics


def _refine(system_for, estimate: torch.Tensor, residual: float, observed: torch.Tensor, total: int,
            rounds: int, tolerance: float = REFINE_TOLERANCE) -> tuple[torch.Tensor, dict]:
    """Re-solve with the system of the current estimate, at most ``rounds`` times, until
    a round moves at most ``tolerance`` x N labels from one class to another.

    The system is itself an estimate (auxiliary data, a simulated path), so rounds
    that move a few labels back and forth are noise: measured on the benchmark grid,
    the first round does almost all of the good and later ones change iAcc by less than
    half a point either way. Returns (counts, diagnostics)."""
    counts = lc.largest_remainder(estimate, total)
    done, moves = 0, []
    for done in range(1, rounds + 1):
        estimate, residual = rlu_math.solve_counts_nnls(system_for(estimate), observed, total)
        new_counts = lc.largest_remainder(estimate, total)
        moves.append(int((new_counts - counts).abs().sum()) // 2)
        counts = new_counts
        if moves[-1] <= tolerance * total:
            break
    return counts, {"residual": residual, "refinement_rounds": done, "labels_moved": moves}
