"""Pictures of samples: image grids and 2-D scatter plots as PNG (Pillow only)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["grid_image", "scatter_image", "save_samples_png"]


def grid_image(images: np.ndarray, ncols: int | None = None, pad: int = 2, scale: int = 1):
    """(N, H, W, C) floats in [0, 1] -> a PIL image of the tiles on a grid (grey padding)."""
    from PIL import Image

    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images (N, H, W, 1 or 3), got shape {images.shape}")
    n, h, w, c = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    canvas = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 0.5, np.float32)
    for i, img in enumerate(images):
        r, q = divmod(i, ncols)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = img
    pixels = (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    im = Image.fromarray(pixels[..., 0] if c == 1 else pixels, mode="L" if c == 1 else "RGB")
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im


def _save_atomic(path, im) -> Path:
    """Encode in memory, then write atomically: a kill or a full disk never leaves half a PNG."""
    import io

    from PIL import Image

    from .checkpoint import atomic_write

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    buffer = io.BytesIO()
    im.save(buffer, format=fmt)
    atomic_write(path, buffer.getvalue())
    return path


def scatter_image(points: np.ndarray, size: int = 512, reference: np.ndarray | None = None):
    """(N, 2) points -> a PIL scatter plot (first two coordinates); reference points in grey."""
    from PIL import Image, ImageDraw

    points = np.asarray(points, dtype=np.float64)[:, :2]
    every = points if reference is None else np.concatenate([points, np.asarray(reference)[:, :2]])
    finite = every[np.isfinite(every).all(1)]
    if not len(finite):
        raise ValueError("no finite point to plot: every sample is NaN or Inf")
    lo, hi = np.percentile(finite, 0.5, axis=0), np.percentile(finite, 99.5, axis=0)
    centre, half = (lo + hi) / 2, max((hi - lo).max() / 2 * 1.15, 1e-6)
    im = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(im)

    def plot(pts, colour):
        xy = (pts - centre) / half * (size / 2 - 4) + size / 2
        for x, y in xy[np.isfinite(xy).all(1)]:
            draw.point((float(x), float(size - y)), fill=colour)

    if reference is not None:
        plot(np.asarray(reference)[:, :2], (170, 170, 170))
    plot(points, (20, 60, 160))
    return im


def save_samples_png(path, samples: np.ndarray, kind: str, ncols: int | None = None) -> Path:
    """A grid for images (N, H, W, C) (``ncols`` columns; default square), a scatter plot for points (N, d)."""
    return _save_atomic(path, grid_image(samples, ncols=ncols, scale=2) if kind == "image" else scatter_image(samples))
