"""Negative sources: ADE20K scene-parsing and full layouts, masked folders, single-segment sampling, clear errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from anomalib_ext.components.negative_sources import ADE20KSource, SegmentSource, is_ade20k


def _scene(seed: int, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """An image and a class map with class 3 in the top band, class 7 in a disk, 0 elsewhere."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    labels = np.zeros((size, size), dtype=np.uint8)
    labels[:12] = 3
    cv2.circle(labels, (30, 32), 10, 7, thickness=-1)
    return image, labels


def _write_rgb(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image[..., ::-1])


@pytest.fixture
def scene_parsing_root(tmp_path: Path) -> Path:
    root = tmp_path / "ADEChallengeData2016"
    for split, stems in (
        ("training", ["ADE_train_00000001", "ADE_train_00000002"]),
        ("validation", ["ADE_val_00000001"]),
    ):
        for index, stem in enumerate(stems):
            image, labels = _scene(index)
            _write_rgb(root / "images" / split / f"{stem}.png", image)  # png keeps pixels exact for the checks
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "annotations" / split / f"{stem}.png"), labels)
    return root


def test_scene_parsing_layout(scene_parsing_root: Path) -> None:
    assert is_ade20k(scene_parsing_root)
    training, validation = ADE20KSource(scene_parsing_root), ADE20KSource(scene_parsing_root, split="validation")
    assert len(training) == 2 and len(validation) == 1
    image, labels = training.label_map(0)
    assert set(np.unique(labels)) == {0, 3, 7}
    _, mask = training[0]  # MaskedImageSource contract: all labelled pixels
    assert np.array_equal(mask, labels > 0)


def test_segment_sampling_returns_exactly_one_class_region(scene_parsing_root: Path) -> None:
    source = SegmentSource(scene_parsing_root)
    seen = set()
    for seed in range(12):
        image, mask = source.sample(np.random.default_rng(seed))
        reference_image, labels = _scene(0) if np.array_equal(image, _scene(0)[0]) else _scene(1)
        assert np.array_equal(image, reference_image)
        classes = np.unique(labels[mask])
        assert classes.size == 1 and classes[0] in (3, 7)
        assert np.array_equal(mask, labels == classes[0])
        seen.add(int(classes[0]))
    assert seen == {3, 7}


def test_full_ade20k_instance_encoding(tmp_path: Path) -> None:
    root = tmp_path / "ADE20K_2021_17_01" / "images" / "ADE" / "training" / "kitchen"
    image, _ = _scene(0)
    seg = np.zeros((48, 48, 3), dtype=np.uint8)  # RGB: R/10*256+G = class, B = instance id
    seg[:12, :, 0], seg[:12, :, 1], seg[:12, :, 2] = 10, 5, 1
    seg[30:40, 5:25, 0], seg[30:40, 5:25, 1], seg[30:40, 5:25, 2] = 10, 5, 2  # same class, another instance
    _write_rgb(root / "ADE_train_00000001.png", image)
    _write_rgb(root / "ADE_train_00000001_seg.png", seg)
    source = SegmentSource(tmp_path / "ADE20K_2021_17_01")
    assert isinstance(source.source, ADE20KSource) and source.source.instance_encoding
    masks = {source.sample(np.random.default_rng(seed))[1].sum() for seed in range(10)}
    assert masks == {12 * 48, 10 * 20}  # the two instances, never their union


def test_masked_folder_segments_are_connected_components(tmp_path: Path) -> None:
    image = np.full((40, 40, 3), 200, dtype=np.uint8)
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[2:10, 2:10] = 255
    mask[20:36, 20:30] = 255
    _write_rgb(tmp_path / "object.png", image)
    cv2.imwrite(str(tmp_path / "object_mask.png"), mask)
    source = SegmentSource(tmp_path)
    assert not is_ade20k(tmp_path)
    areas = {int(source.sample(np.random.default_rng(seed))[1].sum()) for seed in range(10)}
    assert areas == {64, 160}


def test_missing_folder_and_missing_masks_give_clear_errors(tmp_path: Path, scene_parsing_root: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SegmentSource(tmp_path / "nowhere")
    _write_rgb(tmp_path / "images_only" / "a.png", np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="has no mask"):
        SegmentSource(tmp_path / "images_only")
    (scene_parsing_root / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_train_00000002"):
        SegmentSource(scene_parsing_root)
    with pytest.raises(ValueError, match="split"):
        ADE20KSource(scene_parsing_root, split="test")  # type: ignore[arg-type]
