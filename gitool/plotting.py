"""Pictures for people, written headless: image grids (PIL), captioned comparison grids
and loss curves (matplotlib, Agg backend; no display needed)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch


def save_image_grid(images: torch.Tensor, path: str | Path, captions: list[str] | None = None,
                    columns: int = 8, scale: int | None = None) -> Path:
    """Write images (N x C x H x W in [0, 1], C = 1 or 3) as one PNG grid, optional caption under each.

    Small images are enlarged (nearest neighbour) so a 32x32 picture is still visible.
    """
    from gitool.files import atomic_write_bytes

    atomic_write_bytes(path, image_grid_png(images, captions, columns, scale))
    return Path(path)


def image_grid_png(images: torch.Tensor, captions: list[str] | None = None, columns: int = 8,
                   scale: int | None = None) -> bytes:
    """The PNG bytes of :func:`save_image_grid` (for pages that embed their pictures)."""
    from PIL import Image, ImageDraw

    images = images.detach().to("cpu", torch.float64).clamp(0, 1)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected N x C x H x W images with 1 or 3 channels, got {tuple(images.shape)}")
    count, _, height, width = images.shape
    scale = scale or max(1, 96 // max(height, width))
    cell_w, cell_h = width * scale, height * scale
    caption_h = 14 if captions else 0
    columns = max(1, min(columns, count))
    rows = (count + columns - 1) // columns
    pad = 4
    grid = Image.new("RGB", (columns * (cell_w + pad) + pad, rows * (cell_h + caption_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for index in range(count):
        pixels = (images[index].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        picture = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
        picture = picture.convert("RGB").resize((cell_w, cell_h), Image.NEAREST)
        x = pad + (index % columns) * (cell_w + pad)
        y = pad + (index // columns) * (cell_h + caption_h + pad)
        grid.paste(picture, (x, y))
        if captions and index < len(captions):
            draw.text((x, y + cell_h + 1), str(captions[index]), fill="black")
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- matplotlib figures (captions)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _as_display(image: torch.Tensor):
    """C x H x W in [0, 1] -> H x W (grey) or H x W x 3 numpy for imshow."""
    image = image.detach().cpu().to(torch.float64).clamp(0, 1)
    if image.shape[0] == 1:
        return image[0].numpy()
    return image[:3].permute(1, 2, 0).numpy()


def _save_figure(fig, path: str | Path) -> Path:
    from gitool.files import atomic_write_bytes

    atomic_write_bytes(path, figure_png(fig))
    return Path(path)


def new_figure(width: float, height: float):
    """A (figure, axis) pair of ``width`` x ``height`` inches, headless."""
    return _pyplot().subplots(figsize=(width, height), dpi=100)


def figure_png(fig, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes (closed afterwards); no date in the file, so the
    same figure gives the same bytes."""
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def save_comparison_grid(truth: torch.Tensor, recovered: torch.Tensor, path: str | Path,
                         captions: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Truth in the top row, the matched reconstruction below it, one caption per
    column under the reconstruction (e.g. its PSNR / SSIM). Both N x C x H x W in [0, 1]."""
    plt = _pyplot()
    n = truth.shape[0]
    if recovered.shape[0] != n:
        raise ValueError("truth and reconstruction need the same number of images (match them first)")
    fig, axes = plt.subplots(2, n, figsize=(1.7 * n + 0.6, 4.0), squeeze=False)
    for i in range(n):
        for row, images in enumerate((truth, recovered)):
            ax = axes[row][i]
            ax.imshow(_as_display(images[i]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        if captions:
            axes[1][i].set_xlabel(captions[i], fontsize=7)
    axes[0][0].set_ylabel("truth", fontsize=8)
    axes[1][0].set_ylabel("reconstruction", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save_figure(fig, path)


def save_score_grid(recovered: torch.Tensor, truth_images: torch.Tensor, scores: dict, path: str | Path,
                    title: str = "reconstruction") -> Path:
    """Truth above, the reconstruction matched to it below, PSNR / SSIM per column;
    ``scores`` as `gitool.metrics.score_images` returns them (with its matching)."""
    matched_truth = truth_images[scores["matching"]].clamp(0, 1)
    captions = [f"PSNR {p:.2f} dB\nSSIM {s:.3f}" for p, s in zip(scores["psnr_per_image"], scores["ssim_per_image"])]
    return save_comparison_grid(matched_truth, recovered.clamp(0, 1), path, captions=captions,
                                title=f"{title}: PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.3f}")


def plot_curve(curve: dict[str, Any], path: str | Path) -> Path:
    """A loss curve with the chosen point marked, e.g. the lambda search's loss over lambda.

    ``curve`` keys: x, y (arrays), chosen_x (and optional chosen_y), xlabel, ylabel, title,
    logx (a symmetric log axis when x has both signs), logy. Written atomically."""
    plt = _pyplot()
    x = np.asarray(curve["x"], dtype=float)
    y = np.asarray(curve["y"], dtype=float)
    logy = bool(curve.get("logy"))
    floor = 1e-17
    if logy:
        y = np.maximum(y, floor)  # exact zeros at the solution would vanish from a log axis
    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=110)
    for side in (x < 0, x >= 0):  # two pieces, so the gap around 0 is not drawn across
        if side.any():
            axis.plot(x[side], y[side], color="tab:blue", linewidth=1)
    chosen = curve.get("chosen_x")
    if chosen is not None:
        chosen_y = curve.get("chosen_y")
        chosen_y = max(float(chosen_y), floor) if chosen_y is not None else float(np.interp(chosen, x, y))
        axis.axvline(chosen, color="tab:red", linestyle="--", linewidth=1)
        axis.plot([chosen], [chosen_y], "o", color="tab:red", label=f"chosen: {chosen:.6g}")
        axis.legend(loc="best")
    if curve.get("logx"):
        axis.set_xscale("symlog", linthresh=1.0) if (x < 0).any() else axis.set_xscale("log")
    if logy:
        axis.set_yscale("log")
    axis.set_xlabel(str(curve.get("xlabel", "x")))
    axis.set_ylabel(str(curve.get("ylabel", "y")))
    axis.set_title(str(curve.get("title", "")))
    axis.grid(True, which="major", alpha=0.3)
    return _save_figure(figure, path)
