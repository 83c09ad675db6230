"""Synthetic anomalies made on the data-loading side, in DataLoader workers, seeded per sample.

:class:`SyntheticAnomalyDataset` wraps a training dataset (an Anomalib dataset of :class:`~anomalib.data.ImageItem`, or
one that returns image tensors) and replaces every item's image by a synthetic anomalous version and its ``gt_mask`` by
the mask of the changed pixels. Synthesis runs where the item is loaded (in the DataLoader's worker processes), so the
training step receives ready batches and never copies images from the accelerator to the CPU and back.

Determinism: the random generator of item ``i`` in epoch ``e`` is ``numpy.random.default_rng([seed, e, i])``, so the
synthetic samples depend neither on ``num_workers``, nor on the order in which items are loaded, nor on DDP sharding.
The owner sets :attr:`SyntheticAnomalyDataset.epoch` before each epoch's DataLoader iterator is created (Anomalib's
training DataLoader has no persistent workers: every epoch's workers get a fresh copy of the wrapper).

Resolution: ``resize`` (the model pre-processor's own ``Resize``) is applied before synthesis, so the anomaly is made at
the resolution the model sees; the pre-processor's ``Resize`` on the device is then an identity and its ``Normalize``
treats synthetic and normal pixels alike. Masks therefore stay pixel-exact.

Lightning models install the wrapper with :func:`install_synthesis` (around ``trainer.datamodule.train_data``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from anomalib.data.transforms.utils import extract_transforms_by_type
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import Resize

Synthesiser = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]
"""``(image [H, W, 3] float32 in [0, 1], rng) -> (anomalous image [H, W, 3] in [0, 1], bool mask [H, W])``."""


class SyntheticAnomalyDataset(Dataset):
    """A dataset whose items carry a synthetic anomaly and its mask (see the module docstring).

    Args:
        dataset: the wrapped training dataset; its items are :class:`~anomalib.data.ImageItem` (``image`` ``[3, H, W]``
            float in ``[0, 1]``) or plain ``[3, H, W]`` tensors.
        synthesise: the per-image :data:`Synthesiser`.
        seed: base seed of the per-sample generators.
        resize: applied to the image before synthesis (the pre-processor's ``Resize``); ``None``: native resolution.

    Attributes:
        epoch: part of every sample's seed; set it before each epoch.
        enabled: ``False`` passes the wrapped items through unchanged (e.g. after a pre-training stage).
    """

    def __init__(
        self,
        dataset: Dataset,
        synthesise: Synthesiser,
        seed: int = 0,
        resize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.dataset = dataset
        self.synthesise = synthesise
        self.seed = seed
        self.resize = resize
        self.epoch = 0
        self.enabled = True

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401
        """Everything else (``collate_fn``, ``samples``, ``task`` ...) is the wrapped dataset's."""
        if name == "dataset":  # not set yet (unpickling): do not recurse
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def start_epoch(self, epoch: int, dataloader: object | None = None) -> None:
        """Set :attr:`epoch`; refuse a ``dataloader`` whose persistent workers would keep an older copy of this wrapper."""
        if dataloader is not None and getattr(dataloader, "persistent_workers", False):
            msg = (
                "Synthetic anomalies are seeded per epoch in the DataLoader workers, which persistent workers would not "
                "see: build the training DataLoader with persistent_workers=False (Anomalib's default)."
            )
            raise ValueError(msg)
        self.epoch = epoch

    def rng(self, index: int) -> np.random.Generator:
        """The generator of item ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def synthetic(self, image: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomalous ``[3, H, W]`` image (pixels outside the mask untouched) and bool mask ``[H, W]`` for item ``index``."""
        if self.resize is not None:
            image = self.resize(tv_tensors.Image(image)).as_subclass(torch.Tensor)
        array = image.permute(1, 2, 0).to(torch.float32).numpy()
        output, mask = self.synthesise(array, self.rng(index))
        mask_tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))
        synthetic = torch.from_numpy(np.ascontiguousarray(output, dtype=np.float32)).permute(2, 0, 1).to(image.dtype)
        return torch.where(mask_tensor, synthetic, image), mask_tensor

    def __getitem__(self, index: int) -> Any:  # noqa: ANN401
        item = self.dataset[index]
        if not self.enabled:
            return item
        if isinstance(item, torch.Tensor):
            return self.synthetic(item, index)
        image, mask = self.synthetic(item.image.as_subclass(torch.Tensor), index)
        return dataclasses.replace(item, image=tv_tensors.Image(image), gt_mask=tv_tensors.Mask(mask))


def install_synthesis(
    trainer: Any,  # noqa: ANN401
    synthesise: Synthesiser,
    seed: int,
    resize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> SyntheticAnomalyDataset:
    """Wrap ``trainer.datamodule.train_data`` (once; a second call replaces the synthesiser) and return the wrapper.

    Call it before the training DataLoader is built (``on_fit_start``); the caller keeps :attr:`~SyntheticAnomalyDataset.epoch`
    up to date.

    Raises:
        ValueError: the trainer has no datamodule with ``train_data`` (the training images must come from one).
    """
    datamodule = getattr(trainer, "datamodule", None)
    dataset = getattr(datamodule, "train_data", None)
    if dataset is None:
        msg = (
            "Synthetic anomalies are made in the training DataLoader's workers: fit with a datamodule "
            "(e.g. Engine().fit(model, datamodule=...)) whose setup() creates `train_data`."
        )
        raise ValueError(msg)
    if isinstance(dataset, SyntheticAnomalyDataset):
        dataset = dataset.dataset
    wrapper = SyntheticAnomalyDataset(dataset, synthesise, seed=seed, resize=resize)
    datamodule.train_data = wrapper
    return wrapper


def remove_synthesis(trainer: Any) -> None:  # noqa: ANN401
    """Restore ``trainer.datamodule.train_data`` if an earlier fit wrapped it (e.g. a fit resumed after pre-training)."""
    datamodule = getattr(trainer, "datamodule", None)
    dataset = getattr(datamodule, "train_data", None)
    if isinstance(dataset, SyntheticAnomalyDataset):
        datamodule.train_data = dataset.dataset


def pre_processor_resize(pre_processor: object) -> Resize | None:
    """The ``Resize`` of an Anomalib pre-processor's transform (the ``resize`` to synthesise at), if it has one."""
    transform = getattr(pre_processor, "transform", None)
    resizes = extract_transforms_by_type(transform, Resize) if transform is not None else []
    return resizes[0] if resizes else None
