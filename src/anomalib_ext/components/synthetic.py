"""Synthetic anomalies: CutPaste, Poisson seamless cloning, hard region pasting, crack strokes and random shapes.

Shared by the embedded demo dataset (:mod:`anomalib_ext.data.textures`), MSFlow's task-specific pre-training and
DenseHybridAD's negatives. Every generator is a pure function of its inputs and a :class:`numpy.random.Generator`, so a
seeded generator gives identical outputs. Images are ``uint8`` RGB arrays ``[H, W, 3]``; masks are ``bool`` ``[H, W]`` and
mark exactly the footprint that was written into the image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# CutPaste (Li et al., CVPR 2021) sampling ranges, as used by the pre-training paper.
CUTPASTE_AREA_RANGE = (0.02, 0.15)
CUTPASTE_ASPECT_RANGE = (0.3, 3.3)
SCAR_WIDTH_RANGE = (2, 16)
SCAR_HEIGHT_RANGE = (10, 25)
SCAR_ROTATION_DEGREES = 45.0
COLOUR_JITTER = 0.1


def _composite(
    image: np.ndarray, patch: np.ndarray, patch_mask: np.ndarray, top: int, left: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hard binary compositing of ``patch`` where ``patch_mask`` is set, with its top-left corner at (top, left)."""
    height, width = patch_mask.shape
    output = image.copy()
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[top : top + height, left : left + width] = patch_mask
    output[mask] = patch[patch_mask]
    return output, mask


