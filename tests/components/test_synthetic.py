"""Synthetic anomalies: masks mark exactly what changed, generators are deterministic, sources validate their layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from anomalib_ext.components.synthetic import (
    MaskedImageSource,
    crack_stroke,
    cut_paste,
    paste_region,
    poisson_clone,
    random_shape_mask,
)


@pytest.fixture(scope="module")
def gravel() -> np.ndarray:
    return np.repeat(skimage.data.gravel()[:128, :128, None], 3, axis=2)


@pytest.fixture(scope="module")
def brick() -> np.ndarray:
    return np.repeat(skimage.data.brick()[:128, :128, None], 3, axis=2)


def _generators(brick: np.ndarray) -> dict[str, Callable]:
    return {
        "cutpaste": lambda image, rng: cut_paste(image, rng),
        "scar": lambda image, rng: cut_paste(image, rng, variant="scar"),
        "crack": crack_stroke,
        "paste": lambda image, rng: paste_region(image, brick, random_shape_mask(image.shape[:2], rng), rng),
        "poisson": lambda image, rng: poisson_clone(image, brick, random_shape_mask(image.shape[:2], rng), rng),
    }


@pytest.mark.parametrize("name", ["cutpaste", "scar", "crack", "paste", "poisson"])
def test_mask_marks_changed_pixels(name: str, gravel: np.ndarray, brick: np.ndarray) -> None:
    for seed in range(5):
        output, mask = _generators(brick)[name](gravel, np.random.default_rng(seed))
        assert output.shape == gravel.shape and output.dtype == np.uint8
        assert mask.shape == gravel.shape[:2] and mask.dtype == bool and mask.any()
        changed = np.any(output != gravel, axis=-1)
        assert not (changed & ~mask).any(), "pixels outside the mask changed"
        # Hard pastes change (almost) every masked pixel; Poisson cloning can leave a few with equal values.
        assert changed[mask].mean() >= (0.6 if name == "poisson" else 0.9)


@pytest.mark.parametrize("name", ["cutpaste", "scar", "crack", "paste", "poisson"])
def test_generators_are_deterministic(name: str, gravel: np.ndarray, brick: np.ndarray) -> None:
    first = _generators(brick)[name](gravel, np.random.default_rng(7))
    second = _generators(brick)[name](gravel, np.random.default_rng(7))
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])


def test_poisson_clone_has_no_seam(gravel: np.ndarray, brick: np.ndarray) -> None:
    """The gradient jump across the mask border is smaller for Poisson cloning than for a hard paste."""
    source_mask = random_shape_mask(gravel.shape[:2], np.random.default_rng(3), size_range=(0.4, 0.5))
    cloned, mask = poisson_clone(gravel, brick, source_mask, np.random.default_rng(1))
    pasted, pasted_mask = paste_region(gravel, brick, source_mask, np.random.default_rng(1))

    def border_gradient(image: np.ndarray, region: np.ndarray) -> float:
        ring = cv2.dilate(region.astype(np.uint8), np.ones((3, 3))) - cv2.erode(
            region.astype(np.uint8), np.ones((3, 3))
        )
        gray = image.mean(axis=2)
        magnitude = np.hypot(*np.gradient(gray))
        return float(magnitude[ring > 0].mean())

    assert border_gradient(cloned, mask) < border_gradient(pasted, pasted_mask)


def test_masked_image_source_layouts(tmp_path: Path, brick: np.ndarray) -> None:
    mask = random_shape_mask(brick.shape[:2], np.random.default_rng(0)).astype(np.uint8) * 255
    mvtec = tmp_path / "mvtec"
    (mvtec / "test" / "good").mkdir(parents=True)
    (mvtec / "test" / "hole").mkdir(parents=True)
    (mvtec / "ground_truth" / "hole").mkdir(parents=True)
    cv2.imwrite(str(mvtec / "test" / "good" / "000.png"), brick)
    cv2.imwrite(str(mvtec / "test" / "hole" / "000.png"), brick)
    cv2.imwrite(str(mvtec / "ground_truth" / "hole" / "000_mask.png"), mask)
    side = tmp_path / "side"
    side.mkdir()
    cv2.imwrite(str(side / "a.jpg"), brick)
    cv2.imwrite(str(side / "a_mask.png"), mask)
    for root in (mvtec, side):
        source = MaskedImageSource(root)
        assert len(source) == 1
        image, loaded_mask = source[0]
        assert image.shape == brick.shape and np.array_equal(loaded_mask, mask > 0)


def test_masked_image_source_errors(tmp_path: Path, brick: np.ndarray) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MaskedImageSource(tmp_path / "missing")
    folder = tmp_path / "pairs"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    cv2.imwrite(str(folder / "images" / "a.png"), brick)
    with pytest.raises(FileNotFoundError, match=r"a\.png has no mask"):
        MaskedImageSource(folder)
    cv2.imwrite(str(folder / "masks" / "a.png"), np.full((10, 10), 255, np.uint8))
    with pytest.raises(ValueError, match="but its mask"):
        MaskedImageSource(folder)[0]
    cv2.imwrite(str(folder / "masks" / "b.png"), np.full((10, 10), 255, np.uint8))
    with pytest.raises(FileNotFoundError, match=r"b\.png has no matching image"):
        MaskedImageSource(folder)
