"""Crack500 (Yang et al. 2019) with the unsupervised 3 x 3 tiling protocol of Marc et al. (EUSIPCO 2024, Sec. III-A.2).

Crack500 was made for supervised segmentation: every image shows a crack. The protocol makes it usable for
unsupervised anomaly detection:

1. every image of the training folder is cut into a ``grid_size`` x ``grid_size`` grid (3 x 3 in the paper);
2. a tile is **normal** when its mask has no crack pixel (no mask value > 0, the rule Anomalib's ``read_mask`` uses for
   the pixel ground truth), otherwise it is a **crack** tile;
3. the first ``num_train_images`` images (150 in the paper, sorted by file name) give the **training** tiles: only
   their normal tiles are used unless ``train_crack_tiles=True`` (the paper's supervised comparison trains on all
   of them); the remaining images (100) give the **test** tiles, normal and crack, with their masks.

Rounding rule for sizes not divisible by the grid: tile boundaries along an axis of ``n`` pixels are
``floor(k * n / grid_size)`` for ``k = 0 .. grid_size``. The tiles cover every pixel exactly once (no crack pixel is
lost) and their sizes differ by at most one pixel (2000 px -> 666, 667, 667). Models resize their input anyway.

The paper reports 613 normal / 744 crack tiles for the first 150 images, which is 1357 tiles, not 150 x 9 = 1350;
the datamodule logs the counts it gets and keeps them in ``Crack500.tile_counts``.

Two releases are read (chosen with ``release``; ``"auto"`` prefers the full-resolution one when both are present)::

    full:  <root>/traindata/<date>_<time>.jpg + <date>_<time>_mask.png    (also <root>/traindata/traindata/...)
           <root>/valdata/...   <root>/testdata/...
    crop:  <root>/traincrop/<stem>_<x>_<y>.jpg + <stem>_<x>_<y>.png        (640 x 360 crops)
           <root>/valcrop/...   <root>/testcrop/...

In the crop release the first ``num_train_images`` *source photographs* (crops grouped by ``<stem>``) are the
training images, so crops of one photograph never fall on both sides of the split.

Tiles are cut once and cached as PNG (lossless) with a ``tiles.csv`` manifest under
``<cache_dir>/grid<g>/<folder>/`` (default ``cache_dir``: ``<root>/anomalib_ext_tiles``); the cache is rebuilt when the
source folder's files or the grid change.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from anomalib.data import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName, Split, TestSplitMode, ValSplitMode
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import Transform

from anomalib_ext.data.validation import DatasetLayoutError, folder_entries, list_files, pair_images_with_masks

logger = logging.getLogger(__name__)

RELEASE_FOLDERS = {
    "full": {"train": "traindata", "val": "valdata", "test": "testdata"},
    "crop": {"train": "traincrop", "val": "valcrop", "test": "testcrop"},
}
MASK_SUFFIX = {"full": "_mask", "crop": ""}
CACHE_VERSION = 1
MANIFEST = "tiles.csv"
BUILD_MARKER = "build.json"
EXPECTED_LAYOUT = """full-resolution release:
  <root>/traindata/<stem>.jpg + <stem>_mask.png   (or <root>/traindata/traindata/...)
  <root>/valdata/...                              (only needed with val_split_mode=from_dir)
