"""Negatives for DenseHybridAD: foreign regions pasted into normal training images with hard binary compositing.

``shape="mask"`` (the adaptation's proposal): one object mask (an ADE20K segment, a connected component of a masked image
folder, or, with no folder, a procedural random polygon filled with smooth colour noise) is rescaled so that its bounding
box spans ``size_range`` of the shorter image side and pasted pixel-exactly at a random place. ``shape="rectangle"``
(DenseHybrid's original negatives): a whole source image, resized to a random rectangle of the same relative size range.

:class:`NegativePaster` is a :data:`~anomalib_ext.components.data_synthesis.Synthesiser`: DenseHybridAD runs it in the
training DataLoader's workers through :class:`~anomalib_ext.components.data_synthesis.SyntheticAnomalyDataset`, on images
already resized by the pre-processor's ``Resize`` (so masks stay pixel-exact at the model's resolution) and before its
``Normalize`` (which therefore treats pasted and normal pixels alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from anomalib_ext.components.negative_sources import ADE20KSplit, SegmentSource
from anomalib_ext.components.synthetic import paste_region, random_shape_mask, read_rgb

NegativeShape = Literal["mask", "rectangle"]
NEGATIVE_SHAPES: tuple[str, ...] = ("mask", "rectangle")


def smooth_colour_noise(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Procedural negative content: a random 2x2..8x8 RGB grid upsampled bicubically to ``shape`` (uint8)."""
    cells = int(rng.integers(2, 9))
    grid = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.float32)
    return np.clip(cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)


class NegativePaster:
    """Pastes one negative into an image: ``paster(image, rng) -> (composited image, bool mask of the pasted pixels)``.

    Args:
        source: folder of images with masks (ADE20K layouts or any ``MaskedImageSource`` layout); ``None``: procedural.
        shape: ``"mask"`` (object-shaped, default) or ``"rectangle"``.
        size_range: extent of a negative (bounding-box side for masks, rectangle sides) as fractions of the shorter side.
        split: ADE20K scene-parsing split to draw from.
    """

    def __init__(
        self,
        source: str | Path | None = None,
        shape: NegativeShape = "mask",
        size_range: Sequence[float] = (0.1, 0.5),
        split: ADE20KSplit = "training",
    ) -> None:
        if shape not in NEGATIVE_SHAPES:
            msg = f"Unknown negative shape {shape!r}; expected one of {NEGATIVE_SHAPES}."
            raise ValueError(msg)
        low, high = (float(value) for value in size_range)
        if not 0.0 < low <= high <= 1.0:
            msg = f"size_range must satisfy 0 < low <= high <= 1, got {tuple(size_range)}."
            raise ValueError(msg)
        self.shape = shape
        self.size_range = (low, high)
        self.segments = SegmentSource(source, split) if source is not None else None

    def _rectangle(self, side: int, rng: np.random.Generator) -> np.ndarray:
        """A filled rectangle mask whose sides are drawn from ``size_range`` of ``side``."""
        patch_h, patch_w = (max(1, round(extent)) for extent in rng.uniform(*self.size_range, size=2) * side)
        return np.ones((patch_h, patch_w), dtype=bool)

    def _draw(self, height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A source image and the bool mask of the region to paste, already at its pasting size."""
        side = min(height, width)
        if self.segments is None:
            content = smooth_colour_noise((height, width), rng)
            if self.shape == "mask":
                return content, random_shape_mask((height, width), rng, self.size_range)
            rectangle = self._rectangle(side, rng)
            return content[: rectangle.shape[0], : rectangle.shape[1]], rectangle
        if self.shape == "rectangle":
            image = read_rgb(self.segments.source.pairs[int(rng.integers(len(self.segments)))][0])
            rectangle = self._rectangle(side, rng)
            return cv2.resize(image, rectangle.shape[::-1], interpolation=cv2.INTER_AREA), rectangle
        image, mask = self.segments.sample(rng)
        rows, cols = np.nonzero(mask)
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        crop, crop_mask = image[top:bottom, left:right], mask[top:bottom, left:right]
        scale = rng.uniform(*self.size_range) * side / max(crop_mask.shape)
        size = (max(1, round(crop_mask.shape[1] * scale)), max(1, round(crop_mask.shape[0] * scale)))
        # Mask-weighted resampling: every pasted colour is an average of object pixels only, never of the background.
        weight = crop_mask.astype(np.float32)
        resized_weight = cv2.resize(weight, size, interpolation=cv2.INTER_AREA)
        resized = cv2.resize(crop.astype(np.float32) * weight[..., None], size, interpolation=cv2.INTER_AREA)
        resized = resized / np.maximum(resized_weight, 1e-6)[..., None]
        resized_mask = resized_weight >= 0.5
        if not resized_mask.any():  # a thin segment can vanish when shrunk: keep its strongest pixel
            resized_mask[np.unravel_index(np.argmax(resized_weight), resized_weight.shape)] = True
        return np.clip(resized, 0, 255), resized_mask

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Paste one negative into ``image`` (``[H, W, 3]`` float in ``[0, 1]``).

        Returns:
            The composited image (float32, ``[0, 1]``) and the bool mask ``[H, W]`` of exactly the pasted pixels.
        """
        height, width = image.shape[:2]
        source_image, source_mask = self._draw(height, width, rng)
        source = source_image.astype(np.float32) / 255.0
        return paste_region(image.astype(np.float32, copy=False), source, source_mask, rng)
