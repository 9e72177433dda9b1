"""Play the federated-learning client: pick private samples, train locally, send.

`capture` builds the global model the server sent, picks N = B x m samples from a data
source, gives them labels of the configured family (hard, label smoothing, mixup), runs
one gradient step (FedSGD) or m local steps (FedAvg) with SGD, momentum or FedProx,
optionally applies defences (DP-SGD clipping and noise, top-k pruning), and returns
the update the server receives plus the truth only `score` may read.

Loss: soft-label cross-entropy averaged over the batch, L = -(1/B) sum_n y_n . log p_n,
plus (FedProx) mu/2 ||theta - theta_global||^2.
Optimiser, per step t with gradient g_t (plus weight decay wd * theta):
    v_t = momentum * v_{t-1} + g_t     (v = g for plain SGD and FedProx)
    theta_{t+1} = theta_t - lr * v_t
which is torch.optim.SGD's update with dampening 0 and no Nesterov.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from gitool import __version__
from gitool.attacks.losses import smooth_labels, soft_cross_entropy  # noqa: F401  (soft_cross_entropy: re-exported, the client's loss)
from gitool.errors import GitoolError, UsageError
from gitool.files import DefenceSpec, InputSpec, LossSpec, TrainingSpec, Truth, Update

OPTIMIZERS = ("sgd", "momentum", "fedprox")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class SampleChoice:
    """How the client's samples are picked: explicit item indices, classes (one per
    sample, or a pool drawn from), a Dirichlet(alpha) class mix, or uniformly at random."""

    indices: Sequence[int] | None = None
    classes: Sequence[int] | None = None
    dirichlet_alpha: float | None = None


@dataclass
class CaptureConfig:
    loss: LossSpec = field(default_factory=LossSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    defence: DefenceSpec = field(default_factory=DefenceSpec)
    input: InputSpec | None = None
    choice: SampleChoice = field(default_factory=SampleChoice)
    send: str | None = None  # "gradient" | "delta"; default gradient for m = 1
    init: str = "uniform"  # uniform | default | checkpoint path (provenance only here)
    seed: int = 0
    device: str = "cpu"


# --------------------------------------------------------------------------- validation


def validate(config: CaptureConfig, num_classes: int) -> None:
    t, loss, d = config.training, config.loss, config.defence
    if t.batch_size < 1 or t.steps < 1:
        raise UsageError("batch size and steps must be at least 1")
    if t.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {t.dtype!r}; choose float32 or float64")
    # NaN slips through every comparison below, and a value beyond the dtype's range
    # overflows inside the optimiser step: refuse both here, by the option's name.
    largest = torch.finfo(DTYPES[t.dtype]).max
    for option, value in (("--lr", t.lr), ("--momentum", t.momentum), ("--prox-mu", t.prox_mu),
                          ("--weight-decay", t.weight_decay), ("--dp-clip", d.dp_clip), ("--dp-noise", d.dp_noise)):
        if value is not None and not (0 <= value <= largest):
            raise UsageError(f"{option} must be a number in [0, {largest:.3g}] for {t.dtype}, got {value}")
    if t.lr <= 0:
        raise UsageError("the learning rate must be positive")
    if t.optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {t.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if t.optimizer == "momentum" and not 0 < t.momentum < 1:
        raise UsageError("--optimizer momentum needs --momentum in (0, 1)")
    if t.optimizer == "fedprox" and t.prox_mu <= 0:
        raise UsageError("--optimizer fedprox needs --prox-mu > 0")
    if t.model_mode not in ("train", "eval"):
        raise UsageError("model mode must be train or eval")
    if loss.family not in ("hard", "smoothing", "mixup"):
        raise UsageError(f"unknown label family {loss.family!r}")
    if loss.family == "smoothing":
        lo, hi = loss.label_smoothing_range or (loss.label_smoothing, loss.label_smoothing)
        if lo is None or not (0 <= lo <= hi <= 1):
            raise UsageError("label smoothing needs 0 <= eps <= 1 (or a range LO:HI inside [0, 1])")
    if loss.family == "mixup":
        if num_classes < 2:
            raise UsageError("mixup needs at least two classes")
        if loss.mixup_coef is None and not (loss.mixup_alpha and loss.mixup_alpha > 0):
            raise UsageError("mixup needs --mixup ALPHA > 0 or --mixup-coef C")
        if loss.mixup_coef is not None and not 0 <= loss.mixup_coef <= 1:
            raise UsageError("--mixup-coef must lie in [0, 1]")
    if (d.dp_noise is not None) and not d.dp_clip:
        raise UsageError("--dp-noise needs --dp-clip (DP-SGD clips before adding noise)")
    if d.dp_clip is not None and d.dp_clip <= 0:
        raise UsageError("--dp-clip must be positive")
    if d.prune is not None and not 0 <= d.prune < 1:
        raise UsageError("--prune must be a fraction in [0, 1)")
    if config.send not in (None, "gradient", "delta"):
        raise UsageError("--send must be gradient or delta")
    if config.send == "gradient" and t.steps > 1:
        raise UsageError("a gradient is one step: use --send delta (the default) for --steps > 1")


# --------------------------------------------------------------------------- samples


def choose_samples(source, count: int, choice: SampleChoice, rng: np.random.Generator) -> np.ndarray:
    """Item indices of the client's ``count`` samples."""
    labels = np.asarray(source.labels)
    n_items = len(labels)
    if choice.indices is not None:
        indices = np.asarray(list(choice.indices), dtype=np.int64)
        if len(indices) != count:
            raise UsageError(f"--indices gives {len(indices)} items; the update uses B x m = {count}")
        if indices.min() < 0 or indices.max() >= n_items:
            raise UsageError(f"--indices must lie in [0, {n_items - 1}]")
        return indices
    if choice.classes is not None:
        classes = np.asarray(list(choice.classes), dtype=np.int64)
        present = set(np.unique(labels).tolist())
        absent = [int(c) for c in classes if int(c) not in present]
        if absent:
            raise UsageError(f"the data has no items of class(es) {absent}")
        wanted = classes if len(classes) == count else rng.choice(classes, size=count)
        return _items_of_classes(labels, wanted, rng)
    if choice.dirichlet_alpha is not None:
        if not choice.dirichlet_alpha > 0 or choice.dirichlet_alpha == float("inf"):  # NaN fails "> 0"
            raise UsageError("--dirichlet ALPHA must be positive")
        classes = np.unique(labels)
        mix = rng.dirichlet(np.full(len(classes), choice.dirichlet_alpha))
        return _items_of_classes(labels, rng.choice(classes, size=count, p=mix), rng)
    if count > n_items:
        raise UsageError(f"B x m = {count} samples asked for, but the data holds only {n_items}")
    return rng.choice(n_items, size=count, replace=False)


