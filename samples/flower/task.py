"""What the sample federation's server and clients share: the model, the data, and how
Flower's parameter lists map onto the model (the ``task.py`` of Flower's own examples).

The model is gitool's LeNet (ReLU) on 3 x 32 x 32 images of 10 classes. Each client holds
a private partition of gitool's bundled ``synthetic`` images (seed 1): a Dirichlet(alpha)
class mix drawn from items no other client holds. The server's auxiliary data for the
attack (``gitool labels --aux synthetic``) are other draws of the same distribution
(seed 0), never the clients' images.
"""

from __future__ import annotations

import numpy as np
import torch

from gitool.data import open_source
from gitool.models import ModelSpec, build_model

MODEL = ModelSpec(name="lenet", num_classes=10, input_shape=(3, 32, 32), activation="relu")
DATA = "synthetic"
DATA_SEED = 1


def new_model() -> torch.nn.Module:
    return build_model(MODEL)


def get_weights(net: torch.nn.Module) -> list[np.ndarray]:
    """The model as Flower sends it: a NumPy list in ``state_dict()`` order."""
    return [value.detach().cpu().numpy() for value in net.state_dict().values()]


def set_weights(net: torch.nn.Module, arrays: list[np.ndarray]) -> None:
    state = net.state_dict()
    if len(arrays) != len(state):
        raise ValueError(f"{len(arrays)} arrays for a model of {len(state)} state_dict entries")
    net.load_state_dict({name: torch.from_numpy(np.array(array)) for name, array in zip(state, arrays)})


def partition(client: int, clients: int, size: int, alpha: float, seed: int) -> tuple[np.ndarray, object]:
    """Item indices of client ``client``'s private samples and the data source.

    Items of class c are c, c + K, c + 2K, ...; client i may take the j-th of them when
    j % clients == i, so partitions never overlap. The class of each of the ``size``
    samples is drawn from a Dirichlet(alpha) mix over the K classes (non-IID)."""
    source = open_source(DATA, MODEL.input_shape, num_classes=MODEL.num_classes, seed=DATA_SEED)
    labels = np.asarray(source.labels)
    k = MODEL.num_classes
    rng = np.random.default_rng([seed, client])
    mix = rng.dirichlet(np.full(k, alpha))
    wanted = rng.choice(k, size=size, p=mix)
    pools = {c: [int(i) for i in np.flatnonzero(labels == c) if (i // k) % clients == client] for c in range(k)}
    for pool in pools.values():
        rng.shuffle(pool)
    items = []
    for c in wanted:
        if not pools[int(c)]:
            raise ValueError(f"client {client}: no items of class {c} left; lower --samples")
        items.append(pools[int(c)].pop())
    return np.asarray(items, dtype=np.int64), source
