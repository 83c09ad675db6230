"""Data-side synthesis: per-sample seeding, identical results for any num_workers, pre-processor resolution, install."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_ext.components.data_synthesis import (
    SyntheticAnomalyDataset,
    install_synthesis,
    pre_processor_resize,
)
from anomalib_ext.components.task_pretraining import SyntheticAnomalyGenerator
from anomalib_ext.data import Textures

TINY_DATA = {"tile_size": 64, "num_train": 8, "num_test_normal": 4, "num_test_defect": 2}


def _datamodule(root: Path, num_workers: int) -> Textures:
    datamodule = Textures(root=root, category="gravel", **TINY_DATA, train_batch_size=4, num_workers=num_workers)
    datamodule.setup("fit")
    return datamodule


def _epoch_batches(datamodule: Textures, wrapper: SyntheticAnomalyDataset, epoch: int) -> list:
    loader = datamodule.train_dataloader()
    wrapper.start_epoch(epoch, loader)
    torch.manual_seed(epoch)  # the same shuffling order for every worker count
    return [(batch.image.clone(), batch.gt_mask.clone(), list(batch.image_path)) for batch in loader]


@pytest.mark.parametrize("task", ["cutpaste", "poisson"])
def test_same_samples_for_num_workers_0_and_2(task: str, textures_root: Path) -> None:
    """Synthesis in workers: identical images and masks per sample for 0 and 2 workers; new draws each epoch."""
    generator = SyntheticAnomalyGenerator(task, source=textures_root / "brick" if task == "poisson" else None)  # type: ignore[arg-type]
    runs = {}
    for workers in (0, 2):
        datamodule = _datamodule(textures_root, workers)
        wrapper = install_synthesis(SimpleNamespace(datamodule=datamodule), generator, seed=3)
        runs[workers] = [_epoch_batches(datamodule, wrapper, epoch) for epoch in (0, 1)]
    for epoch in (0, 1):
        for (image_a, mask_a, paths_a), (image_b, mask_b, paths_b) in zip(runs[0][epoch], runs[2][epoch], strict=True):
            assert paths_a == paths_b
            assert torch.equal(image_a, image_b) and torch.equal(mask_a, mask_b)
            assert mask_a.flatten(1).any(1).all()  # every training image carries an anomaly
    first = {path: mask for _, masks, paths in runs[0][0] for path, mask in zip(paths, masks, strict=True)}
    second = {path: mask for _, masks, paths in runs[0][1] for path, mask in zip(paths, masks, strict=True)}
    assert any(not torch.equal(first[path], second[path]) for path in first)  # another epoch, other anomalies


def test_mask_marks_the_changed_pixels_and_the_resolution_is_the_model_input(textures_root: Path) -> None:
    datamodule = _datamodule(textures_root, 0)
    plain = datamodule.train_data
    resize = pre_processor_resize(
        SimpleNamespace(transform=Compose([Resize((48, 48)), Normalize([0.5] * 3, [0.2] * 3)]))
    )
    assert isinstance(resize, Resize)
    wrapper = install_synthesis(
        SimpleNamespace(datamodule=datamodule), SyntheticAnomalyGenerator("cutpaste"), 0, resize
    )
    assert datamodule.train_data is wrapper and wrapper.collate_fn == plain.collate_fn
    item, original = wrapper[1], plain[1]
    assert item.image.shape == (3, 48, 48) and item.gt_mask.shape == (48, 48)
    resized = resize(original.image)
    assert torch.equal((item.image != resized).any(0), item.gt_mask & (item.image != resized).any(0))
    assert torch.equal(item.image[:, ~item.gt_mask], resized[:, ~item.gt_mask])  # outside the mask: untouched
    assert (
        install_synthesis(SimpleNamespace(datamodule=datamodule), SyntheticAnomalyGenerator("cutpaste"), 0).dataset
        is plain
    )
    wrapper.enabled = False
    assert torch.equal(wrapper[1].image, original.image)


def test_plain_tensor_items_and_errors() -> None:
    images = [torch.rand(3, 32, 32) for _ in range(3)]
    wrapper = SyntheticAnomalyDataset(images, SyntheticAnomalyGenerator("cutpaste"), seed=1)  # type: ignore[arg-type]
    image, mask = wrapper[2]
    assert image.shape == (3, 32, 32) and mask.dtype == torch.bool and mask.any()
    again, _ = wrapper[2]
    assert torch.equal(image, again)
    with pytest.raises(ValueError, match="datamodule"):
        install_synthesis(SimpleNamespace(datamodule=None), SyntheticAnomalyGenerator("cutpaste"), 0)
    loader = DataLoader(wrapper, num_workers=1, persistent_workers=True)
    with pytest.raises(ValueError, match="persistent"):
        wrapper.start_epoch(1, loader)
    assert np.random.default_rng([1, 0, 2]).random() == wrapper.rng(2).random()