def _items_of_classes(labels: np.ndarray, wanted: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One item per entry of ``wanted``, without repeats while a class has items left."""
    chosen = np.empty(len(wanted), dtype=np.int64)
    pools: dict[int, list[int]] = {}
    for position, cls in enumerate(wanted.tolist()):
        pool = pools.get(cls)
        if not pool:
            pool = pools[cls] = rng.permutation(np.flatnonzero(labels == cls)).tolist()
        chosen[position] = pool.pop()
    return chosen


# --------------------------------------------------------------------------- labels


@dataclass
class LabelledSamples:
    images: torch.Tensor  # N x C x H x W in [0, 1] (mixed images for mixup)
    labels: torch.Tensor  # N x K soft labels
    targets: torch.Tensor  # N x 2 class ids
    mix_coef: torch.Tensor  # N
    label_smoothing: torch.Tensor  # N


def apply_label_family(source, indices: np.ndarray, loss: LossSpec, num_classes: int,
                       rng: np.random.Generator) -> LabelledSamples:
    """Images and soft labels y of the configured family (methods.md section 0)."""
    classes = np.asarray(source.labels)[indices]
    if classes.max() >= num_classes:
        raise UsageError(f"the data has class {int(classes.max())} but the model has only {num_classes} classes")
    n = len(indices)
    images = source.images(indices.tolist()).to(torch.float64)
    eye = torch.eye(num_classes, dtype=torch.float64)
    targets = torch.as_tensor(np.stack([classes, classes], axis=1), dtype=torch.int64)
    mix_coef = torch.zeros(n, dtype=torch.float64)
    eps = torch.zeros(n, dtype=torch.float64)
    labels = eye[targets[:, 0]]
    if loss.family == "smoothing":
        lo, hi = loss.label_smoothing_range or (loss.label_smoothing, loss.label_smoothing)
        eps = torch.as_tensor(rng.uniform(lo, hi, size=n) if hi > lo else np.full(n, lo), dtype=torch.float64)
        labels = smooth_labels(labels, eps)
    elif loss.family == "mixup":
        all_labels = np.asarray(source.labels)
        partners = np.empty(n, dtype=np.int64)
        for i, cls in enumerate(classes):
            others = np.flatnonzero(all_labels != cls)
            if len(others) == 0:
                raise UsageError("mixup needs images of at least two different classes in the data")
            partners[i] = rng.choice(others)
        partner_classes = all_labels[partners]
        if partner_classes.max() >= num_classes:
            raise UsageError(f"the data has class {int(partner_classes.max())} but the model has {num_classes}")
        if loss.mixup_coef is not None:
            coef = np.full(n, loss.mixup_coef)
        else:
            coef = rng.beta(loss.mixup_alpha, loss.mixup_alpha, size=n)
        mix_coef = torch.as_tensor(coef, dtype=torch.float64)
        partner_images = source.images(partners.tolist()).to(torch.float64)
        c = mix_coef.view(n, 1, 1, 1)
        images = (1 - c) * images + c * partner_images
        targets[:, 1] = torch.as_tensor(partner_classes)
        labels = (1 - mix_coef)[:, None] * eye[targets[:, 0]] + mix_coef[:, None] * eye[targets[:, 1]]
    return LabelledSamples(images, labels, targets, mix_coef, eps)


# --------------------------------------------------------------------------- training


def _batch_gradient(model, params, inputs, labels, defence: DefenceSpec, generator: torch.Generator):
    """The gradient of the mean batch loss, with DP-SGD clipping and noise if asked (zero
    for a parameter the loss does not reach, a user model's unused head, say).
    Returns (gradients, last-layer features of the batch)."""
    from gitool.models import forward_with_features

    if not defence.dp_clip:
        logits, features = forward_with_features(model, inputs)
        grads = torch.autograd.grad(soft_cross_entropy(logits, labels), params, materialize_grads=True)
        return list(grads), features.detach()
    # DP-SGD: clip each sample's gradient to norm C, sum, add N(0, (sigma C)^2), divide by B.
    total = [torch.zeros_like(p) for p in params]
    features = []
    for i in range(inputs.shape[0]):
        logits, feature = forward_with_features(model, inputs[i : i + 1])
        grads = torch.autograd.grad(soft_cross_entropy(logits, labels[i : i + 1]), params, materialize_grads=True)
        norm = torch.sqrt(sum((g.to(torch.float64) ** 2).sum() for g in grads))
        scale = min(1.0, defence.dp_clip / (float(norm) + 1e-12))
        for acc, g in zip(total, grads):
            acc.add_(g, alpha=scale)
        features.append(feature.detach())
    sigma = (defence.dp_noise or 0.0) * defence.dp_clip
    for acc in total:
        if sigma > 0:
            noise = torch.randn(acc.shape, generator=generator, dtype=torch.float64).to(acc.dtype)
            acc.add_(noise, alpha=sigma)
        acc.div_(inputs.shape[0])
    return total, torch.cat(features)


def prune_smallest(tensor: torch.Tensor, fraction: float) -> torch.Tensor:
    """Zero the ``fraction`` of entries with the smallest magnitude (top-k pruning)."""
    k = int(round(fraction * tensor.numel()))
    if k <= 0:
        return tensor.clone()
    flat = tensor.flatten().clone()
    flat[torch.argsort(flat.abs())[:k]] = 0
    return flat.view_as(tensor)


@dataclass
class LocalTraining:
    values: dict[str, torch.Tensor]
    features: torch.Tensor
    step_of_sample: torch.Tensor


def local_training(model, inputs: torch.Tensor, labels: torch.Tensor, training: TrainingSpec,
                   defence: DefenceSpec, send: str, generator: torch.Generator,
                   before_step: Callable[[int], None] | None = None) -> LocalTraining:
    """Run the client's local training on ``inputs`` (N = B x m rows, in step order) and
    return what it sends: the gradient (one step) or theta_after - theta_before.
    ``before_step(t)`` is called with the model at theta_t, before step t (benchmarks
    use it to look at the intermediate models the server never sees)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    params = [p for _, p in named]
    theta_global = [p.detach().clone() for p in params]
    velocity = [torch.zeros_like(p) for p in params]
    model.train(training.model_mode == "train")
    b = training.batch_size
    all_features, steps = [], []
    sent: dict[str, torch.Tensor] = {}
    for t in range(training.steps):
        if before_step is not None:
            before_step(t)
        batch = slice(t * b, (t + 1) * b)
        grads, features = _batch_gradient(model, params, inputs[batch], labels[batch], defence, generator)
        all_features.append(features)
        steps.append(torch.full((features.shape[0],), t, dtype=torch.int64))
        if send == "gradient":
            sent = {n: g.detach().clone() for n, g in zip(names, grads)}
            break
        with torch.no_grad():
            for p, g, v, p0 in zip(params, grads, velocity, theta_global):
                direction = g.clone()
                if training.optimizer == "fedprox":
                    direction.add_(p - p0, alpha=training.prox_mu)
                if training.weight_decay:
                    direction.add_(p, alpha=training.weight_decay)
                if training.optimizer == "momentum":
                    v.mul_(training.momentum).add_(direction)
                    direction = v
                p.sub_(direction, alpha=training.lr)
    if send == "delta":
        with torch.no_grad():
            sent = {n: (p.detach() - p0) for n, p, p0 in zip(names, params, theta_global)}
            for p, p0 in zip(params, theta_global):  # leave the model as the server sent it
                p.copy_(p0)
    if defence.prune:
        sent = {n: prune_smallest(v, defence.prune) for n, v in sent.items()}
    return LocalTraining(sent, torch.cat(all_features), torch.cat(steps))


# --------------------------------------------------------------------------- capture


def capture(source, model_spec, config: CaptureConfig, *, init_state: dict[str, torch.Tensor] | None = None,
            provenance: dict[str, Any] | None = None) -> tuple[Update, Truth]:
    """Simulate one client round on ``source`` with the model of ``model_spec``.

    ``init_state`` (from a checkpoint) replaces the ``config.init`` initialisation."""
    from gitool.files import load_state
    from gitool.models import build_model, init_parameters

    num_classes = model_spec.num_classes
    validate(config, num_classes)
    training = config.training
    send = config.send or ("gradient" if training.steps == 1 else "delta")
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    dtype = DTYPES[training.dtype]

    torch.manual_seed(config.seed)  # 'default' init draws from the global generator
    model = build_model(model_spec)
    if init_state is not None:
        load_state(model, init_state, what="checkpoint weights")
    else:
        init_parameters(model, config.init, generator)
    model = model.to(dtype=dtype)
    global_state = {n: t.detach().clone() for n, t in model.state_dict().items()}

    input_spec = config.input or InputSpec(shape=tuple(model_spec.input_shape))
    indices = choose_samples(source, training.num_samples, config.choice, rng)
    samples = apply_label_family(source, indices, config.loss, num_classes, rng)
    inputs = input_spec.normalize(samples.images)

    device = torch.device(config.device)
    model = model.to(device)
    try:
        result = local_training(model, inputs.to(device=device, dtype=dtype),
                                samples.labels.to(device=device, dtype=dtype), training, config.defence, send,
                                generator)
    except ValueError as exc:
        if "more than 1 value per channel" not in str(exc):
            raise
        # batch norm in train mode normalises over the batch and the spatial positions
        raise UsageError("batch norm in train mode needs more than one value per channel: use --mode eval, a "
                         "larger --batch-size or a larger --image-size") from None
    values = {n: v.cpu() for n, v in result.values.items()}
    if all(float(v.abs().max()) == 0 for v in values.values()):
        raise GitoolError("the client's update is exactly zero (nothing to send); check the learning rate and data")
    diverged = [n for n, v in values.items() if not torch.isfinite(v).all()]
    if diverged:
        raise GitoolError(f"the client's training diverged: {', '.join(diverged[:4])} hold NaN or infinite values; "
                          "lower the learning rate")

    counts = torch.bincount(samples.labels.argmax(dim=1), minlength=num_classes)
    provenance = {
        "gitool_version": __version__,
        "seed": config.seed,
        "init": config.init,
        **(provenance or {}),
    }
    update = Update(model=model_spec, input=input_spec, loss=config.loss, training=training,
                    defence=config.defence, kind=send, global_state=global_state, values=values,
                    provenance=provenance)
    truth = Truth(
        images=samples.images.to(dtype),
        inputs=inputs.to(dtype),
        labels=samples.labels.to(dtype),
        targets=samples.targets,
        mix_coef=samples.mix_coef,
        label_smoothing=samples.label_smoothing,
        features=result.features.cpu().to(dtype),
        counts=counts,
        step=result.step_of_sample,
        meta={"indices": indices.tolist(), "seed": config.seed, "data": provenance.get("data"),
              "family": config.loss.family, "update_kind": send},
    )
    return update, truth
