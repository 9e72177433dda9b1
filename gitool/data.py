"""Data sources: where a simulated client's private images come from.

A source is chosen by one ``--data SPEC`` string (see :data:`DATA_SOURCES`):

- ``synthetic[:PER_CLASS]``: generated colour images with class structure, no files needed
- ``digits``: scikit-learn's bundled 8x8 handwritten digits
- ``photos[:PER_CLASS]``: random crops of the photographs scikit-image ships, one class per photograph
- ``samples``: the project's own small pictures in ``samples/images``
- ``folder:PATH``: a class-per-subfolder image folder
- ``cifar10:PATH[:test]`` / ``cifar100:PATH[:test]``: the official python batches

Every source hands out float32 images in [0, 1] at the requested (C, H, W), whatever
the stored size: images are scaled so they cover H x W, then center-cropped; colour
becomes gray by luminance and gray becomes colour by replication. Images are produced
or decoded only when asked for. Nothing is ever downloaded.
"""

from __future__ import annotations

import colorsys
import math
import os
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gitool.errors import GitoolError, UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# ITU-R BT.601 luma weights, the same as PIL's RGB -> L conversion.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

SAMPLES_ENV = "GITOOL_SAMPLES"
DEFAULT_SYNTHETIC_PER_CLASS = 64


# --------------------------------------------------------------------------------------
# The common interface
# --------------------------------------------------------------------------------------


class DataSource:
    """A labelled image collection, read lazily at a fixed image shape.

    Attributes: ``name`` (the ``--data`` spec that opened it), ``num_classes``,
    ``labels`` (int64 class of every item), ``class_names`` and ``image_shape``.
    Subclasses implement :meth:`_load`.
    """

    name: str
    num_classes: int
    labels: np.ndarray
    class_names: list[str]
    image_shape: tuple[int, int, int]

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, indices: Sequence[int]) -> torch.Tensor:
        """The images at ``indices`` as an (n, C, H, W) float32 tensor in [0, 1]."""
        wanted = [self._check_index(index) for index in indices]
        if not wanted:
            return torch.empty((0, *self.image_shape), dtype=torch.float32)
        return self._load(wanted).clamp(0.0, 1.0).to(torch.float32).contiguous()

    def _check_index(self, index: int) -> int:
        position = int(index)
        if not 0 <= position < len(self):
            raise UsageError(f"image index {position} is out of range for {self.name} ({len(self)} images)")
        return position

    def _load(self, indices: list[int]) -> torch.Tensor:
        """The images at valid ``indices``, shaped (n, C, H, W)."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------
# Shape conversion shared by every source
# --------------------------------------------------------------------------------------


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(n, c, h, w) images with c in {1, 3} turned into ``channels`` channels."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 3 and channels == 1:
        weights = torch.tensor(LUMA_WEIGHTS, dtype=images.dtype).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True)
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1)
    raise UsageError(f"cannot turn {have}-channel images into {channels} channels (use 1 or 3)")


def cover_and_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale (n, c, h, w) images so they cover height x width, then cut out the center.

    For a square target this scales the shorter side to the target size. Bilinear
    interpolation with antialiasing, so shrinking does not alias.
    """
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    scale = max(height / h, width / w)
    new_h = max(height, round(h * scale))
    new_w = max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top = (new_h - height) // 2
    left = (new_w - width) // 2
    return images[..., top : top + height, left : left + width]