def _colour_jitter(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light per-channel brightness/contrast change, so a pasted patch differs from its surroundings."""
    gain = rng.uniform(1 - COLOUR_JITTER, 1 + COLOUR_JITTER, size=3)
    offset = rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3) * 255
    return np.clip(patch.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)


def _random_position(
    image_shape: tuple[int, ...], patch_shape: tuple[int, ...], rng: np.random.Generator
) -> tuple[int, int]:
    top = int(rng.integers(0, image_shape[0] - patch_shape[0] + 1))
    left = int(rng.integers(0, image_shape[1] - patch_shape[1] + 1))
    return top, left


def cut_paste(
    image: np.ndarray,
    rng: np.random.Generator,
    variant: Literal["normal", "scar"] = "normal",
) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste: cut a region of ``image``, jitter its colours and paste it elsewhere in the same image.

    ``normal``: a rectangle of 2-15 % of the image area with aspect ratio 0.3-3.3. ``scar``: a thin 2-16 x 10-25 px
    rectangle rotated by up to +-45 degrees. The mask is the pasted footprint.
    """
    height, width = image.shape[:2]
    if variant == "normal":
        area = rng.uniform(*CUTPASTE_AREA_RANGE) * height * width
        aspect = np.exp(rng.uniform(np.log(CUTPASTE_ASPECT_RANGE[0]), np.log(CUTPASTE_ASPECT_RANGE[1])))
        patch_h = int(np.clip(round(np.sqrt(area / aspect)), 1, height - 1))
        patch_w = int(np.clip(round(np.sqrt(area * aspect)), 1, width - 1))
        source_top, source_left = _random_position(image.shape, (patch_h, patch_w), rng)
        patch = _colour_jitter(image[source_top : source_top + patch_h, source_left : source_left + patch_w], rng)
        patch_mask = np.ones((patch_h, patch_w), dtype=bool)
    elif variant == "scar":
        scar_w = int(min(rng.integers(SCAR_WIDTH_RANGE[0], SCAR_WIDTH_RANGE[1] + 1), width - 1))
        scar_h = int(min(rng.integers(SCAR_HEIGHT_RANGE[0], SCAR_HEIGHT_RANGE[1] + 1), height - 1))
        source_top, source_left = _random_position(image.shape, (scar_h, scar_w), rng)
        scar = _colour_jitter(image[source_top : source_top + scar_h, source_left : source_left + scar_w], rng)
        side = int(np.ceil(np.hypot(scar_h, scar_w))) | 1
        canvas = np.zeros((side, side, 3), dtype=np.uint8)
        canvas_mask = np.zeros((side, side), dtype=np.uint8)
        top, left = (side - scar_h) // 2, (side - scar_w) // 2
        canvas[top : top + scar_h, left : left + scar_w] = scar
        canvas_mask[top : top + scar_h, left : left + scar_w] = 1
        rotation = cv2.getRotationMatrix2D(
            (side / 2, side / 2), rng.uniform(-SCAR_ROTATION_DEGREES, SCAR_ROTATION_DEGREES), 1.0
        )
        patch = cv2.warpAffine(canvas, rotation, (side, side), flags=cv2.INTER_LINEAR)
        patch_mask = cv2.warpAffine(canvas_mask, rotation, (side, side), flags=cv2.INTER_NEAREST).astype(bool)
        if side >= min(height, width):
            msg = f"Image of size {height}x{width} is too small for a CutPaste scar ({side} px)."
            raise ValueError(msg)
    else:
        msg = f"Unknown CutPaste variant {variant!r}; expected 'normal' or 'scar'."
        raise ValueError(msg)
    top, left = _random_position(image.shape, patch_mask.shape, rng)
    return _composite(image, patch, patch_mask, top, left)


def _crop_to_mask(
    source_image: np.ndarray, source_mask: np.ndarray, max_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Crop image and mask to the mask's bounding box, shrinking (aspect kept) to fit within ``max_size``."""
    if source_image.shape[:2] != source_mask.shape:
        msg = f"Source image {source_image.shape[:2]} and mask {source_mask.shape} differ in size."
        raise ValueError(msg)
    rows, cols = np.nonzero(source_mask)
    if rows.size == 0:
        msg = "Source mask is empty: nothing to paste."
        raise ValueError(msg)
    crop = source_image[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    crop_mask = source_mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = min(1.0, max_size[0] / crop_mask.shape[0], max_size[1] / crop_mask.shape[1])
    if scale < 1.0:
        size = (max(1, int(crop_mask.shape[1] * scale)), max(1, int(crop_mask.shape[0] * scale)))
        crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
        crop_mask = cv2.resize(crop_mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
        if not crop_mask.any():
            msg = "Source mask vanished when shrunk to fit the destination image."
            raise ValueError(msg)
    return crop, crop_mask


def paste_region(
    image: np.ndarray,
    source_image: np.ndarray,
    source_mask: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Paste the mask-shaped region of ``source_image`` at a random place of ``image`` (hard binary compositing)."""
    crop, crop_mask = _crop_to_mask(source_image, source_mask, image.shape[:2])
    top, left = _random_position(image.shape, crop_mask.shape, rng)
    return _composite(image, crop, crop_mask, top, left)


def poisson_clone(
    image: np.ndarray,
    source_image: np.ndarray,
    source_mask: np.ndarray,
    rng: np.random.Generator,
    mode: Literal["normal", "mixed"] = "normal",
) -> tuple[np.ndarray, np.ndarray]:
    """Seamlessly clone the mask-shaped region of ``source_image`` into ``image`` (Poisson image editing, OpenCV).

    ``normal`` is OpenCV's NORMAL_CLONE (as in the pre-training paper); ``mixed`` (MIXED_CLONE) keeps the destination's
    texture where it has stronger gradients. The returned mask is the cloned footprint. The region keeps a 2-pixel margin
    from the image border because OpenCV's solver needs a boundary around the mask.
    """
    margin = 2
    height, width = image.shape[:2]
    crop, crop_mask = _crop_to_mask(source_image, source_mask, (height - 2 * margin - 2, width - 2 * margin - 2))
    # Pad by one zero pixel so the mask never touches its own crop border (OpenCV's solver needs a boundary ring).
    crop = cv2.copyMakeBorder(crop, 1, 1, 1, 1, cv2.BORDER_REFLECT)
    crop_mask = np.pad(crop_mask, 1)
    crop_h, crop_w = crop_mask.shape
    top = int(rng.integers(margin, height - crop_h - margin + 1))
    left = int(rng.integers(margin, width - crop_w - margin + 1))
    flag = {"normal": cv2.NORMAL_CLONE, "mixed": cv2.MIXED_CLONE}[mode]
    # seamlessClone centres the mask's bounding box at ``center``; we place the padded crop's box exactly.
    rows, cols = np.nonzero(crop_mask)
    box_top, box_left = top + rows.min(), left + cols.min()
    box_h, box_w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    center = (int(box_left + box_w // 2), int(box_top + box_h // 2))
    cloned = cv2.seamlessClone(
        np.ascontiguousarray(crop[..., ::-1]),
        np.ascontiguousarray(image[..., ::-1]),
        crop_mask.astype(np.uint8) * 255,
        center,
        flag,
    )[..., ::-1]
    mask = np.zeros((height, width), dtype=bool)
    mask[top : top + crop_h, left : left + crop_w] = crop_mask
    output = image.copy()
    output[mask] = cloned[mask]  # outside the footprint the destination stays bit-identical
    return output, mask


def random_shape_mask(
    shape: tuple[int, int], rng: np.random.Generator, size_range: tuple[float, float] = (0.1, 0.35)
) -> np.ndarray:
    """A random star-shaped polygon (8-16 vertices) whose diameter is ``size_range`` of the shorter image side."""
    height, width = shape
    radius = rng.uniform(*size_range) * min(height, width) / 2
    vertices = int(rng.integers(8, 17))
    angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
    radii = radius * rng.uniform(0.4, 1.0, vertices)
    centre_y = rng.uniform(radius, height - radius)
    centre_x = rng.uniform(radius, width - radius)
    points = np.stack([centre_x + radii * np.cos(angles), centre_y + radii * np.sin(angles)], axis=1)
    mask = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    return mask.astype(bool)


def crack_stroke(
    image: np.ndarray, rng: np.random.Generator, darkening: tuple[float, float] = (0.25, 0.55)
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a thin, wandering dark crack (a random-walk polyline, 1-3 px wide) into ``image``."""
    height, width = image.shape[:2]
    steps = int(rng.integers(6, 14))
    step_length = rng.uniform(0.04, 0.09) * min(height, width)
    heading = rng.uniform(0, 2 * np.pi)
    point = np.array([rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height])
    points = [point.copy()]
    for _ in range(steps):
        heading += rng.normal(0, 0.45)
        point = np.clip(point + step_length * np.array([np.cos(heading), np.sin(heading)]), 0, [width - 1, height - 1])
        points.append(point.copy())
    mask = np.zeros((height, width), dtype=np.uint8)
    cv2.polylines(mask, [np.round(np.array(points)).astype(np.int32)], False, 1, thickness=int(rng.integers(1, 4)))
    mask = mask.astype(bool)
    output = image.copy()
    factor = rng.uniform(*darkening)
    output[mask] = (output[mask].astype(np.float32) * factor).astype(np.uint8)
    changed = np.any(output != image, axis=-1)
    return output, mask & changed  # pure-black pixels cannot darken: they are not part of the anomaly


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as ``uint8`` RGB; raise an error that names the file if it cannot be decoded."""
    array = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if array is None:
        msg = f"Cannot read image file {path}: missing, corrupt or not an image."
        raise ValueError(msg)
    return np.ascontiguousarray(array[..., ::-1])


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask file (any non-zero pixel is foreground); raise an error naming the file if unreadable."""
    array = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if array is None:
        msg = f"Cannot read mask file {path}: missing, corrupt or not an image."
        raise ValueError(msg)
    return array > 0


def images_in(folder: Path) -> list[Path]:
    """Sorted image files (by suffix, case-insensitive) directly inside ``folder``."""
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())


class MaskedImageSource:
    """A folder of images with binary defect/object masks: the source for Poisson cloning and pasted negatives.

    Layouts (detected in this order):

    * MVTec AD category: ``test/<defect>/<stem>.<ext>`` with ``ground_truth/<defect>/<stem>_mask.<ext>`` (``test/good`` skipped);
    * ``images/<stem>.<ext>`` with ``masks/<stem>.<ext>``;
    * side by side: ``<stem>.<ext>`` with ``<stem>_mask.<ext>`` anywhere below ``root``.

    Every image must have its mask and vice versa; the error names the file that lacks its partner.
    """

    LAYOUTS = (
        "MVTec AD (test/<defect>/<stem>.png + ground_truth/<defect>/<stem>_mask.png), "
        "images/<stem>.<ext> + masks/<stem>.<ext>, or side by side <stem>.<ext> + <stem>_mask.<ext>"
    )

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            msg = f"Masked image source {self.root} does not exist or is not a folder. Expected one of: {self.LAYOUTS}."
            raise FileNotFoundError(msg)
        self.pairs = self._find_pairs()
        if not self.pairs:
            msg = f"No images with masks found under {self.root}. Expected one of: {self.LAYOUTS}."
            raise FileNotFoundError(msg)

    def _find_pairs(self) -> list[tuple[Path, Path]]:
        if (self.root / "test").is_dir() and (self.root / "ground_truth").is_dir():
            pairs = []
            for defect_dir in sorted(
                path for path in (self.root / "test").iterdir() if path.is_dir() and path.name != "good"
            ):
                masks_dir = self.root / "ground_truth" / defect_dir.name
                images = images_in(defect_dir)
                masks = images_in(masks_dir) if masks_dir.is_dir() else []
                pairs += self._match(images, masks, lambda stem: f"{stem}_mask", masks_dir)
            return pairs
        if (self.root / "images").is_dir() and (self.root / "masks").is_dir():
            return self._match(
                images_in(self.root / "images"), images_in(self.root / "masks"), str, self.root / "masks"
            )
        pairs = []
        for folder in sorted({path.parent for path in self.root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES}):
            files = images_in(folder)
            masks = [path for path in files if path.stem.endswith("_mask")]
            images = [path for path in files if not path.stem.endswith("_mask")]
            pairs += self._match(images, masks, lambda stem: f"{stem}_mask", folder)
        return pairs

    @staticmethod
    def _match(images: list[Path], masks: list[Path], mask_stem: object, masks_dir: Path) -> list[tuple[Path, Path]]:
        masks_by_stem = {path.stem: path for path in masks}
        pairs = []
        for image in images:
            mask = masks_by_stem.pop(mask_stem(image.stem), None)  # type: ignore[operator]
            if mask is None:
                msg = f"Image {image} has no mask: expected {masks_dir / mask_stem(image.stem)}.<png|bmp|...>."  # type: ignore[operator]
                raise FileNotFoundError(msg)
            pairs.append((image, mask))
        if masks_by_stem:
            orphan = next(iter(masks_by_stem.values()))
            msg = f"Mask {orphan} has no matching image ({len(masks_by_stem)} orphan mask(s) in {masks_dir})."
            raise FileNotFoundError(msg)
        return pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self.pairs[index]
        image, mask = read_rgb(image_path), read_mask(mask_path)
        if image.shape[:2] != mask.shape:
            msg = f"Image {image_path} is {image.shape[1]}x{image.shape[0]} but its mask {mask_path} is {mask.shape[1]}x{mask.shape[0]}."
            raise ValueError(msg)
        if not mask.any():
            msg = f"Mask {mask_path} is empty: it marks no region of {image_path}."
            raise ValueError(msg)
        return image, mask
