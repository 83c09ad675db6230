"""Crack500 datamodule: both releases, the 3x3 unsupervised protocol, the tile cache and the bad-input errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms.v2 import Resize

from anomalib_ext.data import Crack500
from anomalib_ext.data.crack500 import Crack500Dataset, tile_boundaries
from anomalib_ext.data.validation import DatasetLayoutError
from tests.data.dataset_layouts import (
    CRACK500_NAMES,
    CRACK500_SIZE,
    crack500_mask,
    make_crack500_crops,
    make_crack500_full,
)

# Fixture photographs sorted by name: indices 2, 0, 1 (first 3 -> training), then 4, 3 (test); see dataset_layouts.
EXPECTED_COUNTS = {"train_good": 21, "train_crack": 0, "train_crack_excluded": 6, "test_good": 14, "test_crack": 4}


def _setup(root: Path, **kwargs) -> Crack500:
    datamodule = Crack500(root=root, **{"num_train_images": 3, "num_workers": 0, "eval_batch_size": 64, **kwargs})
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


def test_tile_boundaries_cover_every_pixel_once() -> None:
    assert tile_boundaries(2000, 3) == [0, 666, 1333, 2000]
    assert tile_boundaries(1500, 3) == [0, 500, 1000, 1500]
    assert tile_boundaries(31, 3) == [0, 10, 20, 31]
    with pytest.raises(ValueError, match="Cannot cut 2 pixels into 3 tiles"):
        tile_boundaries(2, 3)


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested_traindata"])
def test_protocol_counts_on_full_release(tmp_path: Path, nested: bool) -> None:
    datamodule = _setup(make_crack500_full(tmp_path, nested=nested))
    assert datamodule.tile_counts == EXPECTED_COUNTS
    train = datamodule.train_data.samples
    sorted_names = sorted(CRACK500_NAMES)
    assert set(train.source) == set(sorted_names[:3])
    assert set(datamodule.test_data.samples.source) == set(sorted_names[3:])
    assert (train.label_index == 0).all()
    assert len(datamodule.val_data) == len(datamodule.test_data)  # same_as_test by default


def test_crafted_mask_gives_expected_crack_tiles(tmp_path: Path) -> None:
    """Photograph 0 has crack pixels at (7, 10) -> tile r0c1 (boundary pixel) and (24, 30) -> tile r2c2."""
    root = make_crack500_full(tmp_path)
    train = Crack500Dataset(root, "train", num_train_images=3, train_crack_tiles=True).samples
    tiles = train[train.source == CRACK500_NAMES[0]]
    assert len(tiles) == 9
    crack = {(row, col) for row, col, label in zip(tiles.row, tiles.col, tiles.label_index, strict=True) if label}
    assert crack == {(0, 1), (2, 2)}
    assert tiles.crack_pixels.sum() == 2
    assert sorted(set(tiles.height)) == [8, 9] and sorted(set(tiles.width)) == [10, 11]


def test_tiles_and_masks_are_aligned_crops_of_the_photograph(tmp_path: Path) -> None:
    root = make_crack500_full(tmp_path)
    test = Crack500Dataset(root, "test", num_train_images=3).samples
    assert (test.mask_path != "").sum() == EXPECTED_COUNTS["test_crack"]
    for tile in test.itertuples():
        index = CRACK500_NAMES.index(tile.source)
        photograph = np.asarray(Image.open(root / "traindata" / f"{tile.source}.jpg").convert("RGB"))
        window = np.s_[tile.top : tile.top + tile.height, tile.left : tile.left + tile.width]
        np.testing.assert_array_equal(np.asarray(Image.open(tile.image_path)), photograph[window])
        expected_mask = crack500_mask(index)[window] > 0
        if tile.label_index:
            np.testing.assert_array_equal(np.asarray(Image.open(tile.mask_path)) > 0, expected_mask)
        else:
            assert not expected_mask.any() and tile.mask_path == ""


def test_batches_carry_masks_and_labels(tmp_path: Path) -> None:
    datamodule = _setup(make_crack500_full(tmp_path), test_augmentations=Resize((16, 16)))
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.image.shape == (18, 3, 16, 16)
    crack = batch.gt_label.bool()
    assert crack.sum() == EXPECTED_COUNTS["test_crack"]
    assert all(mask.any() for mask in batch.gt_mask[crack]) and not batch.gt_mask[~crack].any()


def test_train_crack_tiles_option_adds_crack_tiles_with_masks(tmp_path: Path) -> None:
    datamodule = _setup(make_crack500_full(tmp_path), train_crack_tiles=True)
    assert datamodule.tile_counts["train_crack"] == 6 and datamodule.tile_counts["train_crack_excluded"] == 0
    crack = datamodule.train_data.samples.query("label_index == 1")
    assert all(Path(path).is_file() for path in crack.mask_path)


def test_val_from_dir_tiles_the_validation_folder(tmp_path: Path) -> None:
    datamodule = _setup(make_crack500_full(tmp_path), val_split_mode="from_dir")
    assert len(datamodule.val_data) == 18  # 2 valdata photographs x 9 tiles
    assert datamodule.tile_counts["val_crack"] == 3  # photograph 0: 2 crack tiles, photograph 1: 1


def test_crop_release_splits_by_source_photograph(tmp_path: Path) -> None:
    root = make_crack500_crops(tmp_path)
    datamodule = _setup(root, num_train_images=2)
    sources = sorted(CRACK500_NAMES[:3])
    assert set(datamodule.train_data.samples.source) == set(sources[:2])
    assert set(datamodule.test_data.samples.image) == {f"{sources[2]}_1_1.jpg", f"{sources[2]}_321_1.jpg"}
    assert len(datamodule.test_data) == 18


def test_cache_is_reused_and_rebuilt_when_sources_change(tmp_path: Path) -> None:
    root = make_crack500_full(tmp_path)
    Crack500Dataset(root, "train", num_train_images=3)
    marker = root / "anomalib_ext_tiles" / "grid3" / "traindata" / "build.json"
    stamp = marker.stat().st_mtime_ns
    Crack500Dataset(root, "test", num_train_images=2)
    assert marker.stat().st_mtime_ns == stamp
    Image.fromarray(np.full(CRACK500_SIZE, 255, np.uint8)).save(root / "traindata" / f"{CRACK500_NAMES[4]}_mask.png")
    test = Crack500Dataset(root, "test", num_train_images=3).samples
    assert marker.stat().st_mtime_ns != stamp
    assert (test[test.source == CRACK500_NAMES[4]].label_index == 1).all()


def test_grid_size_and_cache_dir_options(tmp_path: Path) -> None:
    root = make_crack500_full(tmp_path / "data")
    samples = Crack500Dataset(root, "test", grid_size=2, num_train_images=3, cache_dir=tmp_path / "cache").samples
    assert len(samples) == 8 and all(path.startswith(str(tmp_path / "cache" / "grid2")) for path in samples.image_path)
    assert not (root / "anomalib_ext_tiles").exists()


def test_missing_root_and_wrong_layout_name_the_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"(?s)nowhere does not exist.*Expected layout.*traindata"):
        _setup(tmp_path / "nowhere")
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"(?s)has no traindata or traincrop folder.*_mask.png"):
        _setup(tmp_path)
    with pytest.raises(DatasetLayoutError, match=r"valdata does not exist"):
        _setup(make_crack500_full(tmp_path / "noval", with_val=False), val_split_mode="from_dir")


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda folder: os.remove(folder / f"{CRACK500_NAMES[1]}_mask.png"), r"image\(s\) without a matching mask"),
        (lambda folder: os.remove(folder / f"{CRACK500_NAMES[1]}.jpg"), r"mask\(s\) without a matching image"),
        (lambda folder: (folder / "notes.txt").write_text("x"), r"unexpected file\(s\) notes.txt"),
        (lambda folder: (folder / "extra.png").write_bytes(b""), r"extra.png should be named <image name>_mask"),
        (lambda folder: (folder / f"{CRACK500_NAMES[1]}.jpg").write_bytes(b"not a jpeg"), r"Cannot read image file"),
        (
            lambda folder: Image.new("L", (5, 5)).save(folder / f"{CRACK500_NAMES[1]}_mask.png"),
            r"Mask .*_mask.png is 5x5 but image .*jpg is 31x25",
        ),
    ],
    ids=["image_without_mask", "mask_without_image", "stray_file", "misnamed_mask", "unreadable", "size_mismatch"],
)
def test_bad_inputs_raise_errors_naming_the_file(tmp_path: Path, breakage, message: str) -> None:
    root = make_crack500_full(tmp_path)
    breakage(root / "traindata")
    with pytest.raises((DatasetLayoutError, ValueError), match=message):
        _setup(root)


def test_too_many_training_images_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"num_train_images=5 must be between 1 and 4"):
        _setup(make_crack500_full(tmp_path), num_train_images=5)


def test_crop_with_unexpected_name_is_an_error(tmp_path: Path) -> None:
    root = make_crack500_crops(tmp_path)
    Image.new("RGB", (31, 25)).save(root / "traincrop" / "photo.jpg")
    Image.new("L", (31, 25)).save(root / "traincrop" / "photo.png")
    with pytest.raises(DatasetLayoutError, match=r"photo.jpg is not named <stem>_<x>_<y>.jpg"):
        _setup(root)