crop release:
  <root>/traincrop/<stem>_<x>_<y>.jpg + <stem>_<x>_<y>.png
  <root>/valcrop/...                              (only needed with val_split_mode=from_dir)"""


def tile_boundaries(size: int, grid_size: int) -> list[int]:
    """Tile edges along an axis of ``size`` pixels: ``floor(k * size / grid_size)``, ``k = 0 .. grid_size``."""
    if grid_size < 1 or size < grid_size:
        msg = f"Cannot cut {size} pixels into {grid_size} tiles."
        raise ValueError(msg)
    return [(k * size) // grid_size for k in range(grid_size + 1)]


def detect_release(root: Path, release: str = "auto") -> str:
    """``"full"`` or ``"crop"``: the requested release, or with ``"auto"`` the one present (full first)."""
    if not root.is_dir():
        msg = f"Crack500 root {root} does not exist or is not a folder. Expected layout:\n{EXPECTED_LAYOUT}"
        raise DatasetLayoutError(msg)
    candidates = list(RELEASE_FOLDERS) if release == "auto" else [release]
    if release not in {"auto", *RELEASE_FOLDERS}:
        msg = f"Unknown Crack500 release {release!r}; choose auto, full or crop."
        raise ValueError(msg)
    for candidate in candidates:
        if (root / RELEASE_FOLDERS[candidate]["train"]).is_dir():
            return candidate
    wanted = " or ".join(RELEASE_FOLDERS[candidate]["train"] for candidate in candidates)
    msg = f"Crack500 root {root} has no {wanted} folder. Expected layout:\n{EXPECTED_LAYOUT}"
    raise DatasetLayoutError(msg)


def split_folder(root: Path, release: str, split: str) -> Path:
    """The folder of ``split`` (train/val/test) in ``release``, unwrapping a nested ``traindata/traindata/``."""
    folder = root / RELEASE_FOLDERS[release][split]
    if (folder / folder.name).is_dir():
        beside = [path.name for path in folder_entries(folder, "Crack500") if path.name != folder.name]
        if beside:
            msg = (
                f"Crack500: {folder} holds both the nested folder {folder.name}/ and {', '.join(beside[:5])}"
                f"{' ...' if len(beside) > 5 else ''}; only one copy is read. Keep either the files or the nested "
                f"folder. Expected layout:\n{EXPECTED_LAYOUT}"
            )
            raise DatasetLayoutError(msg)
        folder = folder / folder.name
    if not folder.is_dir():
        msg = f"Crack500: folder {folder} does not exist. Expected layout:\n{EXPECTED_LAYOUT}"
        raise DatasetLayoutError(msg)
    return folder


def source_name(image: Path, release: str) -> str:
    """Name of the photograph an image comes from: its stem (full release) or ``<stem>`` of ``<stem>_<x>_<y>`` (crops)."""
    if release == "full":
        return image.stem
    parts = image.stem.rsplit("_", 2)
    if len(parts) != 3 or not (parts[1].isdigit() and parts[2].isdigit()):
        msg = f"Crack500 crop {image} is not named <stem>_<x>_<y>.jpg. Expected layout:\n{EXPECTED_LAYOUT}"
        raise DatasetLayoutError(msg)
    return parts[0]


def _read(path: Path, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode))
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        msg = f"Cannot read image file {path}: {error}"
        raise ValueError(msg) from error


def _cache_signature(pairs: list[tuple[Path, Path]], grid_size: int) -> dict:
    files = [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for pair in pairs for path in pair]
    return {"version": CACHE_VERSION, "grid_size": grid_size, "files": files}


def build_tile_cache(folder: Path, release: str, grid_size: int, cache_dir: Path) -> pd.DataFrame:
    """Cut every image of ``folder`` into tiles (cached under ``cache_dir``) and return the tile manifest.

    Manifest columns: ``source`` (photograph), ``image`` (source file), ``row``, ``col``, ``top``, ``left``,
    ``height``, ``width``, ``crack_pixels``, ``image_path`` and ``mask_path`` (``""`` for normal tiles).
    The cache is reused when it was built from the same files (names, sizes, modification times) with the same grid.
    """
    pairs = pair_images_with_masks(*_images_and_masks(folder), MASK_SUFFIX[release], "Crack500", EXPECTED_LAYOUT)
    if not pairs:
        msg = f"Crack500: {folder} holds no images. Expected layout:\n{EXPECTED_LAYOUT}"
        raise DatasetLayoutError(msg)
    signature = _cache_signature(pairs, grid_size)
    marker, manifest_file = cache_dir / BUILD_MARKER, cache_dir / MANIFEST
    if marker.is_file() and manifest_file.is_file() and json.loads(marker.read_text()) == signature:
        manifest = _with_absolute_paths(pd.read_csv(manifest_file, keep_default_na=False), cache_dir)
        if all(Path(path).is_file() for path in (*manifest.image_path, *filter(None, manifest.mask_path))):
            return manifest
    logger.info(
        "Crack500: cutting %d images of %s into %dx%d tiles, cached in %s",
        len(pairs),
        folder,
        grid_size,
        grid_size,
        cache_dir,
    )
    staging = cache_dir.with_name(f".{cache_dir.name}.building")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    (staging / "masks").mkdir()
    rows = []
    for image_file, mask_file in pairs:
        image, crack = _read(image_file, "RGB"), _read(mask_file, "L") > 0
        if image.shape[:2] != crack.shape:
            msg = f"Mask {mask_file} is {crack.shape[1]}x{crack.shape[0]} but image {image_file} is {image.shape[1]}x{image.shape[0]}."
            raise ValueError(msg)
        tops, lefts = tile_boundaries(image.shape[0], grid_size), tile_boundaries(image.shape[1], grid_size)
        for row in range(grid_size):
            for col in range(grid_size):
                window = np.s_[tops[row] : tops[row + 1], lefts[col] : lefts[col + 1]]
                name = f"{image_file.stem}_r{row}c{col}"
                Image.fromarray(image[window]).save(staging / "images" / f"{name}.png", compress_level=1)
                crack_pixels = int(crack[window].sum())
                mask_name = f"masks/{name}_mask.png" if crack_pixels else ""
                if crack_pixels:
                    Image.fromarray(crack[window].astype(np.uint8) * 255).save(staging / mask_name, compress_level=1)
                rows.append(
                    {
                        "source": source_name(image_file, release),
                        "image": image_file.name,
                        "row": row,
                        "col": col,
                        "top": tops[row],
                        "left": lefts[col],
                        "height": tops[row + 1] - tops[row],
                        "width": lefts[col + 1] - lefts[col],
                        "crack_pixels": crack_pixels,
                        "image_path": f"images/{name}.png",
                        "mask_path": mask_name,
                    }
                )
    manifest = pd.DataFrame(rows)
    manifest.to_csv(staging / MANIFEST, index=False)
    (staging / BUILD_MARKER).write_text(json.dumps(signature))
    shutil.rmtree(cache_dir, ignore_errors=True)
    staging.rename(cache_dir)
    return _with_absolute_paths(manifest, cache_dir)


def _with_absolute_paths(manifest: pd.DataFrame, cache_dir: Path) -> pd.DataFrame:
    manifest["image_path"] = [str(cache_dir / name) for name in manifest.image_path]
    manifest["mask_path"] = [str(cache_dir / name) if name else "" for name in manifest.mask_path]
    return manifest


def _images_and_masks(folder: Path) -> tuple[list[Path], list[Path]]:
    files = list_files(folder, {".jpg", ".png"}, "Crack500", EXPECTED_LAYOUT)
    return [path for path in files if path.suffix.lower() == ".jpg"], [
        path for path in files if path.suffix.lower() == ".png"
    ]


def make_crack500_dataset(
    root: Path,
    split: str | Split,
    release: str = "auto",
    grid_size: int = 3,
    num_train_images: int = 150,
    train_crack_tiles: bool = False,
    cache_dir: Path | None = None,
) -> pd.DataFrame:
    """Tile samples of one split under the protocol described in the module docstring.

    ``split``: ``"train"`` (normal tiles of the first ``num_train_images`` photographs, plus their crack tiles when
    ``train_crack_tiles``), ``"test"`` (all tiles of the other training photographs) or ``"val"`` (all tiles of the
    release's validation folder). Extra columns: ``source``, ``row``, ``col`` and the tile box. For the train split,
    ``attrs["excluded_crack_tiles"]`` counts the crack tiles left out (0 with ``train_crack_tiles``).
    """
    split = Split(split).value
    release = detect_release(root, release)
    folder = split_folder(root, release, "val" if split == "val" else "train")
    cache_dir = Path(cache_dir) if cache_dir is not None else root / "anomalib_ext_tiles"
    tiles = build_tile_cache(folder, release, grid_size, cache_dir / f"grid{grid_size}" / folder.name)
    tiles["label_index"] = np.where(tiles.crack_pixels > 0, int(LabelName.ABNORMAL), int(LabelName.NORMAL))
    tiles["label"] = np.where(tiles.crack_pixels > 0, "crack", "good")
    tiles["split"] = split
    if split != "val":
        sources = sorted(tiles.source.unique())
        if not 0 < num_train_images < len(sources):
            msg = (
                f"Crack500: num_train_images={num_train_images} must be between 1 and {len(sources) - 1}: {folder} "
                f"holds {len(sources)} photographs, and the ones after the first num_train_images form the test set."
            )
            raise ValueError(msg)
        in_train = tiles.source.isin(sources[:num_train_images])
        is_crack = tiles.label_index == LabelName.ABNORMAL
        excluded = 0 if split == "test" or train_crack_tiles else int((in_train & is_crack).sum())
        keep = ~in_train if split == "test" else in_train & (train_crack_tiles | ~is_crack)
        tiles = tiles[keep].reset_index(drop=True)
        tiles.attrs["excluded_crack_tiles"] = excluded
    tiles.attrs["task"] = "segmentation"
    tiles.attrs["description"] = f"{release} release, {folder}, {grid_size}x{grid_size} grid"
    return tiles


class Crack500Dataset(AnomalibDataset):
    """Tiles of one split of Crack500 under the unsupervised protocol (see the module docstring).

    Args:
        root: Crack500 root (holding ``traindata/`` or ``traincrop/``).
        split: ``"train"``, ``"test"`` or ``"val"``.
        release: ``"auto"``, ``"full"`` or ``"crop"``.
        grid_size: tiles per side (3 in the paper).
        num_train_images: the first photographs (sorted by name) that give the training tiles (150 in the paper).
        train_crack_tiles: also train on the crack tiles of those photographs (supervised comparison).
        cache_dir: where tiles are cached; defaults to ``<root>/anomalib_ext_tiles``.
        augmentations: augmentations applied to image (and mask).
    """

    def __init__(
        self,
        root: Path | str = "./datasets/Crack500",
        split: str | Split = Split.TRAIN,
        release: Literal["auto", "full", "crop"] = "auto",
        grid_size: int = 3,
        num_train_images: int = 150,
        train_crack_tiles: bool = False,
        cache_dir: Path | str | None = None,
        augmentations: Transform | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        self.split = split
        self.samples = make_crack500_dataset(
            Path(root), split, release, grid_size, num_train_images, train_crack_tiles, cache_dir
        )


class Crack500(AnomalibDataModule):
    """Crack500 datamodule implementing the unsupervised 3 x 3 tiling protocol of Marc et al. (2024).

    Trains on the normal tiles of the first ``num_train_images`` training photographs and tests on all tiles of the
    rest (see the module docstring for the protocol, the rounding rule and the cache). With
    ``val_split_mode="from_dir"`` the validation set is the tiled ``valdata/`` (``valcrop/``) folder.

    Args:
        root: Crack500 root (holding ``traindata/`` or ``traincrop/``).
        release: ``"auto"`` (full-resolution release if present, else crops), ``"full"`` or ``"crop"``.
        grid_size: tiles per side (3 in the paper).
        num_train_images: first photographs (sorted by name) giving the training tiles (150 in the paper).
        train_crack_tiles: add their crack tiles (with masks, label 1) to the training set, as the paper's
            supervised comparison does. Off for the unsupervised protocol.
        cache_dir: tile cache; defaults to ``<root>/anomalib_ext_tiles`` (pass another folder for a read-only root).
        train_batch_size, eval_batch_size, num_workers, *_augmentations, test_split_mode, test_split_ratio,
        val_split_mode, val_split_ratio, seed: as in Anomalib's :class:`~anomalib.data.MVTecAD`.
    """

    def __init__(
        self,
        root: Path | str = "./datasets/Crack500",
        release: Literal["auto", "full", "crop"] = "auto",
        grid_size: int = 3,
        num_train_images: int = 150,
        train_crack_tiles: bool = False,
        cache_dir: Path | str | None = None,
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
        self.root = Path(root)
        self.protocol = {
            "release": release,
            "grid_size": grid_size,
            "num_train_images": num_train_images,
            "train_crack_tiles": train_crack_tiles,
            "cache_dir": cache_dir,
        }
        self.tile_counts: dict[str, int] = {}

    def _splits(self) -> list[Split]:
        return [Split.TRAIN, Split.TEST] + ([Split.VAL] if self.val_split_mode == ValSplitMode.FROM_DIR else [])

    def prepare_data(self) -> None:
        """Cut and cache the tiles (once; later runs reuse the cache)."""
        for split in self._splits():
            make_crack500_dataset(self.root, split, **self.protocol)

    def _setup(self, _stage: str | None = None) -> None:
        datasets = {split.value: Crack500Dataset(self.root, split, **self.protocol) for split in self._splits()}
        self.train_data, self.test_data = datasets["train"], datasets["test"]
        if "val" in datasets:
            self.val_data = datasets["val"]
        self.tile_counts = {
            f"{split}_{label}": int((dataset.samples.label == label).sum())
            for split, dataset in datasets.items()
            for label in ("good", "crack")
        }
        self.tile_counts["train_crack_excluded"] = self.train_data.samples.attrs["excluded_crack_tiles"]
        counts = self.tile_counts
        logger.info(
            "Crack500 (%s, first %d photographs for training): train %d normal + %d crack tiles (%d crack tiles left "
            "out), test %d normal + %d crack tiles%s",
            self.train_data.samples.attrs["description"],
            self.protocol["num_train_images"],
            counts["train_good"],
            counts["train_crack"],
            counts["train_crack_excluded"],
            counts["test_good"],
            counts["test_crack"],
            f", validation {counts['val_good']} normal + {counts['val_crack']} crack tiles"
            if "val" in datasets
            else "",
        )