def fit_to_shape(images: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """(n, c, h, w) images in [0, 1] at the requested (C, H, W)."""
    channels, height, width = image_shape
    return cover_and_crop(convert_channels(images, channels), height, width)


# --------------------------------------------------------------------------------------
# synthetic: generated images with class structure
# --------------------------------------------------------------------------------------


class SyntheticSource(DataSource):
    """Procedurally generated colour images, ``per_class`` per class, labels ``index % K``.

    A class is defined by a foreground hue and shape (ellipse, box or diamond), a
    background hue and a texture family (stripes, rings, checks or waves) with its own
    orientation and frequency. Each image draws its own shape position, size and
    rotation, texture phase, colour jitter, lighting and noise, so images differ within a
    class while a small CNN can still tell classes apart. The class look depends only on
    the class number; the image draws depend on (seed, index). Geometry lives in [-1, 1]
    coordinates, so the same picture is drawn at any resolution.

    Labels cycle (0, 1, ..., K-1, 0, ...) so the first B indices hold B different classes.
    """

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, per_class: int, seed: int, name: str):
        self.name = name
        self.image_shape = image_shape
        self.num_classes = num_classes
        self.class_names = [f"class{c}" for c in range(num_classes)]
        self.labels = np.arange(num_classes * per_class, dtype=np.int64) % num_classes
        self.seed = seed
        self._looks = [_class_look(c) for c in range(num_classes)]

    def _load(self, indices: list[int]) -> torch.Tensor:
        _, height, width = self.image_shape
        rgb = np.stack([self._draw(index, height, width) for index in indices])
        return convert_channels(torch.from_numpy(rgb), self.image_shape[0])

    def _draw(self, index: int, height: int, width: int) -> np.ndarray:
        """One (3, H, W) RGB image, a pure function of (seed, index)."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, index, 0x5EED])
        look = self._looks[int(self.labels[index])]
        ys, xs = _grid(height, width)
        background = _background(look, rng, ys, xs)
        mask, shading = _shape_mask(look, rng, ys, xs)
        hue = look.fg_hue + float(rng.normal(0.0, 0.02))
        foreground = _hsv(hue, look.fg_sat, look.fg_val) * shading
        image = background * (1.0 - mask) + foreground * mask
        image = image * float(rng.uniform(0.85, 1.1))  # overall exposure
        image = image + 0.06 * _smooth_noise(rng, height, width)
        image = image + 0.015 * rng.standard_normal(image.shape, dtype=np.float32)
        return np.clip(image, 0.0, 1.0, dtype=np.float32)


@dataclass(frozen=True)
class ClassLook:
    """The fixed appearance of one synthetic class (hues in [0, 1), angles in radians)."""

    fg_hue: float
    fg_sat: float
    fg_val: float
    bg_hue: float
    bg_sat: float
    bg_val: float
    texture: int  # 0 stripes, 1 rings, 2 checks, 3 waves
    shape: int  # 0 ellipse, 1 box, 2 diamond
    angle: float
    frequency: float  # texture cycles per unit length
    aspect: float  # height / width of the shape


def _class_look(label: int) -> ClassLook:
    """The look of class ``label``; independent of the seed, so classes mean the same everywhere."""
    rng = np.random.default_rng([label, 0xC1A55])

    def draw(low: float, high: float) -> float:
        # Plain floats: numpy float64 scalars would silently promote float32 images to float64.
        return float(rng.uniform(low, high))

    golden = 0.6180339887498949  # spreads hues of consecutive classes far apart
    fg_hue = (label * golden) % 1.0
    return ClassLook(
        fg_hue=fg_hue,
        fg_sat=draw(0.55, 0.95),
        fg_val=draw(0.7, 1.0),
        bg_hue=(fg_hue + draw(0.3, 0.7)) % 1.0,
        bg_sat=draw(0.25, 0.6),
        bg_val=draw(0.45, 0.8),
        texture=label % 4,
        shape=(label // 4) % 3,
        angle=draw(0.0, math.pi),
        frequency=draw(1.5, 4.0),
        aspect=draw(0.6, 1.0),
    )


@lru_cache(maxsize=8)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-center coordinates in [-1, 1]: ys of shape (H, 1), xs of shape (1, W)."""
    ys = ((np.arange(height) + 0.5) / height * 2.0 - 1.0).reshape(height, 1)
    xs = ((np.arange(width) + 0.5) / width * 2.0 - 1.0).reshape(1, width)
    return ys.astype(np.float32), xs.astype(np.float32)


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    """An RGB colour as a (3, 1, 1) array, ready to broadcast over an image."""
    rgb = colorsys.hsv_to_rgb(hue % 1.0, min(max(saturation, 0.0), 1.0), min(max(value, 0.0), 1.0))
    return np.array(rgb, dtype=np.float32).reshape(3, 1, 1)


