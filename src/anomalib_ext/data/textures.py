"""Embedded demo dataset: pavement and masonry textures with synthetic defects, built offline in MVTec AD layout.

The two source photographs ship with scikit-image (``skimage.data.gravel`` and ``skimage.data.brick``, 512 x 512 grayscale),
so the dataset needs no download. Each photograph is split into two disjoint horizontal bands:

* the top 62.5 % gives the **training** tiles (normal only);
* the bottom band gives the **test** tiles: normal tiles and tiles with synthetic defects (``crack``: a thin dark stroke,
  ``cutpaste``: CutPaste normal/scar, ``blend``: a random shape of the other photograph cloned with Poisson blending).

The build is deterministic (seeded per category; identical bytes for identical parameters) and cached on disk under
``root/<category>``, written in MVTec AD's layout, so ``MVTecAD(root=..., category=...)`` reads it as well::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/{good,crack,cutpaste,blend}/000.png
    <root>/<category>/ground_truth/{crack,cutpaste,blend}/000_mask.png
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import cv2
import numpy as np
import skimage.data
from anomalib.data import AnomalibDataModule
from anomalib.data.datasets.image.mvtecad import MVTecADDataset
from anomalib.data.utils import Split, TestSplitMode, ValSplitMode
from torchvision.transforms.v2 import Transform

from anomalib_ext.components.synthetic import crack_stroke, cut_paste, poisson_clone, random_shape_mask
from anomalib_ext.data.validation import check_images_readable, require_paths

CATEGORIES = ("gravel", "brick")
DEFECT_TYPES = ("crack", "cutpaste", "blend")
TRAIN_BAND_FRACTION = 0.625
BUILD_MARKER = "build.json"
EXPECTED_LAYOUT = """<root>/<category>/train/good/*.png
<root>/<category>/test/good/*.png
<root>/<category>/test/<defect>/*.png          (defect in crack, cutpaste, blend)
<root>/<category>/ground_truth/<defect>/*_mask.png
(built automatically by Textures.prepare_data(); category in gravel, brick)"""


def load_photograph(category: str) -> np.ndarray:
    """The scikit-image photograph behind ``category`` as an RGB ``uint8`` array."""
    if category not in CATEGORIES:
        msg = f"Unknown Textures category {category!r}; choose one of {CATEGORIES}."
        raise ValueError(msg)
    gray = getattr(skimage.data, category)()
    return np.repeat(gray[..., None], 3, axis=2)


def _tile_origins(rows: tuple[int, int], width: int, tile_size: int) -> list[tuple[int, int]]:
    """Top-left corners of tiles on a grid with stride ``tile_size // 4`` inside the band ``rows``."""
    stride = max(1, tile_size // 4)
    tops = range(rows[0], rows[1] - tile_size + 1, stride)
    lefts = range(0, width - tile_size + 1, stride)
    return [(top, left) for top in tops for left in lefts]


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = array[..., ::-1] if array.ndim == 3 else array
    if not cv2.imwrite(str(path), np.ascontiguousarray(data)):
        msg = f"Could not write {path}."
        raise OSError(msg)


def build_textures_category(
    root: Path,
    category: str,
    tile_size: int = 128,
    num_train: int = 64,
    num_test_normal: int = 16,
    num_test_defect: int = 8,
    seed: int = 0,
) -> Path:
    """Write one category of the dataset under ``root/category`` and return that folder.

    Args:
        root: dataset root.
        category: ``gravel`` or ``brick``.
        tile_size: side of the square tiles in pixels.
        num_train: number of normal training tiles (sampled without replacement from the training band's grid).
        num_test_normal: number of normal test tiles.
        num_test_defect: number of test tiles per defect type.
        seed: base seed; the category name is mixed in so categories differ.
    """
    photograph = load_photograph(category)
    donor = load_photograph(next(other for other in CATEGORIES if other != category))
    height, width = photograph.shape[:2]
    split_row = int(height * TRAIN_BAND_FRACTION)
    if tile_size > min(split_row, height - split_row):
        msg = f"tile_size {tile_size} does not fit the train ({split_row} px) and test ({height - split_row} px) bands."
        raise ValueError(msg)
    rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
    train_origins = _tile_origins((0, split_row), width, tile_size)
    test_origins = _tile_origins((split_row, height), width, tile_size)
    if num_train > len(train_origins):
        msg = f"num_train={num_train} exceeds the {len(train_origins)} distinct training tiles of size {tile_size}."
        raise ValueError(msg)

    def tile(origin: tuple[int, int], source: np.ndarray = photograph) -> np.ndarray:
        top, left = origin
        return source[top : top + tile_size, left : left + tile_size]

    category_dir = root / category
    staging = root / f".{category}.building"
    shutil.rmtree(staging, ignore_errors=True)
    for number, index in enumerate(rng.choice(len(train_origins), size=num_train, replace=False)):
        _write_png(staging / "train" / "good" / f"{number:03d}.png", tile(train_origins[index]))
    for number, index in enumerate(rng.choice(len(test_origins), size=num_test_normal, replace=False)):
        _write_png(staging / "test" / "good" / f"{number:03d}.png", tile(test_origins[index]))
    donor_origins = _tile_origins((0, height), width, tile_size)
    for defect in DEFECT_TYPES:
        for number in range(num_test_defect):
            clean = tile(test_origins[rng.integers(len(test_origins))])
            if defect == "crack":
                image, mask = crack_stroke(clean, rng)
            elif defect == "cutpaste":
                image, mask = cut_paste(clean, rng, variant="scar" if number % 2 else "normal")
            else:
                donor_tile = tile(donor_origins[rng.integers(len(donor_origins))], donor)
                image, mask = poisson_clone(clean, donor_tile, random_shape_mask(clean.shape[:2], rng), rng)
            _write_png(staging / "test" / defect / f"{number:03d}.png", image)
            _write_png(staging / "ground_truth" / defect / f"{number:03d}_mask.png", mask.astype(np.uint8) * 255)
    shutil.rmtree(category_dir, ignore_errors=True)
    staging.rename(category_dir)
    return category_dir


class Textures(AnomalibDataModule):
    """Embedded demo datamodule: gravel (pavement) and brick (masonry) tiles with synthetic defects.

    The first :meth:`prepare_data` builds ``root/category`` (a few seconds, no download); later runs reuse it unless the
    build parameters change. See the module docstring for the layout.

    Args:
        root: dataset root. Defaults to ``"./datasets/Textures"``.
        category: ``"gravel"`` or ``"brick"``.
        tile_size: tile side in pixels.
        num_train: normal training tiles.
        num_test_normal: normal test tiles.
        num_test_defect: test tiles per defect type (crack, cutpaste, blend).
        build_seed: seed of the dataset build (not of the train/val split).
        train_batch_size, eval_batch_size, num_workers, *_augmentations, test_split_mode, test_split_ratio,
        val_split_mode, val_split_ratio, seed: as in Anomalib's :class:`~anomalib.data.MVTecAD`.
    """

    def __init__(
        self,
        root: Path | str = "./datasets/Textures",
        category: str = "gravel",
        tile_size: int = 128,
        num_train: int = 64,
        num_test_normal: int = 16,
        num_test_defect: int = 8,
        build_seed: int = 0,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        test_split_mode: TestSplitMode | str = TestSplitMode.FROM_DIR,
        test_split_ratio: float = 0.2,
        val_split_mode: ValSplitMode | str = ValSplitMode.SAME_AS_TEST,
        val_split_ratio: float = 0.5,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=test_split_mode,
            test_split_ratio=test_split_ratio,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        load_photograph(category)  # fail early on an unknown category
        self.root = Path(root)
        self.category = category
        self.build_parameters = {
            "category": category,
            "tile_size": tile_size,
            "num_train": num_train,
            "num_test_normal": num_test_normal,
            "num_test_defect": num_test_defect,
            "seed": build_seed,
        }

    @property
    def category_dir(self) -> Path:
        return self.root / self.category

    def _built_parameters(self) -> dict | None:
        marker = self.category_dir / BUILD_MARKER
        return json.loads(marker.read_text()) if marker.is_file() else None

    def prepare_data(self) -> None:
        """Build ``root/category`` unless it already holds a build with the same parameters."""
        if self._built_parameters() == self.build_parameters:
            return
        if self.category_dir.exists() and self._built_parameters() is None:
            msg = (
                f"{self.category_dir} exists but was not built by Textures (no {BUILD_MARKER}); refusing to overwrite it. "
                "Choose another root or delete the folder."
            )
            raise FileExistsError(msg)
        build_textures_category(self.root, **self.build_parameters)
        (self.category_dir / BUILD_MARKER).write_text(json.dumps(self.build_parameters, sort_keys=True))

    def _setup(self, _stage: str | None = None) -> None:
        required = ["train/good", "test/good", *(f"test/{defect}" for defect in DEFECT_TYPES)]
        required += [f"ground_truth/{defect}" for defect in DEFECT_TYPES]
        require_paths(self.category_dir, required, "Textures", EXPECTED_LAYOUT)
        self.train_data = MVTecADDataset(split=Split.TRAIN, root=self.root, category=self.category)
        self.test_data = MVTecADDataset(split=Split.TEST, root=self.root, category=self.category)
        check_images_readable(self.train_data.samples.image_path)
        check_images_readable(self.test_data.samples.image_path)
        check_images_readable(path for path in self.test_data.samples.mask_path if path)
