"""Adapters for the analytic reconstructions ``--method fc`` and ``--method conv``.

They turn an update plus the recovered labels and features into the tensors the pure
math in `gitool.attacks.analytic_fc` / `gitool.attacks.analytic_conv` needs: the model's
computation is read with torch.fx (gitool.model_graph: a chain of Linear / Conv2d layers
with activations, reshapes and eval-mode dropout, the logits picked by the update's
output selector; anything else is refused by naming its graph node), every weight layer
gets its gradient from the update, and the result is denormalised to images in [0, 1].
docs/analytic.md states when each layer is solvable.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gitool.attacks.analytic_conv import ConvLayerData, SolveOptions, Stage, invert_network, structural_counts
from gitool.attacks.analytic_fc import (LinearLayerData, activation_inverse, classifier_deltas,
                                       pair_labels_with_features)
from gitool.attacks.label_counts import mean_gradient
from gitool.attacks.soft_label import bias_feature
from gitool.errors import GitoolError, UsageError
from gitool.facts import require_facts
from gitool.model_graph import ChainLayer, GraphRefusal, read_chain
from gitool.specs import Interval, OneOf, check_fields, fact
from gitool.reconstruct import ReconOutcome


# ----------------------------------------------------------------------------- the update


def single_step_gradients(update) -> dict[str, torch.Tensor]:
    """The gradient of the one local step, in float64.

    A FedAvg delta of one step (momentum and the FedProx term vanish at the first step) is
    theta_1 - theta_0 = -lr (g + weight_decay theta_0), so g is recovered exactly.
    """
    require_facts(update, ["batch_size", "defence"] + (["steps", "lr", "optimizer", "weight_decay"]
                                                       if update.kind == "delta" else []),
                  for_method="analytic reconstruction")
    values = {name: value.to(torch.float64) for name, value in update.values.items()}
    if update.kind == "gradient":
        if update.training.steps != 1:
            raise GitoolError("analytic reconstruction needs the gradient of one step")
        return values
    training = update.training
    if training.steps != 1:
        raise GitoolError(f"analytic reconstruction needs one local step; this update has {training.steps} "
                          "(use --method optimize for multi-step updates)")
    return {name: mean_gradient(delta, update.global_state[name].to(torch.float64), 1, training.lr,
                                training.optimizer, training.momentum, training.prox_mu, training.weight_decay)
            for name, delta in values.items()}


def build_stages(model: nn.Module, update, gradients: dict[str, torch.Tensor]) -> tuple[list[Stage], ChainLayer]:
    """The solvers' stages (weight layers with activation, gradient and shapes, from the
    input up) and the classifier, from the model's computation as torch.fx reads it."""
    try:
        chain = read_chain(model, tuple(update.input.shape), update.model.output)
    except GraphRefusal as exc:
        raise GraphRefusal(f"{exc}; --method optimize takes any model") from None
    random = [step for step in chain.dropout if step.p > 0]
    if random:
        require_facts(update, ["model_mode"], for_method="analytic reconstruction of a model with dropout")
        active = next((step for step in random if step.training), None)
        if active is not None:
            raise GitoolError(f"node '{active.node}' ({active.operation}, p={active.p:g}) drops values at random in "
                              "train mode (the update's model_mode): the client's masks are unknown, so the "
                              "analytic methods cannot invert it; --method optimize takes any model")
    return [_stage(layer, gradients) for layer in chain.hidden], chain.classifier


def _stage(layer: ChainLayer, gradients: dict[str, torch.Tensor]) -> Stage:
    module = layer.module
    weight_name = f"{layer.name}.weight"
    if weight_name not in gradients:
        raise GitoolError(f"the update holds no gradient for '{weight_name}' (frozen layer?)")
    weight = module.weight.detach()
    weight_grad = gradients[weight_name].to(weight.device)
    if isinstance(module, nn.Linear):
        data = LinearLayerData(weight=weight, weight_grad=weight_grad, activation=layer.activation,
                               leaky_slope=layer.leaky_slope)
        return Stage(layer.name, "linear", data, layer.input_shape, layer.output_shape)
    bias = module.bias.detach() if module.bias is not None else None
    data = ConvLayerData(weight=weight, bias=bias, weight_grad=weight_grad, stride=tuple(module.stride),
                         padding=layer.padding, activation=layer.activation, leaky_slope=layer.leaky_slope,
                         input_shape=tuple(layer.input_shape))
    return Stage(layer.name, "conv", data, layer.input_shape, layer.output_shape)