def _background(look: ClassLook, rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """A two-colour gradient in the class's background hue, modulated by the class texture."""
    direction = float(rng.uniform(0.0, 2.0 * math.pi))
    ramp = 0.5 + 0.35 * (math.cos(direction) * xs + math.sin(direction) * ys)
    light = _hsv(look.bg_hue + float(rng.normal(0.0, 0.03)), look.bg_sat, look.bg_val * 1.2)
    dark = _hsv(look.bg_hue + 0.08, look.bg_sat * 1.2, look.bg_val * 0.6)
    gradient = light * (1.0 - ramp) + dark * ramp
    return gradient * (0.65 + 0.35 * _texture(look, rng, ys, xs))


def _texture(look: ClassLook, rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """A periodic pattern in [0, 1]: stripes, rings, checks or waves, per the class."""
    angle = look.angle + float(rng.normal(0.0, 0.12))
    frequency = look.frequency * float(rng.uniform(0.9, 1.1))
    phase = float(rng.uniform(0.0, 2.0 * math.pi))
    along = math.cos(angle) * xs + math.sin(angle) * ys
    across = -math.sin(angle) * xs + math.cos(angle) * ys
    turn = 2.0 * math.pi * frequency
    kind = look.texture
    if kind == 0:  # stripes
        wave = np.sin(turn * along + phase)
    elif kind == 1:  # rings around a random center
        cy, cx = (float(v) for v in rng.uniform(-0.8, 0.8, size=2))
        wave = np.sin(turn * np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2) + phase)
    elif kind == 2:  # checks
        wave = np.sin(turn * along + phase) * np.sin(turn * across + float(rng.uniform(0.0, 2.0 * math.pi)))
    else:  # waves: stripes bent by a slower sine
        wave = np.sin(turn * along + 1.5 * np.sin(0.5 * turn * across) + phase)
    return 0.5 + 0.5 * wave


def _shape_mask(
    look: ClassLook, rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Soft-edged mask of the class's shape at a random place, and its shading (light from a side)."""
    cx, cy = (float(v) for v in rng.uniform(-0.4, 0.4, size=2))
    size = float(rng.uniform(0.3, 0.55))
    rotation = float(rng.uniform(0.0, math.pi))
    u = (math.cos(rotation) * (xs - cx) + math.sin(rotation) * (ys - cy)) / size
    v = (-math.sin(rotation) * (xs - cx) + math.cos(rotation) * (ys - cy)) / (size * look.aspect)
    kind = look.shape
    if kind == 0:
        distance = np.sqrt(u**2 + v**2) - 1.0  # ellipse
    elif kind == 1:
        distance = np.maximum(np.abs(u), np.abs(v)) - 1.0  # box
    else:
        distance = np.abs(u) + np.abs(v) - 1.0  # diamond
    # A sigmoid edge a few percent of the shape wide: smooth, like a photographed object.
    mask = 1.0 / (1.0 + np.exp(np.clip(distance * 14.0, -30.0, 30.0)))
    light = float(rng.uniform(0.0, 2.0 * math.pi))
    shading = 0.8 + 0.25 * np.clip(math.cos(light) * u + math.sin(light) * v, -1.0, 1.0)
    return mask, shading


def _smooth_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-frequency colour noise: a random 4x4 grid per channel, bilinearly enlarged."""
    coarse = rng.standard_normal((3, 4, 4), dtype=np.float32)
    return _tent_weights(height, 4) @ coarse @ _tent_weights(width, 4).T


@lru_cache(maxsize=8)
def _tent_weights(size: int, knots: int) -> np.ndarray:
    """(size, knots) linear-interpolation weights from ``knots`` evenly spaced values."""
    positions = np.linspace(0.0, knots - 1.0, size)
    weights = np.clip(1.0 - np.abs(positions[:, None] - np.arange(knots)[None, :]), 0.0, None)
    return weights.astype(np.float32)


def _open_synthetic(argument: str | None, image_shape, num_classes: int | None, seed: int, spec: str) -> DataSource:
    """synthetic[:PER_CLASS]: generated colour images with class structure (64 per class; K from the model)."""
    per_class = _per_class("synthetic", argument, DEFAULT_SYNTHETIC_PER_CLASS)
    classes = 10 if num_classes is None else num_classes
    if classes < 2:
        raise UsageError(f"synthetic data needs at least 2 classes, got {classes}")
    return SyntheticSource(image_shape, classes, per_class, seed, spec)


# --------------------------------------------------------------------------------------
# photos: random crops of the photographs scikit-image ships
# --------------------------------------------------------------------------------------

# One class per photograph, in this order: eight colour photographs and two gray ones,
# all files of scikit-image's own package data (installed with its wheel, never fetched).
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
          "ihc.png", "retina.jpg", "camera.png", "brick.png")
DEFAULT_PHOTOS_PER_CLASS = 100
# Photographs are kept at most this many pixels on their shorter side (crops are small).
PHOTO_SHORT_SIDE = 384


def photos_folder() -> Path:
    """scikit-image's package data folder, found without importing scikit-image."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise GitoolError("--data photos needs scikit-image (it ships the photographs): pip install 'gitool[photos]'")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    missing = [name for name in PHOTOS if not (folder / name).is_file()]
    if missing:
        raise GitoolError(f"scikit-image's package data at {folder} lacks {', '.join(missing)}; reinstall "
                          "scikit-image from its wheel")
    return folder


@lru_cache(maxsize=1)
def _photographs(folder: str) -> tuple[torch.Tensor, ...]:
    """The photographs as (3, h, w) float32 tensors in [0, 1], shorter side at most
    PHOTO_SHORT_SIDE (gray photographs replicated to three channels)."""
    photos = []
    for name in PHOTOS:
        image = convert_channels(read_image(Path(folder) / name), 3)
        short = min(image.shape[-2:])
        if short > PHOTO_SHORT_SIDE:
            size = [round(side * PHOTO_SHORT_SIDE / short) for side in image.shape[-2:]]
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
        photos.append(image[0].contiguous())
    return tuple(photos)


class PhotoSource(DataSource):
    """Random crops of real photographs, ``per_class`` per class, labels ``index % K``.

    Class c is photograph c of :data:`PHOTOS` (astronaut, cat, coffee, rocket, motorcycle,
    Hubble deep field, a stained tissue section, a retina, the cameraman, a brick wall).
    Each item is a pure function of (seed, index): a square-ish crop of 25-60% of the
    photograph's shorter side at a random place (aspect 3:4 to 4:3), flipped left-right
    half of the time, scaled to H x W, then colour-jittered (brightness x0.6-1.4, contrast
    x0.6-1.4, saturation x0.4-1.3, a hue rotation of up to +-0.08 turns, 20% made gray) with
    a little pixel noise. A crop rarely shows what makes its photograph unique (a patch
    of black sky, skin or wall), and the jitter hides the plain colour cues, so a small
    CNN learns the classes gradually: its held-out accuracy passes 50% early and reaches
    90% only with real training (the label-count benchmarks need both regimes)."""

    def __init__(self, image_shape: tuple[int, int, int], per_class: int, seed: int, name: str):
        self.name = name
        self.image_shape = image_shape
        self.num_classes = len(PHOTOS)
        self.class_names = [photo.rsplit(".", 1)[0] for photo in PHOTOS]
        self.labels = np.arange(self.num_classes * per_class, dtype=np.int64) % self.num_classes
        self.seed = seed
        self.folder = str(photos_folder())

    def _load(self, indices: list[int]) -> torch.Tensor:
        photos = _photographs(self.folder)
        _, height, width = self.image_shape
        crops = torch.cat([self._crop(photos[int(self.labels[i])], i, height, width) for i in indices])
        return convert_channels(crops, self.image_shape[0])

    def _crop(self, photo: torch.Tensor, index: int, height: int, width: int) -> torch.Tensor:
        """One (1, 3, H, W) crop of ``photo``, a pure function of (seed, index)."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, index, 0x9407])
        photo_h, photo_w = photo.shape[-2:]
        side = rng.uniform(0.25, 0.6) * min(photo_h, photo_w)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        crop_h = max(2, min(photo_h, round(side * math.sqrt(aspect))))
        crop_w = max(2, min(photo_w, round(side / math.sqrt(aspect))))
        top = int(rng.integers(0, photo_h - crop_h + 1))
        left = int(rng.integers(0, photo_w - crop_w + 1))
        crop = photo[None, :, top : top + crop_h, left : left + crop_w]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        crop = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        return jitter_colour(crop, rng)


def jitter_colour(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter of (n, 3, h, w) images in [0, 1],
    20% of the time gray, plus pixel noise (see `PhotoSource`)."""
    luma_weights = torch.tensor(LUMA_WEIGHTS, dtype=image.dtype).view(1, 3, 1, 1)
    image = image * float(rng.uniform(0.6, 1.4))
    luma = (image * luma_weights).sum(dim=1, keepdim=True)
    image = luma.mean() + (image - luma.mean()) * float(rng.uniform(0.6, 1.4))
    luma = (image * luma_weights).sum(dim=1, keepdim=True)
    saturation = 0.0 if rng.random() < 0.2 else float(rng.uniform(0.4, 1.3))
    chroma = image - luma
    # Hue: rotate the chroma about the gray axis (Rodrigues' formula, unit axis (1,1,1)/sqrt 3).
    angle = 2 * math.pi * float(rng.uniform(-0.08, 0.08))
    axis = torch.full((1, 3, 1, 1), 1 / math.sqrt(3), dtype=image.dtype)
    cross = torch.cross(axis.expand_as(chroma), chroma, dim=1)
    along = (axis * chroma).sum(dim=1, keepdim=True) * axis
    chroma = chroma * math.cos(angle) + cross * math.sin(angle) + along * (1 - math.cos(angle))
    image = luma + saturation * chroma
    noise = torch.from_numpy(rng.standard_normal(image.shape).astype(np.float32)).to(image.dtype)
    return (image + 0.02 * noise).clamp(0.0, 1.0)


def _open_photos(argument: str | None, image_shape, num_classes: int | None, seed: int, spec: str) -> DataSource:
    """photos[:PER_CLASS]: random jittered crops of 10 photographs scikit-image ships (100 per class; needs scikit-image)."""
    return PhotoSource(tuple(image_shape), _per_class("photos", argument, DEFAULT_PHOTOS_PER_CLASS), seed, spec)


def _per_class(kind: str, argument: str | None, default: int) -> int:
    """The PER_CLASS of a generated source's ``KIND[:PER_CLASS]`` spec."""
    if argument is None:
        return default
    if not argument.strip().isdigit() or int(argument) < 1:
        raise UsageError(f"{kind}:PER_CLASS needs a positive integer, got {argument!r}")
    return int(argument)


# --------------------------------------------------------------------------------------
# In-memory arrays: digits and CIFAR
# --------------------------------------------------------------------------------------


class ArraySource(DataSource):
    """Images held in memory as an (N, c, h, w) array with values in [0, scale]."""

    def __init__(self, name: str, pixels: np.ndarray, scale: float, labels: np.ndarray,
                 class_names: list[str], image_shape: tuple[int, int, int]):
        self.name = name
        self.pixels = pixels
        self.scale = scale
        self.labels = labels.astype(np.int64)
        self.class_names = class_names
        self.num_classes = len(class_names)
        self.image_shape = image_shape

    def _load(self, indices: list[int]) -> torch.Tensor:
        chosen = torch.from_numpy(np.ascontiguousarray(self.pixels[indices])).to(torch.float32) / self.scale
        return fit_to_shape(chosen, self.image_shape)


def _open_digits(argument: str | None, image_shape, num_classes: int | None, seed: int, spec: str) -> DataSource:
    """digits: scikit-learn's bundled handwritten digits (1797 images, 8x8, 10 classes), resized."""
    _no_argument("digits", argument)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise GitoolError("--data digits needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    pixels = digits.images.reshape(-1, 1, 8, 8)  # values 0..16
    names = [str(d) for d in range(10)]
    return ArraySource(spec, pixels, 16.0, np.asarray(digits.target), names, image_shape)


# --------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 python batches, read with a restricted unpickler
# --------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _allowed_pickle_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR batch needs: what numpy uses to pickle a uint8 array.

    numpy moved ``numpy.core`` to ``numpy._core`` in 2.0; files name either path.
    ``_codecs.encode`` rebuilds byte strings in Python 3 protocol-2 pickles.
    """
    import _codecs

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and plain containers, and nothing else.

    A pickle can name any importable callable and have it called while loading (that is
    how ``os.system`` gets run from a malicious file). Refusing every global outside a
    short allow-list makes loading a downloaded CIFAR file safe.
    """

    def find_class(self, module: str, name: str) -> object:
        allowed = _allowed_pickle_globals()
        if (module, name) not in allowed:
            raise ForbiddenGlobal(f"{module}.{name}")
        return allowed[(module, name)]


def load_restricted_pickle(path: Path) -> object:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (encoding='bytes', as CIFAR needs)."""
    try:
        with open(path, "rb") as handle:
            return RestrictedUnpickler(handle, encoding="bytes").load()
    except OSError as error:
        raise GitoolError(f"cannot read {path}: {error.strerror or error}") from error
    except ForbiddenGlobal as error:
        raise GitoolError(
            f"refusing to load {path}: it asks to call {error}, which a CIFAR file never needs"
        ) from error
    except Exception as error:  # truncated or garbled data raises many kinds of errors
        raise GitoolError(f"{path} is not a readable CIFAR file: {type(error).__name__}: {error}") from error


# Per dataset: folder name inside an archive, batch files per split, label key, meta file and key.
CIFAR_LAYOUTS = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "labels": b"labels",
        "classes": 10,
        "meta": ("batches.meta", b"label_names"),
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "labels": b"fine_labels",
        "classes": 100,
        "meta": ("meta", b"fine_label_names"),
    },
}


def _read_cifar_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) from one official batch file."""
    batch = load_restricted_pickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise GitoolError(f"{path} is not a CIFAR batch (needs keys 'data' and {label_key.decode()!r})")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise GitoolError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError):
        raise GitoolError(f"{path}: labels are not integers") from None
    if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes:
        raise GitoolError(f"{path}: expected {data.shape[0]} labels in 0..{num_classes - 1}")
    # Rows are stored channel-major: 1024 red, then 1024 green, then 1024 blue values.
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_class_names(folder: Path, layout: dict) -> list[str]:
    """Class names from the meta file when present and sane, else the class numbers."""
    count = layout["classes"]
    meta_file, key = layout["meta"]
    fallback = [str(c) for c in range(count)]
    if not (folder / meta_file).is_file():
        return fallback
    meta = load_restricted_pickle(folder / meta_file)
    names = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != count:
        return fallback
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


def _open_cifar(dataset: str, argument: str | None, image_shape, spec: str) -> DataSource:
    """Load the train (default) or test split of an extracted CIFAR python folder."""
    if not argument:
        raise UsageError(f"{dataset} needs the extracted folder: --data {dataset}:PATH[:test]")
    path_text, split = argument, "train"
    head, _, tail = argument.rpartition(":")
    if head and tail in ("train", "test"):
        path_text, split = head, tail
    layout = CIFAR_LAYOUTS[dataset]
    folder = Path(path_text).expanduser()
    if (folder / layout["folder"]).is_dir():
        folder = folder / layout["folder"]  # the user named the folder the archive was extracted into
    if not folder.is_dir():
        raise GitoolError(f"{dataset} folder not found: {folder}")
    missing = [name for name in layout[split] if not (folder / name).is_file()]
    if missing:
        raise GitoolError(f"{folder} is missing {dataset} file(s): {', '.join(missing)}")
    batches = [_read_cifar_batch(folder / name, layout["labels"], layout["classes"]) for name in layout[split]]
    pixels = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    return ArraySource(spec, pixels, 255.0, labels, _cifar_class_names(folder, layout), image_shape)


def _open_cifar10(argument: str | None, image_shape, num_classes: int | None, seed: int, spec: str) -> DataSource:
    """cifar10:PATH[:test]: the official CIFAR-10 python batches in PATH (training split by default)."""
    return _open_cifar("cifar10", argument, image_shape, spec)


def _open_cifar100(argument: str | None, image_shape, num_classes: int | None, seed: int, spec: str) -> DataSource:
    """cifar100:PATH[:test]: the official CIFAR-100 python files in PATH (fine labels, training split)."""
    return _open_cifar("cifar100", argument, image_shape, spec)


# --------------------------------------------------------------------------------------
# Image folders: folder:PATH and samples
# --------------------------------------------------------------------------------------


class FolderSource(DataSource):
    """Images in class-per-subfolder layout (``root/<class>/<image>``), decoded on demand.

    Classes are the subfolder names in sorted order; files in a class are sorted by name.
    """

    def __init__(self, root: Path, image_shape: tuple[int, int, int], name: str):
        if not root.is_dir():
            raise GitoolError(f"image folder not found: {root}")
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        files: list[Path] = []
        labels: list[int] = []
        for label, class_dir in enumerate(class_dirs):
            for path in sorted(class_dir.iterdir()):
                if path.is_file() and _is_image_name(path):
                    files.append(path)
                    labels.append(label)
        if not files:
            if any(_is_image_name(p) for p in root.iterdir()):
                raise GitoolError(f"{root} has images but no class subfolders; put each class in its own folder")
            raise GitoolError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in class subfolders of {root}")
        self.name = name
        self.root = root
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = [d.name for d in class_dirs]
        self.num_classes = len(class_dirs)
        self.image_shape = image_shape

    def _load(self, indices: list[int]) -> torch.Tensor:
        return torch.cat([fit_to_shape(read_image(self.files[i]), self.image_shape) for i in indices])


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def read_image(path: Path) -> torch.Tensor:
    """Decode one image file as a (1, c, h, w) float tensor in [0, 1], c = 1 for gray files."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            gray = image.mode in ("1", "L", "LA")
            pixels = np.asarray(image.convert("L" if gray else "RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise GitoolError(f"cannot read image {path}: {error}") from error
    if gray:
        pixels = pixels[:, :, None]
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).unsqueeze(0).to(torch.float32) / 255.0


def _open_folder(argument: str | None, image_shape, num_classes: int | None, seed: int, spec: str) -> DataSource:
    """folder:PATH: images in class-per-subfolder layout (png, jpg, jpeg, bmp, webp), any size."""
    if not argument:
        raise UsageError("folder needs a path: --data folder:PATH")
    return FolderSource(Path(argument).expanduser(), image_shape, spec)


def samples_folder() -> Path:
    """Where the project's sample images live (``$GITOOL_SAMPLES`` overrides)."""
    override = os.environ.get(SAMPLES_ENV)
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parent.parent / "samples" / "images"


def _open_samples(argument: str | None, image_shape, num_classes: int | None, seed: int, spec: str) -> DataSource:
    """samples: the project's own small colour pictures (10 classes x 3, 64x64), from samples/images."""
    _no_argument("samples", argument)
    folder = samples_folder()
    if not folder.is_dir():
        raise GitoolError(
            f"sample images not found at {folder}; run samples/make_samples.py or set {SAMPLES_ENV}"
        )
    return FolderSource(folder, image_shape, spec)


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------

SourceFactory = Callable[..., DataSource]

DATA_SOURCES: dict[str, SourceFactory] = {
    "synthetic": _open_synthetic,
    "digits": _open_digits,
    "photos": _open_photos,
    "samples": _open_samples,
    "folder": _open_folder,
    "cifar10": _open_cifar10,
    "cifar100": _open_cifar100,
}


def open_source(
    spec: str, image_shape: tuple[int, int, int], *, num_classes: int | None = None, seed: int = 0
) -> DataSource:
    """Open the data source a ``--data`` spec names, producing images of ``image_shape``.

    ``num_classes`` is the class count of synthetic data; for the other sources it is the
    model's output count, which must be at least the source's own class count.
    ``seed`` only affects the generated sources (synthetic images, photo crops).
    """
    _check_image_shape(image_shape)
    kind, colon, rest = spec.partition(":")
    factory = DATA_SOURCES.get(kind.strip())
    if factory is None:
        raise UsageError(f"unknown data source '{spec}'; choose one of {', '.join(_usages())}")
    source = factory(rest if colon else None, tuple(image_shape), num_classes, seed, spec)
    if num_classes is not None and source.num_classes > num_classes:
        raise UsageError(
            f"data source {spec} has {source.num_classes} classes but the model has only {num_classes} outputs"
        )
    return source


def _check_image_shape(image_shape: tuple[int, int, int]) -> None:
    if len(image_shape) != 3 or any(int(v) < 1 for v in image_shape):
        raise UsageError(f"image shape must be three positive integers C, H, W, got {tuple(image_shape)}")
    if image_shape[0] not in (1, 3):
        raise UsageError(f"images must have 1 or 3 channels, got {image_shape[0]}")


def _no_argument(kind: str, argument: str | None) -> None:
    if argument is not None:
        raise UsageError(f"data source '{kind}' takes no argument, got '{kind}:{argument}'")


def _usages() -> list[str]:
    return [_first_line(factory.__doc__).split(": ")[0] for factory in DATA_SOURCES.values()]


def describe_sources() -> list[tuple[str, str]]:
    """(name, one-line description) of every data source, for help texts."""
    return [(name, _first_line(factory.__doc__)) for name, factory in DATA_SOURCES.items()]


def _first_line(docstring: str | None) -> str:
    return (docstring or "").strip().splitlines()[0] if docstring else ""
