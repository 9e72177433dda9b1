"""A truth file from the client's own private batch (``gitool truth``).

A capture writes its truth itself. An update imported from another training loop has
none: the user holds the private samples as tensors. This module reads them from a file
(``torch.save({"images": images, "labels": labels}, "private.pt")``, or the same names in
``.safetensors`` or ``.npz``), checks them against the update (N = B x m samples in step
order, the input shape, K classes, the label family) and makes the truth ``gitool score``
compares results with.

The last-layer features of the truth are those at the moment each sample was used, so
the client's local training is replayed from the global weights with the update's facts
(gitool.capture.local_training, the same simulation ``capture`` runs). The replay also
checks the samples: it must give back the update, up to the precision of its numbers. A
replay that does not (samples out of step order, a wrong fact, DP noise) is reported as
its relative error, in the file and on screen; scores against such a truth are about
other data than the update's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import torch

from gitool.errors import GitoolError, UsageError
from gitool.facts import require_facts, unknown_facts

KEYS = ("images", "inputs", "labels")
LABEL_TOLERANCE = 1e-5  # soft-label rows must sum to 1 within this
IMAGE_TOLERANCE = 1e-6  # images in [0, 1] within this


@dataclass
class PrivateBatch:
    """The samples of one client round in step order: images in [0, 1], the inputs the
    model saw, the soft labels trained on (N x K) and their classes."""

    images: torch.Tensor
    inputs: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor  # N x 2: the dominant class and the mixup partner (equal otherwise)
    mix_coef: torch.Tensor
    label_smoothing: torch.Tensor


# ----------------------------------------------------------------------------- reading


def read_private_file(path: str | Path, budget: int) -> dict[str, torch.Tensor]:
    """The named tensors of a private-batch file (.pt/.pth weights-only, .safetensors or
    .npz without pickles), refused unread when they would take more than ``budget`` bytes."""
    from gitool.files import existing_file, read_npz_arrays, read_torch_object

    path = existing_file(path, "a private-batch file")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        found = read_torch_object(path, budget=budget)
    elif suffix == ".safetensors":
        from gitool.codec import TensorFile

        with TensorFile(path, "a private-batch file") as handle:
            total = sum(entry.nbytes for entry in handle.entries.values())
            if total > budget:
                raise GitoolError(f"{path}: its tensors take {total} bytes, more than this update's samples could "
                                  f"need ({budget}); refused unread")
            unknown = sorted(set(handle.entries) - set(KEYS))
            if unknown:
                raise GitoolError(f"{path}: unexpected tensor(s) {', '.join(n[:40] for n in unknown[:4])}; "
                                  f"expected {', '.join(KEYS)}")
            found = {name: handle.read(name) for name in handle.entries}
    elif suffix == ".npz":
        found = {name: torch.from_numpy(array) for name, array in read_npz_arrays(path, budget, len(KEYS)).items()}
    else:
        raise UsageError(f"{path}: unknown format; save the batch with torch.save (.pt), safetensors or np.savez")
    if not isinstance(found, dict) or not all(isinstance(value, torch.Tensor) for value in found.values()):
        raise GitoolError(f"{path}: expected a dictionary of tensors, e.g. torch.save({{'images': images, "
                          "'labels': labels}}, path)")
    unknown = sorted(str(key)[:40] for key in set(found) - set(KEYS))
    if unknown:
        raise GitoolError(f"{path}: unexpected entries {', '.join(unknown[:4])}; expected images (in [0, 1]) or "
                          "inputs (what the model saw), and labels")
    return {str(key): value for key, value in found.items()}


def private_batch(update, tensors: dict[str, torch.Tensor], where: str) -> PrivateBatch:
    """Check the tensors against the update and complete them: inputs from images (or
    images from inputs) by the update's normalisation, soft labels from classes by its
    label family."""
    n, k = update.num_samples, update.model.num_classes
    shape = tuple(update.input.shape)
    given = [key for key in ("images", "inputs") if key in tensors]
    if len(given) != 1:
        raise GitoolError(f"{where}: give exactly one of 'images' (in [0, 1]) or 'inputs' (what the model saw), "
                          f"found {', '.join(given) or 'neither'}")
    if "labels" not in tensors:
        raise GitoolError(f"{where}: no 'labels' (N class indices or N x K soft labels)")
    x = tensors[given[0]]
    if not x.is_floating_point() or tuple(x.shape) != (n, *shape):
        raise GitoolError(f"{where}: '{given[0]}' is {_described(x)}, expected floats of {n} x "
                          f"{' x '.join(map(str, shape))} (B x m = {update.training.batch_size} x "
                          f"{update.training.steps} samples in step order)")
    x = x.to(torch.float64)
    if not torch.isfinite(x).all():
        raise GitoolError(f"{where}: '{given[0]}' holds NaN or infinite values")
    if given[0] == "images":
        if float(x.min()) < -IMAGE_TOLERANCE or float(x.max()) > 1 + IMAGE_TOLERANCE:
            raise GitoolError(f"{where}: 'images' range over [{float(x.min()):.3g}, {float(x.max()):.3g}], not "
                              "[0, 1]; save what the model saw as 'inputs' instead")
        images, inputs = x.clamp(0, 1), update.input.normalize(x)
    else:
        inputs, images = x, update.input.denormalize(x).clamp(0, 1)
    labels, targets, mix_coef, smoothing = _labels(update, tensors["labels"], n, k, where)
    return PrivateBatch(images, inputs, labels, targets, mix_coef, smoothing)


def _labels(update, labels: torch.Tensor, n: int, k: int, where: str):
    """Soft labels (N x K), classes (N x 2), mixup coefficients and smoothing factors."""
    eye = torch.eye(k, dtype=torch.float64)
    if not labels.is_floating_point():
        if tuple(labels.shape) != (n,) or labels.dtype == torch.bool:
            raise GitoolError(f"{where}: 'labels' is {_described(labels)}, expected {n} class indices or {n} x {k} "
                              "soft labels")
        classes = labels.to(torch.int64)
        if int(classes.min()) < 0 or int(classes.max()) >= k:
            raise GitoolError(f"{where}: 'labels' holds classes outside 0..{k - 1}")
        require_facts(update, ["loss_family"], for_method="gitool truth with class indices as labels")
        loss = update.loss
        eps = torch.zeros(n, dtype=torch.float64)
        if loss.family == "smoothing" and loss.label_smoothing is not None:
            eps[:] = loss.label_smoothing
        elif loss.family != "hard":
            raise GitoolError(f"{where}: the client trained with {loss.family} labels that class indices cannot "
                              f"describe; save the N x K soft labels it trained on")
        soft = (1 - eps)[:, None] * eye[classes] + eps[:, None] / k
        return soft, torch.stack([classes, classes], dim=1), torch.zeros(n, dtype=torch.float64), eps
    if tuple(labels.shape) != (n, k):
        raise GitoolError(f"{where}: 'labels' is {_described(labels)}, expected {n} x {k} soft labels or {n} class "
                          "indices")
    soft = labels.to(torch.float64)
    if not torch.isfinite(soft).all() or float(soft.min()) < 0 or \
            float((soft.sum(dim=1) - 1).abs().max()) > LABEL_TOLERANCE:
        raise GitoolError(f"{where}: soft 'labels' must be finite, non-negative rows that sum to 1")
    top = soft.topk(min(2, k), dim=1)
    first = top.indices[:, 0]
    family = None if "loss_family" in unknown_facts(update) else update.loss.family
    if family == "mixup":
        second = torch.where(top.values[:, 1] > 0, top.indices[:, 1], first)
        coef = torch.where(second != first, top.values[:, 1], torch.zeros(n, dtype=torch.float64))
        return soft, torch.stack([first, second], dim=1), coef, torch.zeros(n, dtype=torch.float64)
    # smoothing: y = (1 - eps) e_a + eps / K, so the largest entry is 1 - eps (K - 1) / K
    eps = ((1 - top.values[:, 0]) * k / (k - 1)).clamp(min=0) if family == "smoothing" else \
        torch.zeros(n, dtype=torch.float64)
    return soft, torch.stack([first, first], dim=1), torch.zeros(n, dtype=torch.float64), eps


def _described(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).replace('torch.', '')} of shape {' x '.join(map(str, tensor.shape)) or 'scalar'}"


# ----------------------------------------------------------------------------- the truth


def replay_facts(update) -> list[str]:
    """The facts a replay of the client's local training needs."""
    return ["batch_size", "steps", "model_mode"] + (["lr", "optimizer", "weight_decay"]
                                                    if update.kind == "delta" else [])