# ----------------------------------------------------------------------------- labels and features


def recovered_inputs(update, labels, features, classifier: ChainLayer, gradients
                     ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Labels (B x K) and features (B x d) paired sample by sample, and how they were obtained."""
    if labels is None:
        raise UsageError("analytic reconstruction needs --labels (from `gitool labels`)")
    labels.check_source(update)
    label_rows = labels.require("labels").to(torch.float64)
    weight, bias = _weight_and_bias(classifier)
    device = weight.device
    weight_grad = gradients[f"{classifier.name}.weight"].to(device)
    batch = update.training.batch_size
    if label_rows.ndim != 2 or label_rows.shape[0] != batch or label_rows.shape[1] != weight.shape[0]:
        raise GitoolError(f"labels are {tuple(label_rows.shape)}, expected {batch} x {weight.shape[0]} "
                          f"for this update")
    info: dict[str, Any] = {}
    if features is not None:
        features.check_source(update)
        feature_rows = features.require("features").to(torch.float64)
        info["features"] = "file"
    elif bias is not None and batch == 1:
        # One sample: every row of dW is (p_i - y_i) x and db_i = p_i - y_i (methods.md section 0).
        bias_grad = gradients[f"{classifier.name}.bias"].to(device)
        feature_rows = bias_feature(weight_grad, bias_grad).unsqueeze(0)
        info["features"] = "bias ratio"
    else:
        raise UsageError("give --features (from `gitool features`); the bias ratio needs a classifier bias "
                         "and a single sample")
    if feature_rows.ndim != 2 or feature_rows.shape != (batch, weight.shape[1]):
        raise GitoolError(f"features are {tuple(feature_rows.shape)}, expected {batch} x {weight.shape[1]}")
    label_rows, feature_rows = label_rows.to(device), feature_rows.to(device)
    label_rows, pairing_residual = pair_labels_with_features(weight, bias, weight_grad, feature_rows, label_rows)
    info["classifier_residual"] = pairing_residual
    return label_rows, feature_rows, info


def _weight_and_bias(layer: ChainLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
    module = layer.module
    return module.weight.detach(), (module.bias.detach() if module.bias is not None else None)


# ----------------------------------------------------------------------------- the methods


def solve_options(options: AnalyticOptions) -> SolveOptions:
    """The solver's settings from the method's options (checked by AnalyticOptions)."""
    return SolveOptions(solver=options.solver, constraints=options.constraints, tol=options.tol,
                        max_iter=options.max_iter, condition_limit=options.condition_limit,
                        dense_limit=options.dense_limit)


def _prepare(update, labels, features, options: AnalyticOptions):
    device = options.device
    model = update.build_model(dtype=torch.float64, device=device)
    gradients = single_step_gradients(update)
    stages, classifier = build_stages(model, update, gradients)
    label_rows, feature_rows, info = recovered_inputs(update, labels, features, classifier, gradients)
    return model, stages, classifier, label_rows, feature_rows, info


def _run(method: str, update, labels, features, options, progress, allow_conv: bool) -> ReconOutcome:
    started = time.perf_counter()
    _, stages, classifier, label_rows, feature_rows, info = _prepare(update, labels, features, options)
    if not allow_conv:
        convs = [stage.name for stage in stages if stage.kind == "conv"]
        if convs:
            raise GitoolError(f"--method fc handles fully-connected networks only; '{convs[0]}' is a "
                              "convolution: use --method conv")
    weight, bias = _weight_and_bias(classifier)
    deltas = classifier_deltas(weight, bias, feature_rows, label_rows)
    solve = solve_options(options)
    solve.precision = update_precision(update)
    inputs, layers = invert_network(stages, weight, deltas, feature_rows, solve, progress)
    images = update.input.denormalize(inputs.reshape(inputs.shape[0], *update.input.shape))
    seconds = time.perf_counter() - started
    diagnostics = {"layers": [_plain(layer) for layer in layers], "seconds": seconds, **info}
    summary = [f"{method}: {len(layers)} layers inverted in {seconds:.2f} s; label-feature consistency "
               f"with the classifier gradient {info['classifier_residual']:.1e}"]
    flagged = [layer for layer in layers if not layer.get("within_precision", True)]
    if flagged:
        # A residual round-off cannot explain: the layer's input (and every layer below it) is
        # not the client's; written anyway for inspection, but flagged in the file and here.
        top = flagged[0]
        also = f" (also flagged: {', '.join(layer['layer'] for layer in flagged[1:])})" if len(flagged) > 1 else ""
        diagnostics["flagged_layers"] = [layer["layer"] for layer in flagged]
        diagnostics["warnings"] = [
            f"warning: {top['layer']}: gradient residual {top['gradient_residual']:.1e} exceeds the "
            f"{top['residual_limit']:.1e} that {_precision_name(solve.precision)} round-off explains; its input "
            f"and every layer below are not exact{also}"]
        summary.extend(diagnostics["warnings"])
    for layer in layers:
        if layer.get("converged") is False:
            summary.append(f"warning: {layer['layer']}: the iterative solver stopped after {layer['iterations']} "
                           f"iterations at relative residual {layer['normal_residual']:.1e} (raise --max-iter)")
    return ReconOutcome(method=method, images=images.clamp(0, 1).to("cpu"), diagnostics=diagnostics,
                        summary=summary)


def update_precision(update) -> float:
    """Machine epsilon of the least precise number the update carries (its gradient or delta
    and the global weights): float32 for what real clients send."""
    tensors = list(update.values.values()) + [t for t in update.global_state.values() if t.is_floating_point()]
    return max((torch.finfo(t.dtype).eps for t in tensors if t.is_floating_point()), default=2.0 ** -52)


def _precision_name(precision: float) -> str:
    names = {torch.finfo(dtype).eps: str(dtype).replace("torch.", "") for dtype in
             (torch.float64, torch.float32, torch.bfloat16, torch.float16)}
    return names.get(precision, f"epsilon {precision:.1e}")


def _plain(diag: dict) -> dict:
    """Diagnostics as JSON-friendly numbers (inf -> None)."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return clean(diag)


@dataclass(frozen=True)
class AnalyticOptions:
    """Options of --method fc and conv, each with its default and constraint."""

    solver: str = fact("auto", OneOf(("auto", "dense", "iterative")))
    constraints: str = fact("auto", OneOf(("auto", "gradient", "both")))
    tol: float = fact(1e-13, Interval(float, 0.0, None, closed="neither"))
    max_iter: int = fact(3000, Interval(int, 1, None))
    condition_limit: float = fact(1e8, Interval(float, 0.0, None, closed="neither"))
    dense_limit: int = fact(4096, Interval(int, 1, None))
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_fields(self, "options")


def reconstruct_fc(update, options, labels=None, features=None, progress=None) -> ReconOutcome:
    """Wang et al.'s fully-connected inversion (methods.md section 1)."""
    return _run("fc", update, labels, features, _parsed(options), progress, allow_conv=False)


def reconstruct_conv(update, options, labels=None, features=None, progress=None) -> ReconOutcome:
    """R-CONV-style inversion of conv stacks with an FC head (methods.md section 2)."""
    return _run("conv", update, labels, features, _parsed(options), progress, allow_conv=True)


def _parsed(options) -> AnalyticOptions:
    """The options object, also from a plain dict (checked by the same constraints)."""
    return AnalyticOptions(**options) if isinstance(options, dict) else options


def explain(update, method: str) -> list[dict]:
    """Per layer, before any solve: unknowns, gradient and weight equations (an upper bound
    for ReLU, whose inactive outputs give none) and whether the counts allow a solution."""
    model = update.build_model(dtype=torch.float64, device="cpu")
    stages, _ = build_stages(model, update, single_step_gradients(update))
    batch = update.training.batch_size
    rows = []
    for stage in reversed(stages):
        layer = stage.layer
        if stage.kind == "linear":
            out_features, in_features = layer.weight.shape
            rows.append({"layer": stage.name, "kind": "linear", "unknowns": batch * in_features,
                         "gradient_equations": out_features * in_features, "weight_equations": 0,
                         "solvable": "yes (delta != 0)" if batch <= out_features else "no"})
            continue
        filters = layer.weight.shape[0]
        out_h, out_w = layer.output_hw
        probe = torch.full((1, filters, out_h, out_w), 0.5, dtype=torch.float64)
        _, known = activation_inverse(layer.activation, probe, layer.leaky_slope)
        counts = structural_counts(layer, batch, int(known.sum()) * batch)
        partial = " (active outputs only)" if layer.activation == "relu" else ""
        solvable = ("yes (gradient)" if counts["gradient_sufficient"] else
                    f"with weight equations{partial}" if counts["combined_sufficient"] else "no")
        rows.append({"layer": stage.name, "kind": "conv", "unknowns": counts["unknowns"],
                     "gradient_equations": counts["gradient_equations"],
                     "weight_equations": counts["weight_equations"], "solvable": solvable})
    return rows
