"""Sources of object-shaped negatives: ADE20K layouts on top of :class:`MaskedImageSource`, and single-object sampling.

DenseHybridAD (Deković et al.) pastes individual ADE20K object masks into normal images. This module reads:

* ADE20K scene parsing (``ADEChallengeData2016``): ``images/{training,validation}/<stem>.jpg`` with
  ``annotations/{training,validation}/<stem>.png`` class maps (0 = unlabelled, 1..150 = classes); one segment = one class;
* full ADE20K (``ADE20K_2021_17_01``): ``<stem>.jpg`` beside ``<stem>_seg.png`` anywhere below the root; the blue channel
  of ``_seg.png`` numbers the object instances (0 = none); one segment = one instance;
* any :class:`~anomalib_ext.components.synthetic.MaskedImageSource` layout (MVTec AD, ``images/`` + ``masks/``, side by
  side ``<stem>_mask.png``); one segment = one connected component of the binary mask.

:class:`SegmentSource` draws one segment at random: ``sample(rng) -> (image, mask)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from anomalib_ext.components.synthetic import MaskedImageSource, images_in, read_rgb

ADE20KSplit = Literal["training", "validation"]
ADE20K_SPLITS: tuple[str, ...] = ("training", "validation")
FULL_ADE20K_SEG_SUFFIX = "_seg"


def read_label_map(path: str | Path, instance_encoding: bool = False) -> np.ndarray:
    """Read an integer label map: a single-channel class map, or (``instance_encoding``) the blue channel of an ADE20K
    ``_seg.png`` (instance ids). Raises an error naming the file if it cannot be decoded."""
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None:
        msg = f"Cannot read label map {path}: missing, corrupt or not an image."
        raise ValueError(msg)
    if instance_encoding:
        if array.ndim != 3:
            msg = f"{path} is not an RGB ADE20K _seg.png (expected instance ids in the blue channel)."
            raise ValueError(msg)
        return array[..., 0].astype(np.int32)  # OpenCV reads BGR: channel 0 is blue
    if array.ndim == 3:
        array = array[..., 0]
    return array.astype(np.int32)


def is_ade20k(root: str | Path) -> bool:
    """Whether ``root`` holds an ADE20K scene-parsing or full ADE20K layout."""
    root = Path(root).expanduser()
    if (root / "images").is_dir() and (root / "annotations").is_dir():
        return any((root / "images" / split).is_dir() for split in ADE20K_SPLITS)
    return root.is_dir() and next(root.rglob(f"*{FULL_ADE20K_SEG_SUFFIX}.png"), None) is not None


class ADE20KSource(MaskedImageSource):
    """ADE20K as a masked image source; :meth:`label_map` gives per-segment ids (classes or instances).

    ``source[i]`` follows the :class:`MaskedImageSource` contract: the image and the mask of all labelled pixels.

    Args:
        root: an ``ADEChallengeData2016`` folder or a full ADE20K folder (or any folder below it).
        split: ``"training"`` or ``"validation"`` (scene-parsing layout only; the full layout uses every ``_seg.png``).
    """

    LAYOUTS = (
        "ADE20K scene parsing (images/<split>/<stem>.jpg + annotations/<split>/<stem>.png) or "
        "full ADE20K (<stem>.jpg + <stem>_seg.png)"
    )

    def __init__(self, root: str | Path, split: ADE20KSplit = "training") -> None:
        if split not in ADE20K_SPLITS:
            msg = f"Unknown ADE20K split {split!r}; expected one of {ADE20K_SPLITS}."
            raise ValueError(msg)
        self.split = split
        self.instance_encoding = False
        super().__init__(root)

    def _find_pairs(self) -> list[tuple[Path, Path]]:
        images_dir, labels_dir = self.root / "images" / self.split, self.root / "annotations" / self.split
        if images_dir.is_dir() or labels_dir.is_dir():
            if not (images_dir.is_dir() and labels_dir.is_dir()):
                msg = f"ADE20K scene-parsing layout under {self.root} needs both {images_dir} and {labels_dir}."
                raise FileNotFoundError(msg)
            return self._match(images_in(images_dir), images_in(labels_dir), str, labels_dir)
        self.instance_encoding = True
        pairs = []
        for seg in sorted(self.root.rglob(f"*{FULL_ADE20K_SEG_SUFFIX}.png")):
            stem = seg.stem.removesuffix(FULL_ADE20K_SEG_SUFFIX)
            image = next(
                (seg.with_name(stem + suffix) for suffix in (".jpg", ".png") if seg.with_name(stem + suffix).is_file()),
                None,
            )
            if image is None:
                msg = f"ADE20K segmentation {seg} has no image: expected {seg.with_name(stem + '.jpg')}."
                raise FileNotFoundError(msg)
            pairs.append((image, seg))
        return pairs

    def label_map(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image [H, W, 3] uint8 and its integer segment ids [H, W] (0 = unlabelled)."""
        image_path, label_path = self.pairs[index]
        image, labels = read_rgb(image_path), read_label_map(label_path, self.instance_encoding)
        if image.shape[:2] != labels.shape:
            msg = f"Image {image_path} is {image.shape[1]}x{image.shape[0]} but {label_path} is {labels.shape[1]}x{labels.shape[0]}."
            raise ValueError(msg)
        return image, labels

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, labels = self.label_map(index)
        if not labels.any():
            msg = f"Label map {self.pairs[index][1]} has no labelled pixel."
            raise ValueError(msg)
        return image, labels > 0


class SegmentSource:
    """Draws single object masks from a folder: ADE20K segments or connected components of binary masks.

    Args:
        root: an ADE20K folder (see :class:`ADE20KSource`) or any :class:`MaskedImageSource` layout.
        split: ADE20K scene-parsing split.
        min_area_fraction: segments smaller than this fraction of their image are skipped (the largest segment is used
            when none is big enough).
    """

    def __init__(self, root: str | Path, split: ADE20KSplit = "training", min_area_fraction: float = 0.005) -> None:
        self.source = ADE20KSource(root, split) if is_ade20k(root) else MaskedImageSource(root)
        self.min_area_fraction = min_area_fraction

    def __len__(self) -> int:
        return len(self.source)

    def segments(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image and integer segment ids (0 = background) of item ``index``."""
        if isinstance(self.source, ADE20KSource):
            return self.source.label_map(index)
        image, mask = self.source[index]
        _, components = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        return image, components

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A random image and the bool mask of one of its segments."""
        index = int(rng.integers(len(self.source)))
        image, labels = self.segments(index)
        ids, areas = np.unique(labels[labels > 0], return_counts=True)
        if ids.size == 0:
            msg = f"Mask {self.source.pairs[index][1]} of the negative source marks no pixel."
            raise ValueError(msg)
        large = ids[areas >= self.min_area_fraction * labels.size]
        chosen = rng.choice(large) if large.size else ids[np.argmax(areas)]
        return image, labels == chosen