def truth_from_private_batch(update, path: str | Path, device: str = "cpu"):
    """The truth of ``update`` from the private-batch file ``path``, and the relative
    error with which replaying the client's local training on it gives back the update."""
    from gitool.capture import local_training
    from gitool.files import Truth, file_sha256
    from gitool.specs import DefenceSpec

    require_facts(update, replay_facts(update), for_method="gitool truth (it replays the client's local training)")
    n, k = update.num_samples, update.model.num_classes
    budget = n * (update.input.numel + k) * 8 + (1 << 20)
    batch = private_batch(update, read_private_file(path, budget), str(path))

    dtype = torch.float64 if update.training.dtype == "float64" else torch.float32
    model = update.build_model(dtype=dtype, device=device)
    defence = DefenceSpec() if "defence" in unknown_facts(update) else \
        DefenceSpec(dp_clip=update.defence.dp_clip, prune=update.defence.prune)  # noise cannot be replayed
    replay = local_training(model, batch.inputs.to(device=device, dtype=dtype),
                            batch.labels.to(device=device, dtype=dtype), update.training, defence, update.kind,
                            torch.Generator().manual_seed(0))
    error = relative_difference(replay.values, update.values)
    counts = torch.bincount(batch.targets[:, 0], minlength=k)
    truth = Truth(images=batch.images.to(dtype), inputs=batch.inputs.to(dtype), labels=batch.labels.to(dtype),
                  targets=batch.targets, mix_coef=batch.mix_coef, label_smoothing=batch.label_smoothing,
                  features=replay.features.detach().cpu().to(dtype), counts=counts, step=replay.step_of_sample,
                  meta={"indices": list(range(n)), "data": str(path), "family": update.loss.family,
                        "update_kind": update.kind, "private": {"path": str(path), "sha256": file_sha256(path)},
                        "replay_error": error})
    if update.path is not None:
        truth.meta["update"] = {"path": str(update.path), "sha256": update.sha256}
    return truth, error


def relative_difference(replayed: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]) -> float:
    """||replayed - sent|| / ||sent|| over all parameters, in float64."""
    squares, norm = 0.0, 0.0
    for name, value in sent.items():
        value = value.to(torch.float64)
        squares += float(((replayed[name].detach().cpu().to(torch.float64) - value) ** 2).sum())
        norm += float((value ** 2).sum())
    return (squares / max(norm, 1e-300)) ** 0.5


def replay_tolerance(update) -> float:
    """The replay error that the precision of the update's numbers explains (a few
    thousand epsilon: local training sums many rounded products)."""
    return 1e4 * torch.finfo(torch.float64 if update.training.dtype == "float64" else torch.float32).eps


def describe_replay(update, error: float) -> str:
    """One line on how well the private batch explains the update."""
    limit = replay_tolerance(update)
    if error <= limit:
        return f"the private batch replays the update to a relative error of {error:.1e}"
    return (f"warning: replaying the local training on the private batch gives the update only to a relative error "
            f"of {error:.1e} (round-off explains {limit:.0e}): are the samples in step order, and the facts right? "
            "Scores against this truth are about other data than the update's")
