"""BeanTech (BTAD) datamodule: bmp/png in any mix, masks paired by stem, bad-input errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_ext.data import BeanTech
from anomalib_ext.data.validation import DatasetLayoutError
from tests.data.dataset_layouts import BEANTECH_COUNTS, BEANTECH_EXTENSIONS, BEANTECH_SIZE, beantech_mask, make_beantech


def _setup(root: Path, category: str = "01", **kwargs) -> BeanTech:
    datamodule = BeanTech(root=root, category=category, num_workers=0, eval_batch_size=16, **kwargs)
    datamodule.setup()
    return datamodule


@pytest.fixture(scope="module")
def beantech_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_beantech(tmp_path_factory.mktemp("btad"))


@pytest.mark.parametrize("category", list(BEANTECH_EXTENSIONS))
def test_each_category_reads_with_its_release_extensions(beantech_root: Path, category: str) -> None:
    datamodule = _setup(beantech_root, category)
    image_ext, mask_ext = BEANTECH_EXTENSIONS[category]
    train, test = datamodule.train_data.samples, datamodule.test_data.samples
    assert len(train) == BEANTECH_COUNTS["train/ok"] and (train.label_index == 0).all()
    assert (test.label_index == 0).sum() == BEANTECH_COUNTS["test/ok"]
    defective = test[test.label_index == 1]
    assert len(defective) == BEANTECH_COUNTS["test/ko"]
    assert all(path.endswith(f".{image_ext}") for path in test.image_path)
    assert all(path.endswith(f".{mask_ext}") for path in defective.mask_path)
    assert all(
        Path(image).stem == Path(mask).stem
        for image, mask in zip(defective.image_path, defective.mask_path, strict=True)
    )


def test_batches_have_masks_aligned_with_images(beantech_root: Path) -> None:
    batch = next(iter(_setup(beantech_root, "03").test_dataloader()))
    assert batch.image.shape == (4, 3, BEANTECH_SIZE, BEANTECH_SIZE)
    for path, label, mask in zip(batch.image_path, batch.gt_label, batch.gt_mask, strict=True):
        expected = beantech_mask(int(Path(path).stem)) if label else np.zeros_like(beantech_mask(0))
        np.testing.assert_array_equal(mask.numpy().astype(bool), expected)


def test_mixed_extensions_in_one_category(tmp_path: Path) -> None:
    root = make_beantech(tmp_path)
    ko, masks = root / "02" / "test" / "ko", root / "02" / "ground_truth" / "ko"
    Image.open(ko / "0000.png").save(ko / "0000.bmp")
    os.remove(ko / "0000.png")
    Image.open(masks / "0001.png").save(masks / "0001.BMP")
    os.remove(masks / "0001.png")
    defective = _setup(root, "02").test_data.samples.query("label_index == 1")
    assert sorted(Path(path).name for path in defective.image_path) == ["0000.bmp", "0001.png"]
    assert sorted(Path(path).name for path in defective.mask_path) == ["0000.png", "0001.BMP"]


def test_missing_root_and_wrong_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"(?s)nowhere does not exist.*Expected layout.*ground_truth/ko"):
        _setup(tmp_path / "nowhere")
    make_beantech(tmp_path / "btad")
    with pytest.raises(DatasetLayoutError, match=r"no category folder '04' \(found: 01, 02, 03\)"):
        _setup(tmp_path / "btad", "04")
    (tmp_path / "01" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match=r"(?s)lacks train/ok, test/ok.*Expected layout"):
        _setup(tmp_path)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (
            lambda category: os.remove(category / "ground_truth/ko/0001.png"),
            r"image\(s\) without a matching mask.*0001",
        ),
        (lambda category: os.remove(category / "test/ko/0001.bmp"), r"mask\(s\) without a matching image.*0001"),
        (
            lambda category: Image.open(category / "test/ko/0000.bmp").save(category / "test/ko/0000.png"),
            r"two images share the name 0000",
        ),
        (lambda category: (category / "train/ok/0000.bmp").write_bytes(b"BM broken"), r"Cannot read image file"),
        (lambda category: (category / "train/ok/readme.txt").write_text("x"), r"unexpected file\(s\) readme.txt"),
        (lambda category: Image.new("L", (5, 7)).save(category / "ground_truth/ko/0000.png"), r"is 5x7 but image"),
        (lambda category: (category / "ground_truth/scratch").mkdir(), r"ground_truth/scratch has no counterpart"),
        (lambda category: (category / "test/scratch").mkdir(), r"test/scratch has no counterpart"),
    ],
    ids=["no_mask", "no_image", "bmp_and_png_twins", "unreadable", "stray", "size", "mask_folder_only", "test_only"],
)
def test_bad_inputs_raise_errors_naming_the_file(tmp_path: Path, breakage, message: str) -> None:
    root = make_beantech(tmp_path)
    breakage(root / "01")
    with pytest.raises((DatasetLayoutError, ValueError), match=message):
        _setup(root)


def test_hidden_files_are_ignored(tmp_path: Path) -> None:
    root = make_beantech(tmp_path)
    for name in (".DS_Store", "Thumbs.db"):
        (root / "01" / "train" / "ok" / name).write_bytes(b"\0")
    assert len(_setup(root).train_data) == BEANTECH_COUNTS["train/ok"]
