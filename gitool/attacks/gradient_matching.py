"""Optimisation-based input reconstruction by gradient matching (methods.md section 1, last part).

The server looks for dummy images x' (N = B x m of them, in [0, 1]) whose update under
the client's training matches the received one. Objective:

    J(x') = D_grad(U(x'), U*) + f * D_feat(phi(x'), x_hat) + tv * TV(x')

- U(x') is the update the client would have sent for x': the gradient of the mean batch
  loss (FedSGD), or theta_after - theta_before after simulating the m local steps with
  the recorded lr, momentum, FedProx mu and weight decay (FedAvg inversion); U* the
  received update.
- The loss is the client's soft-label cross-entropy (`gitool.attacks.losses.soft_cross_entropy`)
  with the recovered soft label y_hat held fixed, or, with no labels (DLG), with
  y = softmax(l) for learnable logits l optimised jointly with x'.
- D is ``cosine``: 1 - <U, U*>_w / (|U|_w |U*|_w), inner products and squared norms summed
  over the layers with optional per-layer weights w (Inverting Gradients), or ``l2``:
  sum_l w_l |U_l - U*_l|^2 (DLG).
- phi(x') is the dummy images' last-layer input and x_hat the recovered feature (row n of
  x_hat belongs to dummy image n); D_feat is the mean over rows of 1 - cosine, or the
  summed squared difference for ``l2``.
- ``terms``: ``g`` matches every layer of the update; ``f`` replaces the last-layer weight
  gradient by the feature term; ``gf`` uses both.
- TV is the mean absolute difference of neighbouring pixels of x' in [0, 1].

The images are optimised in [0, 1] space, normalised with the update's input spec before
entering the model, and projected back onto [0, 1] after every step (box constraint).
Adam uses the paper's schedule (lr x 0.1 at 3/8, 5/8 and 7/8 of the iterations) and, as
Inverting Gradients' published code, steps on the sign of the image gradient (``signed``);
an L-BFGS iteration is ``lbfgs_inner`` inner steps (torch's default 20, as DLG), with a
strong-Wolfe line search unless ``line_search`` is off, and the projection onto [0, 1]
between iterations. Several restarts from different random images are
ranked by their final objective J, never by anything else.

Pure tensor code: no file I/O, printing or option parsing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch.func import functional_call

from gitool.attacks.losses import smooth_labels, soft_cross_entropy
from gitool.attacks.errors import AttackError, InputError
from gitool.models import last_linear

DISTANCES = ("cosine", "l2")
TERMS = ("g", "f", "gf")
OPTIMIZERS = ("adam", "lbfgs")
# Restarts run together (vmapped) only for models with at most this many parameters.
TOGETHER_PARAMETER_LIMIT = 1_000_000


@dataclass(frozen=True)
class MatchConfig:
    """How the optimisation runs. Defaults are the paper's Adam settings."""

    distance: str = "cosine"
    terms: str = "g"
    feature_weight: float = 1.0
    tv: float = 1e-2
    layer_weights: Mapping[str, float] | None = None  # parameter name -> weight; absent names weigh 1
    optimizer: str = "adam"
    iterations: int = 4800
    lr: float = 0.1
    restarts: int = 1
    signed: bool = False  # Adam on the sign of the image gradient (Inverting Gradients' published setting)
    lbfgs_inner: int = 20  # L-BFGS evaluations per iteration (torch's default, as in DLG)
    line_search: bool = True  # L-BFGS with a strong-Wolfe line search (DLG had none; without, a label that
    # cannot match exactly can make it diverge to saturated images)
    seed: int = 0
    report_every: int = 50  # progress (and the only host syncs) every this many iterations

    def validate(self) -> None:
        if self.distance not in DISTANCES:
            raise InputError(f"unknown distance {self.distance!r}; choose cosine or l2")
        if self.terms not in TERMS:
            raise InputError(f"unknown terms {self.terms!r}; choose g, f or gf")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.optimizer!r}; choose adam or lbfgs")
        if self.iterations < 1 or self.restarts < 1 or self.lbfgs_inner < 1:
            raise InputError(f"iterations, restarts and inner steps must be at least 1, got {self.iterations}, "
                             f"{self.restarts} and {self.lbfgs_inner}")
        if not (0 < self.lr < math.inf):
            raise InputError(f"the learning rate must be positive and finite, got {self.lr}")
        if not (0 <= self.tv < math.inf and 0 <= self.feature_weight < math.inf):  # NaN fails both
            raise InputError(f"the TV and feature weights must be finite and non-negative, got {self.tv} and "
                             f"{self.feature_weight}")
        if not 0 <= self.seed <= 2**63 - 1:
            raise InputError(f"the seed must be in [0, 2**63 - 1], got {self.seed}")
        weights = self.layer_weights or {}
        if not all(0 <= w < math.inf for w in weights.values()):
            raise InputError("layer weights must be finite and non-negative")


