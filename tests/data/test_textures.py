"""The embedded Textures dataset: deterministic, MVTec AD layout, validated."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from anomalib.data import MVTecAD

from anomalib_ext.data import Textures
from anomalib_ext.data.textures import DEFECT_TYPES
from anomalib_ext.data.validation import DatasetLayoutError

TINY = {"tile_size": 64, "num_train": 6, "num_test_normal": 3, "num_test_defect": 2}


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_build_is_deterministic(tmp_path: Path) -> None:
    for root in ("a", "b"):
        Textures(root=tmp_path / root, category="brick", **TINY).prepare_data()
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    Textures(root=tmp_path / "c", category="brick", build_seed=1, **TINY).prepare_data()
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_layout_is_mvtec_and_readable_by_stock_mvtecad(tmp_path: Path) -> None:
    Textures(root=tmp_path, category="gravel", **TINY).prepare_data()
    category = tmp_path / "gravel"
    assert len(list((category / "train" / "good").glob("*.png"))) == TINY["num_train"]
    assert len(list((category / "test" / "good").glob("*.png"))) == TINY["num_test_normal"]
    for defect in DEFECT_TYPES:
        images = sorted((category / "test" / defect).glob("*.png"))
        masks = sorted((category / "ground_truth" / defect).glob("*_mask.png"))
        assert [path.stem + "_mask" for path in images] == [path.stem for path in masks] and len(images) == 2
    stock = MVTecAD(root=tmp_path, category="gravel", num_workers=0, eval_batch_size=4)
    stock.setup()
    batch = next(iter(stock.test_dataloader()))
    assert batch.image.shape[-2:] == (64, 64)
    labels = stock.test_data.samples.label_index
    assert (labels == 0).sum() + len(stock.val_data) >= TINY["num_test_normal"] // 2
    assert (labels == 1).any()


def test_setup_gives_batches_with_masks(tmp_path: Path) -> None:
    datamodule = Textures(root=tmp_path, category="gravel", num_workers=0, eval_batch_size=32, **TINY)
    datamodule.prepare_data()
    datamodule.setup()
    batch = next(iter(datamodule.test_dataloader()))
    defective = batch.gt_label.bool()
    assert defective.any() and (~defective).any()
    assert all(mask.any() for mask in batch.gt_mask[defective])
    assert not batch.gt_mask[~defective].any()


def test_cached_build_is_reused_and_changed_parameters_rebuild(tmp_path: Path) -> None:
    Textures(root=tmp_path, category="gravel", **TINY).prepare_data()
    marker = tmp_path / "gravel" / "build.json"
    stamp = marker.stat().st_mtime_ns
    Textures(root=tmp_path, category="gravel", **TINY).prepare_data()
    assert marker.stat().st_mtime_ns == stamp
    Textures(root=tmp_path, category="gravel", **{**TINY, "num_train": 4}).prepare_data()
    assert len(list((tmp_path / "gravel" / "train" / "good").glob("*.png"))) == 4


def test_missing_root_names_expected_layout(tmp_path: Path) -> None:
    datamodule = Textures(root=tmp_path / "nowhere", category="gravel", **TINY)
    with pytest.raises(DatasetLayoutError, match=r"(?s)nowhere.*Expected layout.*train/good"):
        datamodule.setup()


def test_foreign_folder_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "gravel" / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not built by Textures"):
        Textures(root=tmp_path, category="gravel", **TINY).prepare_data()


def test_wrong_layout_names_missing_folder(tmp_path: Path) -> None:
    Textures(root=tmp_path, category="gravel", **TINY).prepare_data()
    (tmp_path / "gravel" / "ground_truth" / "crack").rename(tmp_path / "gravel" / "ground_truth" / "cracks")
    with pytest.raises(DatasetLayoutError, match="ground_truth/crack"):
        Textures(root=tmp_path, category="gravel", **TINY).setup()


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    Textures(root=tmp_path, category="gravel", **TINY).prepare_data()
    corrupt = tmp_path / "gravel" / "test" / "good" / "001.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match=r"test/good/001\.png"):
        Textures(root=tmp_path, category="gravel", **TINY).setup()


def test_unknown_category() -> None:
    with pytest.raises(ValueError, match="gravel"):
        Textures(category="marble")
