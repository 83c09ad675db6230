"""Pasted negatives: masks equal the changed pixels; mask-shaped negatives come from the source masks; bad input;
made in the DataLoader workers, identically for any ``num_workers``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from anomalib_ext.components.data_synthesis import SyntheticAnomalyDataset
from anomalib_ext.data import Textures
from anomalib_ext.models import DenseHybridAD
from anomalib_ext.models.dense_hybrid_ad.negatives import NegativePaster

RED, GREEN = (255, 0, 0), (0, 255, 0)
TINY_DATA = {"tile_size": 64, "num_train": 8, "num_test_normal": 4, "num_test_defect": 2}


@pytest.fixture
def ring_source(tmp_path: Path) -> Path:
    """One image: a red ring (the mask) on a green background, side-by-side layout."""
    image = np.zeros((60, 60, 3), dtype=np.uint8)
    image[:] = GREEN
    mask = np.zeros((60, 60), dtype=np.uint8)
    cv2.circle(mask, (30, 30), 25, 255, thickness=8)
    image[mask > 0] = RED
    assert cv2.imwrite(str(tmp_path / "ring.png"), image[..., ::-1])
    assert cv2.imwrite(str(tmp_path / "ring_mask.png"), mask)
    return tmp_path


def _normalised(colour: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.float32) / 255


def _paste(paster: NegativePaster, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two random ``[0, 1]`` images with one negative each: images, composited ``[2, 3, H, W]``, masks ``[2, H, W]``."""
    rng = np.random.default_rng(seed)
    images = rng.random((2, 64, 64, 3), dtype=np.float32)
    pasted, masks = zip(*(paster(image, rng) for image in images), strict=True)
    return (
        torch.from_numpy(images).permute(0, 3, 1, 2),
        torch.from_numpy(np.stack(pasted)).permute(0, 3, 1, 2),
        torch.from_numpy(np.stack(masks)),
    )


@pytest.mark.parametrize("shape", ["mask", "rectangle"])
@pytest.mark.parametrize("with_folder", [False, True])
def test_pasted_mask_equals_changed_pixels(shape: str, with_folder: bool, ring_source: Path) -> None:
    paster = NegativePaster(ring_source if with_folder else None, shape=shape)
    for seed in range(4):
        images, pasted, masks = _paste(paster, seed)
        assert masks.dtype == torch.bool and masks.shape == (2, 64, 64)
        assert masks.flatten(1).any(1).all()
        assert torch.equal((pasted != images).any(dim=1), masks)


def test_mask_shaped_negatives_come_from_the_source_mask(ring_source: Path) -> None:
    paster = NegativePaster(ring_source, shape="mask", size_range=(0.6, 0.9))
    red = _normalised(RED)
    for seed in range(4):
        _, pasted, masks = _paste(paster, seed)
        for image, mask in zip(pasted, masks, strict=True):
            pixels = image.permute(1, 2, 0)[mask]
            assert torch.allclose(pixels, red.expand_as(pixels), atol=0.05)  # only ring (red) pixels, never background
            rows, cols = torch.nonzero(mask, as_tuple=True)
            box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert not box[box.shape[0] // 2, box.shape[1] // 2]  # the ring's hole is not pasted
            assert box.float().mean() < 0.8  # ring-shaped, not a filled rectangle


def test_rectangle_negatives_paste_whole_images(ring_source: Path) -> None:
    paster = NegativePaster(ring_source, shape="rectangle", size_range=(0.5, 0.8))
    _, pasted, masks = _paste(paster, 0)
    for image, mask in zip(pasted, masks, strict=True):
        rows, cols = torch.nonzero(mask, as_tuple=True)
        assert mask.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # a filled rectangle
        pixels = image.permute(1, 2, 0)[mask]
        assert (pixels - _normalised(GREEN)).abs().amax(1).lt(0.05).any()  # background of the source image included


def test_procedural_negatives_are_deterministic_and_sized() -> None:
    paster = NegativePaster(None, shape="mask", size_range=(0.2, 0.3))
    first = _paste(paster, 5)
    second = _paste(paster, 5)
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])  # same generator, same negatives
    assert not torch.equal(first[2], _paste(paster, 6)[2])
    masks = first[2]
    for mask in masks:
        rows, cols = torch.nonzero(mask, as_tuple=True)
        assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 <= 0.3 * 64 + 2


def test_bad_options_and_sources(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="negative shape"):
        NegativePaster(None, shape="circle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size_range"):
        NegativePaster(None, size_range=(0.5, 0.2))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NegativePaster(tmp_path / "missing")
    assert cv2.imwrite(str(tmp_path / "lonely.png"), np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="has no mask"):
        NegativePaster(tmp_path)


def _training_batches(model: DenseHybridAD, root: Path, num_workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two epochs of DenseHybridAD's training batches, with its negatives installed as in a fit (fake trainer)."""
    datamodule = Textures(root=root, category="gravel", **TINY_DATA, train_batch_size=4, num_workers=num_workers)
    datamodule.setup("fit")
    trainer = SimpleNamespace(datamodule=datamodule, current_epoch=0, train_dataloader=None)
    model.trainer = trainer  # type: ignore[assignment]
    torch.manual_seed(0)  # seed_everything: the base seed of the negatives
    model.on_fit_start()
    assert isinstance(datamodule.train_data, SyntheticAnomalyDataset)
    batches = []
    for epoch in (0, 1):
        trainer.current_epoch = epoch
        loader = trainer.train_dataloader = datamodule.train_dataloader()
        model.on_train_epoch_start()
        torch.manual_seed(epoch)  # the same shuffling for every worker count
        batches += [(batch.image.clone(), batch.gt_mask.clone()) for batch in loader]
    return batches


def test_negatives_are_made_in_workers_identically_for_num_workers_0_and_2(textures_root: Path) -> None:
    model = DenseHybridAD(pre_trained=False, pre_processor=DenseHybridAD.configure_pre_processor((48, 48)))
    serial = _training_batches(model, textures_root, num_workers=0)
    parallel = _training_batches(model, textures_root, num_workers=2)
    assert len(serial) == len(parallel) == 4
    for (image_a, mask_a), (image_b, mask_b) in zip(serial, parallel, strict=True):
        assert image_a.shape == (4, 3, 48, 48) and mask_a.shape == (4, 48, 48)  # made at the model's input size
        assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)
        assert mask_a.flatten(1).any(1).all()
    assert not torch.equal(serial[0][1], serial[2][1])  # each epoch draws new negatives
