"""Tests for the data sources: shapes, value range, labels, loaders and their failures."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gitool.data import DATA_SOURCES, describe_sources, load_restricted_pickle, open_source
from gitool.errors import GitoolError, UsageError


def check_batch(images: torch.Tensor, count: int, shape: tuple[int, int, int]) -> None:
    assert images.shape == (count, *shape)
    assert images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0


def check_labels(source) -> None:
    assert source.labels.dtype == np.int64 and len(source.labels) == len(source)
    assert source.labels.min() >= 0 and source.labels.max() < source.num_classes


# --------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 32, 32), (3, 64, 48), (3, 224, 224)])
def test_synthetic_shapes(shape):
    source = open_source("synthetic:2", shape)
    assert len(source) == 20 and source.num_classes == 10
    check_batch(source.images([0, 5, 19]), 3, shape)
    check_labels(source)


def test_synthetic_defaults_and_class_count():
    assert len(open_source("synthetic", (3, 32, 32))) == 640
    source = open_source("synthetic:3", (3, 16, 16), num_classes=100)
    assert len(source) == 300 and source.num_classes == 100
    check_labels(source)


def test_synthetic_is_deterministic_by_seed():
    first = open_source("synthetic", (3, 32, 32), seed=1).images([3, 7])
    again = open_source("synthetic", (3, 32, 32), seed=1).images([3, 7])
    other = open_source("synthetic", (3, 32, 32), seed=2).images([3, 7])
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_synthetic_images_vary_within_and_differ_across_classes():
    source = open_source("synthetic:20", (3, 32, 32))
    images = source.images(range(len(source)))
    labels = torch.from_numpy(source.labels)
    means = torch.stack([images[labels == c].mean(dim=0) for c in range(10)])
    within = torch.stack([(images[labels == c] - means[c]).pow(2).mean() for c in range(10)]).mean()
    between = (means[:, None] - means[None, :]).pow(2).mean(dim=(2, 3, 4))
    assert within > 1e-3  # no two images of a class are alike
    assert between[~torch.eye(10, dtype=torch.bool)].min() > 1e-3  # every pair of classes looks different
    # Class colour is a strong, learnable signal: the nearest class mean is usually right.
    nearest = ((images[:, None] - means[None]).pow(2).mean(dim=(2, 3, 4))).argmin(dim=1)
    assert (nearest == labels).float().mean() > 0.5


def test_synthetic_bad_argument():
    with pytest.raises(UsageError, match="positive integer"):
        open_source("synthetic:many", (3, 32, 32))


# --------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------


def test_digits_resized_and_replicated():
    pytest.importorskip("sklearn")
    source = open_source("digits", (3, 32, 32))
    assert len(source) == 1797 and source.num_classes == 10
    check_labels(source)
    images = source.images([0, 1])
    check_batch(images, 2, (3, 32, 32))
    assert torch.equal(images[:, 0], images[:, 2])  # gray replicated to colour
    assert images.max() == 1.0  # 16 is the brightest stored value
    native = open_source("digits", (1, 8, 8)).images([0])[0, 0]
    from sklearn.datasets import load_digits

    assert torch.allclose(native, torch.from_numpy(load_digits().images[0]).float() / 16)


# --------------------------------------------------------------------------------------
# photos
# --------------------------------------------------------------------------------------


def test_photos_are_seeded_crops_of_ten_shipped_photographs():
    pytest.importorskip("skimage")
    source = open_source("photos:3", (3, 24, 24), num_classes=10)
    assert len(source) == 30 and source.num_classes == 10
    assert source.class_names[:2] == ["astronaut", "chelsea"]
    check_labels(source)
    images = source.images(range(30))
    check_batch(images, 30, (3, 24, 24))
    assert torch.equal(images, open_source("photos:3", (3, 24, 24), seed=0).images(range(30)))
    assert not torch.allclose(images[:5], open_source("photos:3", (3, 24, 24), seed=1).images(range(5)))
    assert source.labels[:10].tolist() == list(range(10))  # the first K items hold K classes
    # Crops of one photograph differ (place, scale, flip, jitter), crops of the Hubble deep
    # field (class 5) are darker than the cat's (class 1) on average.
    assert (images[0] - images[10]).abs().mean() > 0.02
    assert images[5::10].mean() < images[1::10].mean()
    gray = open_source("photos:2", (1, 16, 16)).images([0, 1])
    check_batch(gray, 2, (1, 16, 16))


def test_photos_is_learnable_by_the_nearest_class_mean_only_in_part():
    """Colour alone tells the classes apart only in part (jitter hides it): the nearest
    class-mean colour histogram is right for far fewer than all crops, yet far above chance."""
    pytest.importorskip("skimage")
    source = open_source("photos:30", (3, 16, 16), seed=3)
    images = source.images(range(len(source)))
    labels = torch.from_numpy(source.labels)
    colour = images.mean(dim=(2, 3))
    means = torch.stack([colour[labels == c].mean(dim=0) for c in range(10)])
    nearest = (colour[:, None] - means[None]).pow(2).sum(-1).argmin(dim=1)
    accuracy = float((nearest == labels).float().mean())
    assert 0.2 < accuracy < 0.8, accuracy


def test_photos_without_scikit_image_is_one_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else real(name, *a))
    with pytest.raises(GitoolError, match=r"needs scikit-image .*pip install 'gitool\[photos\]'"):
        open_source("photos", (3, 32, 32))
    with pytest.raises(UsageError, match="positive integer"):
        open_source("photos:0", (3, 32, 32))


# --------------------------------------------------------------------------------------
# image folders and samples
# --------------------------------------------------------------------------------------


def write_folder(root: Path) -> None:
    """Two classes: a red non-square PNG, a gray JPEG and a blue BMP."""
    (root / "b_second").mkdir(parents=True)
    (root / "a_first").mkdir()
    red = np.zeros((20, 40, 3), np.uint8)
    red[..., 0] = 200
    Image.fromarray(red).save(root / "a_first" / "red.png")
    Image.fromarray(np.full((16, 16), 100, np.uint8), "L").save(root / "a_first" / "gray.jpg")
    blue = np.zeros((10, 10, 3), np.uint8)
    blue[..., 2] = 255
    Image.fromarray(blue).save(root / "b_second" / "blue.bmp")
    (root / "b_second" / "notes.txt").write_text("not an image")


def test_folder_loader(tmp_path):
    write_folder(tmp_path)
    source = open_source(f"folder:{tmp_path}", (3, 8, 8))
    assert source.class_names == ["a_first", "b_second"]
    assert list(source.labels) == [0, 0, 1]  # gray.jpg sorts before red.png
    images = source.images([0, 1, 2])
    check_batch(images, 3, (3, 8, 8))
    assert torch.allclose(images[1, :, 4, 4], torch.tensor([200 / 255, 0, 0]), atol=1e-6)
    assert torch.allclose(images[2, 2], torch.ones(8, 8))
    gray = open_source(f"folder:{tmp_path}", (1, 8, 8)).images([1])
    assert torch.allclose(gray, torch.full((1, 1, 8, 8), 0.299 * 200 / 255), atol=1e-6)


def test_folder_corrupt_image_names_the_file(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "b_second" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    source = open_source(f"folder:{tmp_path}", (3, 8, 8))
    index = [p.name for p in source.files].index("broken.png")
    with pytest.raises(GitoolError, match="broken.png"):
        source.images([index])


def test_folder_empty_or_missing(tmp_path):
    with pytest.raises(GitoolError, match="no images"):
        open_source(f"folder:{tmp_path}", (3, 8, 8))
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(GitoolError, match="no images"):
        open_source(f"folder:{tmp_path}", (3, 8, 8))
    with pytest.raises(GitoolError, match="not found"):
        open_source(f"folder:{tmp_path / 'nowhere'}", (3, 8, 8))
    with pytest.raises(UsageError, match="needs a path"):
        open_source("folder", (3, 8, 8))


def test_samples_are_shipped_and_readable():
    source = open_source("samples", (3, 64, 64))
    assert source.num_classes == 10 and len(source) == 30
    check_labels(source)
    check_batch(source.images(range(len(source))), 30, (3, 64, 64))


def test_samples_folder_can_be_overridden(tmp_path, monkeypatch):
    write_folder(tmp_path)
    monkeypatch.setenv("GITOOL_SAMPLES", str(tmp_path))
    assert open_source("samples", (3, 8, 8)).class_names == ["a_first", "b_second"]


# --------------------------------------------------------------------------------------
# CIFAR python batches
# --------------------------------------------------------------------------------------


def fake_cifar_batch(count: int, num_classes: int, label_key: bytes, start: int) -> dict:
    """A batch in the official layout: uint8 rows of 3072 values (R plane, G plane, B plane)."""
    data = np.zeros((count, 3072), np.uint8)
    data[:, :1024] = 255  # every image pure red
    data[:, 2048:] = np.arange(start, start + count, dtype=np.uint8)[:, None]  # blue tags the image
    labels = [(start + i) % num_classes for i in range(count)]
    return {b"batch_label": b"fake", label_key: labels, b"data": data, b"filenames": [b"x.png"] * count}


def write_pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)


def test_cifar10_loader(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        write_pickle(folder / f"data_batch_{i}", fake_cifar_batch(2, 10, b"labels", 2 * (i - 1)))
    write_pickle(folder / "test_batch", fake_cifar_batch(3, 10, b"labels", 100))
    names = [n.encode() for n in "plane car bird cat deer dog frog horse ship truck".split()]
    write_pickle(folder / "batches.meta", {b"label_names": names})

    train = open_source(f"cifar10:{tmp_path}", (3, 32, 32))  # the parent folder is found too
    assert len(train) == 10 and train.num_classes == 10 and train.class_names[1] == "car"
    check_labels(train)
    images = train.images([0, 9])
    check_batch(images, 2, (3, 32, 32))
    assert torch.all(images[:, 0] == 1.0) and torch.all(images[:, 1] == 0.0)
    assert images[1, 2, 0, 0] == pytest.approx(9 / 255)

    test = open_source(f"cifar10:{folder}:test", (1, 16, 16))
    assert len(test) == 3
    check_batch(test.images([2]), 1, (1, 16, 16))


def test_cifar100_loader(tmp_path):
    for split, start in (("train", 0), ("test", 50)):
        write_pickle(tmp_path / split, fake_cifar_batch(4, 100, b"fine_labels", start))
    source = open_source(f"cifar100:{tmp_path}", (3, 8, 8), num_classes=100)
    assert source.num_classes == 100 and list(source.labels) == [0, 1, 2, 3]
    check_batch(source.images([0, 3]), 2, (3, 8, 8))
    with pytest.raises(UsageError, match="100 classes"):
        open_source(f"cifar100:{tmp_path}", (3, 8, 8), num_classes=10)


def test_cifar_missing_or_garbled_files(tmp_path):
    with pytest.raises(GitoolError, match="data_batch_1"):
        open_source(f"cifar10:{tmp_path}", (3, 32, 32))
    (tmp_path / "train").write_bytes(b"garbage, not a pickle")
    (tmp_path / "test").write_bytes(b"")
    with pytest.raises(GitoolError, match="not a readable CIFAR file"):
        open_source(f"cifar100:{tmp_path}", (3, 32, 32))
    write_pickle(tmp_path / "train", {b"data": np.zeros((2, 10), np.uint8), b"fine_labels": [0, 1]})
    with pytest.raises(GitoolError, match="shape"):
        open_source(f"cifar100:{tmp_path}", (3, 32, 32))


class RunsAShellCommand:
    """Unpickling this calls os.system: what a malicious "dataset" file would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar"
    folder.mkdir()
    batch = fake_cifar_batch(2, 10, b"labels", 0)
    batch[b"batch_label"] = RunsAShellCommand(f"touch {marker}")
    write_pickle(folder / "data_batch_1", batch)
    for i in range(2, 6):
        write_pickle(folder / f"data_batch_{i}", fake_cifar_batch(2, 10, b"labels", 0))
    with pytest.raises(GitoolError, match="refusing to load .*system"):
        open_source(f"cifar10:{folder}", (3, 32, 32))
    with pytest.raises(GitoolError, match="refusing to load"):
        load_restricted_pickle(folder / "data_batch_1")
    assert not marker.exists()


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------


def test_unknown_source_lists_the_valid_ones():
    with pytest.raises(UsageError) as error:
        open_source("imagenet", (3, 32, 32))
    for name in DATA_SOURCES:
        assert name in str(error.value)


def test_impossible_requests():
    with pytest.raises(UsageError, match="1 or 3 channels"):
        open_source("synthetic", (4, 32, 32))
    with pytest.raises(UsageError, match="takes no argument"):
        open_source("digits:extra", (3, 32, 32))
    source = open_source("synthetic:1", (3, 8, 8))
    with pytest.raises(UsageError, match="out of range"):
        source.images([10])


def test_describe_sources():
    rows = describe_sources()
    assert [name for name, _ in rows] == list(DATA_SOURCES)
    assert all(description for _, description in rows)
