"""Whether a scene's photos show a background, read from the borders of its training images.

An object scene (NeRF-synthetic, the demo scene on white, an object shot against a plain sweep) shows one flat
colour, or transparency, around its borders: the scene box holds everything there is to fit. A capture of the real
world shows a background there (walls, sky, ground, a room), which lies outside any box around the object and is
what contracted space and a background capped at a coarse level of detail are for: trained inside the box, it fills
the finest levels and makes files of 4 to 6 MB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from jaxtyping import Float, Shaped

__all__ = ["FLAT_BORDER_SHARE", "FLAT_TOLERANCE", "SAMPLED_IMAGES", "border_pixels", "flat_border_share"]

FLAT_BORDER_SHARE = 0.9
"""A scene whose sampled border pixels are at least this share flat (transparent, or within FLAT_TOLERANCE of the
borders' median colour) shows no background."""
FLAT_TOLERANCE = 0.08
"""Largest difference in any channel (0..1) from the borders' median colour of a pixel counted as flat (about 20
levels of 255: JPEG noise and vignetting on a plain backdrop)."""
SAMPLED_IMAGES = 8
"""Training images read, evenly spaced through the list."""


def border_pixels(image: Shaped[np.ndarray, "h w c"]) -> Shaped[np.ndarray, "n c"]:
    """The pixels of ``image``'s outer ring, ``max(1, min(h, w) // 32)`` pixels wide."""
    height, width = image.shape[:2]
    ring = max(1, min(height, width) // 32)
    inner = image[ring : height - ring]
    rows = [image[:ring], image[height - ring :], inner[:, :ring], inner[:, width - ring :]]
    return np.concatenate([part.reshape(-1, image.shape[2]) for part in rows])


def _border_of(path: Path) -> Float[np.ndarray, "n c"]:
    """The outer ring of the image at ``path`` (:func:`border_pixels`) as RGB or RGBA values in [0, 1]."""
    from PIL import Image

    with Image.open(path) as image:
        has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
        pixels = np.asarray(image.convert("RGBA" if has_alpha else "RGB"))
    return border_pixels(pixels).astype(np.float32) / 255.0  # only the ring in float, not the whole photo


def flat_border_share(image_paths: Sequence[Path], sampled: int = SAMPLED_IMAGES) -> float:
    """The share of flat pixels (see FLAT_BORDER_SHARE) in the borders of ``sampled`` of ``image_paths``."""
    if not image_paths:
        raise ValueError("no training images to read the scene's borders from")
    picks = np.unique(np.linspace(0, len(image_paths) - 1, min(sampled, len(image_paths))).round().astype(int))
    borders = [_border_of(Path(image_paths[i])) for i in picks]
    transparent = np.concatenate([b[:, 3] < 0.5 if b.shape[1] == 4 else np.zeros(len(b), bool) for b in borders])
    colours = np.concatenate([b[:, :3] for b in borders])
    opaque = colours[~transparent]
    if len(opaque) == 0:
        return 1.0
    median = np.median(opaque, axis=0)
    flat = np.abs(opaque - median).max(axis=1) <= FLAT_TOLERANCE
    return float((transparent.sum() + flat.sum()) / len(colours))