@dataclass
class ClientTraining:
    """What the server knows of the client's local training (from the update header)."""

    kind: str  # "gradient" | "delta"
    batch_size: int
    steps: int = 1
    lr: float = 0.01
    optimizer: str = "sgd"  # sgd | momentum | fedprox
    momentum: float = 0.0
    prox_mu: float = 0.0
    weight_decay: float = 0.0


@dataclass
class MatchOutcome:
    images: torch.Tensor  # N x C x H x W in [0, 1], the winning restart
    labels: torch.Tensor  # N x K labels used by the winner (the fixed ones, or softmax of the joint logits)
    loss: float  # the winner's final objective
    restart_losses: list[float] = field(default_factory=list)
    history: list[tuple[int, int, float]] = field(default_factory=list)  # (restart, iteration, loss)
    stopped: str | None = None  # why the run ended early (should_stop's reason), None when it ran in full
    iterations_done: int = 0  # iterations run, summed over the restarts


class _Stop(Exception):
    """should_stop() answered inside an L-BFGS iteration."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between vertically and horizontally adjacent pixels."""
    dy = (images[:, :, 1:, :] - images[:, :, :-1, :]).abs().mean()
    dx = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().mean()
    return dx + dy


def paper_schedule(optimizer: torch.optim.Optimizer, iterations: int) -> torch.optim.lr_scheduler.MultiStepLR:
    """lr x 0.1 at 3/8, 5/8 and 7/8 of the run (Inverting Gradients)."""
    milestones = sorted({max(1, int(iterations * f)) for f in (3 / 8, 5 / 8, 7 / 8)})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


def _features_and_logits(model, params, buffers, inputs, want_features: bool = True):
    """(logits, last-layer input flattened or None) of ``model`` with ``params`` and
    ``buffers`` swapped in (functional_call), or of the module as it is when params is None."""
    def call():
        return model(inputs) if params is None else functional_call(model, (params, buffers), (inputs,))

    if not want_features:
        return call(), None
    captured: list[torch.Tensor] = []
    handle = last_linear(model).register_forward_hook(lambda m, i, o: captured.append(i[0]))
    try:
        logits = call()
    finally:
        handle.remove()
    return logits, captured[-1].flatten(1)


