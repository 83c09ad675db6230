"""DAGM 2007 datamodule: Labels.txt parsing, normal-only training, grayscale as 3 channels, bad-input errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_ext.data import DAGM
from anomalib_ext.data.dagm import parse_labels_file
from anomalib_ext.data.validation import DatasetLayoutError
from tests.data.dataset_layouts import DAGM_DEFECTIVE, DAGM_IMAGES_PER_SPLIT, DAGM_SIZE, make_dagm


def _setup(root: Path, **kwargs) -> DAGM:
    datamodule = DAGM(root=root, **{"category": "Class1", "num_workers": 0, "eval_batch_size": 16, **kwargs})
    datamodule.setup()
    return datamodule


def test_labels_file_parsing(tmp_path: Path) -> None:
    labels = tmp_path / "Labels.txt"
    labels.write_text("1\n1\t0\t0001.PNG\t0\t0\n\n2 1 0002.PNG 0 0002_label.PNG\n")
    assert parse_labels_file(labels) == [("0001.PNG", 0, None), ("0002.PNG", 1, "0002_label.PNG")]
    for bad in ("1\n1\t2\t0001.PNG\t0\t0\n", "1\n1\t0\t0001.PNG\n", "1\n1\t1\t0001.PNG\t0\t0\n"):
        labels.write_text(bad)
        with pytest.raises(DatasetLayoutError, match=r"Labels.txt line 2"):
            parse_labels_file(labels)


def test_trains_on_normal_train_images_and_tests_on_all_of_test(tmp_path: Path) -> None:
    datamodule = _setup(make_dagm(tmp_path))
    train, test = datamodule.train_data.samples, datamodule.test_data.samples
    assert len(train) == DAGM_IMAGES_PER_SPLIT - len(DAGM_DEFECTIVE["Train"]) and (train.label_index == 0).all()
    assert datamodule.train_data.excluded_defective_train == len(DAGM_DEFECTIVE["Train"])
    assert all("/Train/" in path for path in train.image_path)
    assert len(test) == DAGM_IMAGES_PER_SPLIT and test.label_index.sum() == len(DAGM_DEFECTIVE["Test"])
    defective = test[test.label_index == 1]
    assert [Path(path).name for path in defective.mask_path] == ["0501_label.PNG", "0504_label.PNG"]
    assert [Path(path).name for path in defective.image_path] == ["0501.PNG", "0504.PNG"]


def test_grayscale_images_become_three_channel_batches_with_masks(tmp_path: Path) -> None:
    root = make_dagm(tmp_path)
    datamodule = _setup(root)
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.image.shape == (DAGM_IMAGES_PER_SPLIT, 3, DAGM_SIZE, DAGM_SIZE)
    assert (batch.image[:, 0] == batch.image[:, 1]).all() and (batch.image[:, 1] == batch.image[:, 2]).all()
    gray = np.asarray(Image.open(root / "Class1" / "Test" / "0501.PNG"), dtype=np.float32) / 255
    first = [Path(path).name for path in batch.image_path].index("0501.PNG")
    np.testing.assert_allclose(batch.image[first, 0].numpy(), gray, atol=1e-6)
    defective = batch.gt_label.bool()
    assert defective.sum() == 2 and batch.gt_mask[defective].sum(dim=(1, 2)).tolist() == [128, 128]
    assert not batch.gt_mask[~defective].any()


def test_lowercase_extension_copy_still_matches_labels_file(tmp_path: Path) -> None:
    root = make_dagm(tmp_path)
    for path in (root / "Class1").rglob("*.PNG"):
        path.rename(path.with_suffix(".png"))
    assert len(_setup(root).test_data) == DAGM_IMAGES_PER_SPLIT


def test_missing_root_and_missing_labels_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"(?s)nowhere does not exist.*Expected layout.*Labels.txt"):
        _setup(tmp_path / "nowhere")
    with pytest.raises(DatasetLayoutError, match=r"(?s)no category folder 'Class1' \(found: nothing\).*Labels.txt"):
        _setup(tmp_path)
    root = make_dagm(tmp_path)
    os.remove(root / "Class1" / "Test" / "Label" / "Labels.txt")
    with pytest.raises(DatasetLayoutError, match=r"(?s)lacks Test/Label/Labels.txt.*Expected layout"):
        _setup(root)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (
            lambda split: Image.new("L", (32, 32)).save(split / "0009.PNG"),
            r"image\(s\) not listed in .*Labels.txt.*0009",
        ),
        (
            lambda split: Image.new("L", (32, 32)).save(split / "Label" / "0003_label.PNG"),
            r"label file\(s\) not listed in .*Labels.txt.*0003_label",
        ),
        (lambda split: os.remove(split / "0503.PNG"), r"lists .*0503.PNG, which does not exist"),
        (lambda split: os.remove(split / "Label" / "0504_label.PNG"), r"lists .*0504_label.PNG, which does not exist"),
        (lambda split: (split / "0502.PNG").write_bytes(b"garbage"), r"Cannot read image file .*0502.PNG"),
        (lambda split: Image.new("L", (8, 8)).save(split / "Label" / "0501_label.PNG"), r"is 8x8 but image"),
        (lambda split: (split / "notes.doc").write_text("x"), r"unexpected file\(s\) notes.doc"),
    ],
    ids=["image_unlisted", "mask_without_image", "listed_image_missing", "mask_missing", "unreadable", "size", "stray"],
)
def test_bad_inputs_raise_errors_naming_the_file(tmp_path: Path, breakage, message: str) -> None:
    root = make_dagm(tmp_path)
    breakage(root / "Class1" / "Test")
    with pytest.raises((DatasetLayoutError, ValueError), match=message):
        _setup(root)