class GradientMatcher:
    """The objective J for one model and one received update, with its constants
    (flattened targets, their weighted norm, pruning masks) computed once.

    ``model`` is in the client's mode (train or eval: batch norm uses batch statistics
    or its running ones). For a single gradient the module is called as it is, so in
    train mode its running statistics drift; they never enter the objective."""

    def __init__(self, model: torch.nn.Module, normalize: Callable[[torch.Tensor], torch.Tensor],
                 target: Mapping[str, torch.Tensor], training: ClientTraining, config: MatchConfig,
                 labels: torch.Tensor | None = None, features: torch.Tensor | None = None,
                 num_samples: int | None = None, pruned: bool = False):
        config.validate()
        self.model = model
        self.normalize = normalize
        self.training = training
        self.config = config
        self.labels = labels
        self.features = features
        named = dict(model.named_parameters())
        unknown = sorted(set(target) - set(named))
        if unknown:
            raise InputError(f"the update holds tensors the model lacks: {', '.join(unknown[:3])}")
        self.param_names = [n for n in named if n in target]
        self.params = {n: named[n].detach() for n in self.param_names}
        self.frozen = {n: p.detach() for n, p in named.items() if n not in target}
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        last = last_linear(model)
        self.last_weight_name = next(n for n, p in named.items() if p is last.weight)
        self.num_classes = last.out_features
        self.num_samples = num_samples or training.batch_size * training.steps
        self.uses_features = config.terms in ("f", "gf")

        if config.terms in ("f", "gf") and features is None:
            raise InputError(f"the terms {config.terms} need the recovered last-layer features")
        if features is not None and features.shape != (self.num_samples, last.in_features):
            raise InputError(f"features have shape {tuple(features.shape)}; the model needs "
                             f"{self.num_samples} x {last.in_features} (one last-layer input per sample)")
        if labels is not None and labels.shape != (self.num_samples, self.num_classes):
            raise InputError(f"labels have shape {tuple(labels.shape)}; the update needs "
                             f"{self.num_samples} x {self.num_classes}")

        matched = [n for n in self.param_names if not (config.terms == "f" and n == self.last_weight_name)]
        if not matched:
            raise InputError("no gradient tensor is left to match")
        weights = dict(config.layer_weights or {})
        bad = sorted(set(weights) - set(self.param_names))
        if bad:
            raise InputError(f"layer weights name unknown parameters: {', '.join(bad[:3])}")
        self.matched = matched
        self.matched_params = [named[n] for n in matched]
        for p in self.matched_params:
            p.requires_grad_(True)
        self.weights = [float(weights.get(n, 1.0)) for n in matched]
        self.targets = [target[n].detach() for n in matched]
        # Pruned updates (top-k defence): the zeroed entries carry no information; match the rest only.
        self.masks = [(t != 0).to(t.dtype) if pruned else None for t in self.targets]
        self.target_norm = torch.sqrt(sum(w * (t * t).sum() for w, t in zip(self.weights, self.targets)))
        if float(self.target_norm) == 0:
            raise InputError("the update is zero on every matched layer")

    # ------------------------------------------------------------------ the client's update

    def _param_dict(self, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**self.frozen, **trainable}

    def simulated_update(self, inputs: torch.Tensor, labels: torch.Tensor):
        """U(x') differentiably, and (single gradient with feature terms) the last-layer features."""
        t = self.training
        if t.kind == "gradient":
            # One step: the module itself, no parameter swapping (the cheapest graph).
            logits, feats = _features_and_logits(self.model, None, None, inputs, self.uses_features)
            # Only the matched tensors' gradients are needed (terms f skips the last weight).
            grads = torch.autograd.grad(soft_cross_entropy(logits, labels), self.matched_params, create_graph=True,
                                        materialize_grads=True)  # zero for an unused head
            return dict(zip(self.matched, grads)), feats
        # FedAvg: m local steps, exactly as the client's optimiser (gitool.capture.local_training).
        theta = dict(self._leaf_params())
        theta0 = {n: p.detach() for n, p in theta.items()}
        velocity = {n: torch.zeros_like(p) for n, p in theta.items()}
        b = t.batch_size
        for step in range(t.steps):
            batch = slice(step * b, (step + 1) * b)
            logits, _ = _features_and_logits(self.model, self._param_dict(theta), self.buffers, inputs[batch], False)
            names = list(theta)
            grads = torch.autograd.grad(soft_cross_entropy(logits, labels[batch]), [theta[n] for n in names],
                                        create_graph=True, materialize_grads=True)
            new_theta = {}
            for n, g in zip(names, grads):
                direction = g
                if t.optimizer == "fedprox":
                    direction = direction + t.prox_mu * (theta[n] - theta0[n])
                if t.weight_decay:
                    direction = direction + t.weight_decay * theta[n]
                if t.optimizer == "momentum":
                    velocity[n] = t.momentum * velocity[n] + direction
                    direction = velocity[n]
                new_theta[n] = theta[n] - t.lr * direction
            theta = new_theta
        return {n: theta[n] - theta0[n] for n in self.matched}, None  # features: see objective()

    def _leaf_params(self) -> dict[str, torch.Tensor]:
        if not hasattr(self, "_leaves"):
            self._leaves = {n: p.clone().requires_grad_(True) for n, p in self.params.items()}
        return self._leaves

    # ------------------------------------------------------------------ distances

    def gradient_distance(self, update: Mapping[str, torch.Tensor]) -> torch.Tensor:
        dummy = [update[n] if m is None else update[n] * m for n, m in zip(self.matched, self.masks)]
        if self.config.distance == "l2":
            return sum(w * ((d - t) ** 2).sum() for w, d, t in zip(self.weights, dummy, self.targets))
        dot = sum(w * (d * t).sum() for w, d, t in zip(self.weights, dummy, self.targets))
        norm = torch.sqrt(sum(w * (d * d).sum() for w, d in zip(self.weights, dummy)))
        return 1 - dot / (norm * self.target_norm + 1e-30)

    def feature_distance(self, feats: torch.Tensor) -> torch.Tensor:
        if self.config.distance == "l2":
            return ((feats - self.features) ** 2).sum()
        return (1 - torch.nn.functional.cosine_similarity(feats, self.features, dim=1, eps=1e-30)).mean()

    def objective(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """J(x') for images in [0, 1] and labels N x K (rows sum to 1)."""
        inputs = self.normalize(images)
        update, feats = self.simulated_update(inputs, labels)
        loss = self.gradient_distance(update)
        if self.uses_features:
            if self.training.kind != "gradient" and self.training.steps > 1:
                # Features of all N samples under the global model (the first step saw only B of them).
                _, feats = _features_and_logits(self.model, self._param_dict(self._leaf_params()), self.buffers,
                                                inputs)
            loss = loss + self.config.feature_weight * self.feature_distance(feats)
        if self.config.tv:
            loss = loss + self.config.tv * total_variation(images)
        return loss

    # ------------------------------------------------------------------ restarts together

    def batchable(self) -> bool:
        """Whether the restarts can run together (one vmap over a restart dimension): Adam
        (elementwise, so R stacked runs are R independent ones; L-BFGS's dot products would
        couple them), one gradient step, the g terms, no module that draws randomness or
        updates its buffers in place (train-mode batch norm or dropout), and a small model:
        batching pays where per-operation overhead dominates (LeNet: 1.5x-1.8x the
        restart-iterations per second of one by one), not where the convolutions do
        (ResNet-18, 11M parameters: 0.6x; benchmarks/results/reconstruct_optimize_curve_2026-12-02.md)."""
        if self.config.optimizer != "adam" or self.config.restarts < 2:
            return False
        if self.training.kind != "gradient" or self.uses_features or self.config.terms != "g":
            return False
        if sum(p.numel() for p in self.model.parameters()) > TOGETHER_PARAMETER_LIMIT:
            return False
        stateful = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)
        return not any(isinstance(m, stateful) and m.training for m in self.model.modules())

    def _functional_objective(self) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        """J(images, label logits or None) of one restart, written with torch.func so that
        it can be differentiated and vmapped over restarts."""
        base = {**self.frozen, **self.params}
        matched = {n: self.params[n] for n in self.matched}

        def objective(images: torch.Tensor, label_logits: torch.Tensor | None) -> torch.Tensor:
            labels = self.labels if label_logits is None else torch.softmax(label_logits, dim=1)
            inputs = self.normalize(images)

            def client_loss(trainable):
                logits = functional_call(self.model, ({**base, **trainable}, self.buffers), (inputs,))
                return soft_cross_entropy(logits, labels)

            loss = self.gradient_distance(torch.func.grad(client_loss)(matched))
            if self.config.tv:
                loss = loss + self.config.tv * total_variation(images)
            return loss

        return objective

    # ------------------------------------------------------------------ optimisation

    def run(self, image_shape: Sequence[int], device: torch.device | str = "cpu", dtype=torch.float32,
            progress: Callable[[int, int, dict], None] | None = None,
            snapshot: Callable[[int, int, torch.Tensor], None] | None = None, snapshot_every: int = 0,
            should_stop: Callable[[], str | None] | None = None) -> MatchOutcome:
        """Optimise ``restarts`` random starts and keep the one with the lowest J.

        Every restart keeps its best iterate (the lowest J any iteration evaluated, or the
        final projected images if lower). ``should_stop()`` is asked after every iteration;
        a reason it returns (e.g. ``"budget"``, ``"interrupted"``) ends the run there: the
        restarts not yet started are skipped and the best iterate so far wins, with the
        reason and the iterations done recorded in the outcome."""
        if self.batchable():
            return self._run_together(image_shape, device, dtype, progress, snapshot, snapshot_every, should_stop)
        cfg = self.config
        total = cfg.iterations * cfg.restarts
        best: tuple[float, torch.Tensor, torch.Tensor] | None = None
        restart_losses: list[float] = []
        history: list[tuple[int, int, float]] = []
        stopped: str | None = None
        done = 0
        for restart in range(cfg.restarts):
            generator = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + restart)
            images = torch.rand((self.num_samples, *image_shape), generator=generator, dtype=dtype)
            images = images.to(device).requires_grad_(True)
            variables = [images]
            if self.labels is None:  # DLG: learn the labels too
                logits = torch.randn((self.num_samples, self.num_classes), generator=generator, dtype=dtype)
                logits = logits.to(device).requires_grad_(True)
                variables.append(logits)

            def label_value(values=None):
                values = variables if values is None else values
                return self.labels if len(values) == 1 else torch.softmax(values[1], dim=1)

            if cfg.optimizer == "adam":
                optimizer = torch.optim.Adam(variables, lr=cfg.lr)
                scheduler = paper_schedule(optimizer, cfg.iterations)
            else:
                # Projection only between iterations: clamping inside would corrupt the curvature pairs.
                optimizer = torch.optim.LBFGS(variables, lr=cfg.lr, max_iter=cfg.lbfgs_inner, history_size=100,
                                              line_search_fn="strong_wolfe" if cfg.line_search else None)
                scheduler = None
            signed = cfg.signed and cfg.optimizer == "adam"

            evaluations = [0]

            def closure():
                # An L-BFGS iteration is many evaluations: stop between them too (the step's
                # partial state is dropped for the best iterate kept below).
                if cfg.optimizer == "lbfgs" and evaluations[0] and should_stop is not None:
                    reason = should_stop()
                    if reason:
                        raise _Stop(reason)
                evaluations[0] += 1
                loss = self.objective(images, label_value())
                # Gradients for the optimised variables only: loss.backward() would also
                # accumulate (unused) second-order gradients into every model parameter.
                for variable, grad in zip(variables, torch.autograd.grad(loss, variables)):
                    variable.grad = grad.sign() if signed and variable is images else grad
                return loss

            # The best iterate so far, kept on the device (no host sync per iteration): the
            # loss a step returns is J at the variables it started from.
            best_loss = torch.full((), math.inf, dtype=dtype, device=images.device)
            best_values = [v.detach().clone() for v in variables]
            last = None
            it = 0
            while it < cfg.iterations:
                start_values = [v.detach().clone() for v in variables]
                evaluations[0] = 0
                try:
                    last = optimizer.step(closure)
                except _Stop as stop:  # inside an L-BFGS iteration: keep what the evaluations found
                    with torch.no_grad():
                        images.clamp_(0, 1)
                    stopped = stop.reason
                    if progress is not None and last is not None:
                        progress(restart * cfg.iterations + it, total,
                                 {"loss": float(last.detach()), "restart": restart + 1, "iteration": it})
                    break
                it += 1
                with torch.no_grad():
                    images.clamp_(0, 1)  # box constraint: projection onto [0, 1]
                    better = last.detach() < best_loss  # False for NaN
                    best_loss = torch.where(better, last.detach(), best_loss)
                    best_values = [torch.where(better, s, b) for s, b in zip(start_values, best_values)]
                if scheduler is not None:
                    scheduler.step()
                reason = should_stop() if should_stop is not None else None
                if it % cfg.report_every == 0 or it == cfg.iterations or reason:
                    value = float(last.detach())  # the only host sync, once per report
                    history.append((restart, it, value))
                    if progress is not None:
                        progress(restart * cfg.iterations + it, total,
                                 {"loss": value, "restart": restart + 1, "iteration": it})
                if snapshot is not None and snapshot_every and it % snapshot_every == 0:
                    snapshot(restart, it, images.detach().clone())
                if reason:
                    stopped = reason
                    break
            done += it
            # Rank the restart by its objective at its best iterate: the attack's own loss.
            final_values = [v.detach() for v in variables]
            final = float(self.objective(images.detach(), label_value(final_values).detach()).detach())
            if not final <= float(best_loss):  # the final projected images, unless an earlier iterate was lower
                final, final_values = float(best_loss), best_values
            if not math.isfinite(final) or not bool(torch.isfinite(final_values[0]).all()):
                final = math.inf  # a diverged restart never wins
            restart_losses.append(final)
            if best is None or final < best[0]:
                best = (final, final_values[0].clone(), label_value(final_values).detach().clone())
            if stopped:
                break
        assert best is not None
        if not math.isfinite(best[0]):
            raise AttackError("the optimisation diverged in every restart (non-finite objective); try a smaller learning rate")
        return MatchOutcome(images=best[1], labels=best[2], loss=best[0], restart_losses=restart_losses,
                            history=history, stopped=stopped, iterations_done=done)


    def _run_together(self, image_shape, device, dtype, progress, snapshot, snapshot_every, should_stop
                      ) -> MatchOutcome:
        """``run`` for :meth:`batchable` settings: the R restarts stacked on a leading
        dimension, J and its gradient for all of them by one vmap per iteration, one Adam
        over the stack (elementwise: R independent runs). Same random starts as one by one."""
        cfg = self.config
        r = cfg.restarts
        joint = self.labels is None
        starts, logit_starts = [], []
        for restart in range(r):
            generator = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + restart)
            starts.append(torch.rand((self.num_samples, *image_shape), generator=generator, dtype=dtype))
            if joint:
                logit_starts.append(torch.randn((self.num_samples, self.num_classes), generator=generator,
                                                dtype=dtype))
        variables = [torch.stack(starts).to(device)]
        if joint:
            variables.append(torch.stack(logit_starts).to(device))
        images = variables[0]
        objective = self._functional_objective()
        if joint:
            value_and_grad = torch.func.vmap(torch.func.grad_and_value(objective, argnums=(0, 1)))
            evaluate = torch.func.vmap(objective)
        else:
            one = torch.func.grad_and_value(lambda x: objective(x, None))
            value_and_grad = torch.func.vmap(lambda x: (lambda g, v: ((g,), v))(*one(x)))
            evaluate = torch.func.vmap(lambda x: objective(x, None))
        optimizer = torch.optim.Adam(variables, lr=cfg.lr)
        scheduler = paper_schedule(optimizer, cfg.iterations)

        def rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            return mask.view(-1, *([1] * (like.dim() - 1)))

        best_loss = torch.full((r,), math.inf, dtype=dtype, device=images.device)
        best_values = [v.clone() for v in variables]
        history: list[tuple[int, int, float]] = []
        stopped, it = None, 0
        while it < cfg.iterations:
            start_values = [v.clone() for v in variables]
            grads, losses = value_and_grad(*variables)
            for variable, grad in zip(variables, grads):
                variable.grad = grad.sign() if cfg.signed and variable is images else grad
            optimizer.step()
            it += 1
            with torch.no_grad():
                images.clamp_(0, 1)
                better = losses < best_loss  # the losses are J at start_values; False for NaN
                best_loss = torch.where(better, losses, best_loss)
                best_values = [torch.where(rows(better, s), s, b) for s, b in zip(start_values, best_values)]
            scheduler.step()
            reason = should_stop() if should_stop is not None else None
            if it % cfg.report_every == 0 or it == cfg.iterations or reason:
                values = losses.tolist()  # the only host sync, once per report
                history.extend((restart, it, value) for restart, value in enumerate(values))
                if progress is not None:
                    progress(it * r, cfg.iterations * r, {"loss": min(values), "restart": f"1-{r}", "iteration": it})
            if snapshot is not None and snapshot_every and it % snapshot_every == 0:
                for restart in range(r):
                    snapshot(restart, it, images[restart].clone())
            if reason:
                stopped = reason
                break
        with torch.no_grad():
            finals = evaluate(*variables)
            use_final = finals <= best_loss  # the final projected images, unless an earlier iterate was lower
            chosen_loss = torch.where(use_final, finals, best_loss)
            chosen = [torch.where(rows(use_final, v), v, b) for v, b in zip(variables, best_values)]
        restart_losses = [value if math.isfinite(value) and bool(torch.isfinite(chosen[0][i]).all()) else math.inf
                          for i, value in enumerate(chosen_loss.tolist())]
        winner = min(range(r), key=lambda i: restart_losses[i])  # the first of equal losses, as one by one
        if not math.isfinite(restart_losses[winner]):
            raise AttackError("the optimisation diverged in every restart (non-finite objective); try a smaller learning rate")
        labels = self.labels if not joint else torch.softmax(chosen[1][winner], dim=1)
        return MatchOutcome(images=chosen[0][winner].clone(), labels=labels.detach().clone(),
                            loss=restart_losses[winner], restart_losses=restart_losses, history=history,
                            stopped=stopped, iterations_done=it * r)


def labels_from_counts(counts: torch.Tensor, num_samples: int, label_smoothing_eps: float = 0.0) -> torch.Tensor:
    """N x K labels from per-class counts (sum N), class by class: the per-sample order is
    unknown but free, since the dummy image in each slot adapts to its label. A known
    label-smoothing factor is applied to the one-hot rows."""
    counts = counts.round().to(torch.int64).clamp_min(0)
    if int(counts.sum()) != num_samples:
        raise InputError(f"the counts sum to {int(counts.sum())}, but the update used N = {num_samples} samples")
    classes = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    return smooth_labels(torch.eye(counts.numel(), dtype=torch.float64)[classes], label_smoothing_eps)
