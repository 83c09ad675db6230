"""Slim checkpoints: frozen pretrained weights referenced, not stored; reloads give identical outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from anomalib.data import ImageBatch, ImageItem
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_ext.components.checkpoint import REFERENCED_WEIGHTS_KEY, WEIGHT_SOURCES_KEY, referenced_tensors
from anomalib_ext.models import NFBMR, DenseHybridAD, MSFlow, UFlowNFA

SIZE = 64


def pre_processor() -> PreProcessor:
    return PreProcessor(
        transform=Compose([Resize((SIZE, SIZE)), Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    )


# Offline ImageNet weights (efficientnet_lite0) wherever the model takes a timm backbone: a rebuild reproduces them.
MODELS: dict[str, tuple[type, dict[str, Any]]] = {
    "uflow_nfa": (UFlowNFA, {"backbone": "efficientnet_lite0", "pre_trained": True, "flow_steps": 1}),
    "msflow": (MSFlow, {"backbone": "efficientnet_lite0", "pre_trained": True, "flow_blocks": (1, 1, 1)}),
    "nfbmr": (
        NFBMR,
        {
            "backbone": "efficientnet_lite0",
            "layer": "blocks.4",
            "pre_trained": True,
            "tnf_epochs": 1,
            "bmr_epochs": 1,
            "flow_blocks": 1,
            "flow_hidden_channels": 16,
            "mapper_hidden_channels": 16,
        },
    ),
    # No offline DeepLabV3 weights: seeded random construction stands in for a weights file.
    "dense_hybrid_ad": (DenseHybridAD, {"pre_trained": False}),
}


def image_items(count: int) -> list[ImageItem]:
    return [
        ImageItem(
            image=torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(index)),
            gt_label=torch.tensor(0),
            gt_mask=torch.zeros(SIZE, SIZE, dtype=torch.bool),
            image_path=f"{index}.png",
        )
        for index in range(count)
    ]


def images(count: int) -> DataLoader:
    return DataLoader(image_items(count), batch_size=2, collate_fn=ImageBatch.collate)


class TinyDataModule(LightningDataModule):
    """Two random images as ``train_data`` (DenseHybridAD pastes its negatives in the training DataLoader's workers)."""

    def __init__(self) -> None:
        super().__init__()
        self.train_data = image_items(2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_data, batch_size=2, collate_fn=ImageBatch.collate)

    def val_dataloader(self) -> DataLoader:
        return images(2)


def components() -> dict[str, Any]:
    """Pre-processor (not restored from checkpoints), evaluator and visualizer off."""
    return {"pre_processor": pre_processor(), "evaluator": False, "visualizer": False}


def build(name: str, **overrides: Any) -> Any:  # noqa: ANN401
    cls, arguments = MODELS[name]
    torch.manual_seed(0)
    return cls(**{**arguments, **overrides}, **components())


def cpu_trainer(root: Path, epochs: int) -> Trainer:
    return Trainer(
        max_epochs=epochs,
        limit_train_batches=1,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        default_root_dir=root,
    )


def fit_and_save(model: Any, root: Path, epochs: int = 1) -> Path:  # noqa: ANN401
    trainer = cpu_trainer(root, epochs)
    trainer.fit(model, datamodule=TinyDataModule())
    path = root / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def outputs(model: Any) -> dict[str, torch.Tensor]:  # noqa: ANN401
    model.eval()
    with torch.no_grad():
        prediction = model.model(next(iter(images(2))).image)
    return {key: value for key, value in prediction._asdict().items() if isinstance(value, torch.Tensor)}


def epochs_of(name: str) -> int:
    return 2 if name == "nfbmr" else 1


@pytest.mark.parametrize("name", list(MODELS))
def test_slim_checkpoint_reloads_identically(name: str, tmp_path: Path) -> None:
    full = fit_and_save(build(name), tmp_path / "full", epochs_of(name))
    model = build(name, slim_checkpoint=True)
    slim = fit_and_save(model, tmp_path / "slim", epochs_of(name))
    checkpoint = torch.load(slim, map_location="cpu", weights_only=False)
    referenced = checkpoint[REFERENCED_WEIGHTS_KEY]
    assert referenced, "no frozen pretrained tensor was referenced"
    assert not set(referenced) & set(checkpoint["state_dict"])
    assert slim.stat().st_size < full.stat().st_size

    torch.manual_seed(0)  # the same (seeded random) DeepLabV3 as at training time; the others load ImageNet weights
    reloaded = type(model).load_from_checkpoint(slim, map_location="cpu", **components())  # strict loading
    expected, actual = outputs(model), outputs(reloaded)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def test_default_checkpoint_stores_everything(tmp_path: Path) -> None:
    model = build("uflow_nfa")
    checkpoint = torch.load(fit_and_save(model, tmp_path), map_location="cpu", weights_only=False)
    assert REFERENCED_WEIGHTS_KEY not in checkpoint
    assert set(referenced_tensors(model)) <= set(checkpoint["state_dict"])


def test_changed_frozen_weights_stay_in_the_checkpoint() -> None:
    """A frozen tensor that no longer equals the constructed one (e.g. fine-tuned) is stored, not referenced."""
    model = build("uflow_nfa", slim_checkpoint=True)
    key, tensor = next(iter(referenced_tensors(model).items()))
    model._remember_constructed_weights()
    with torch.no_grad():
        tensor.add_(1.0)
    checkpoint: dict[str, Any] = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert key in checkpoint["state_dict"]
    assert key not in checkpoint[REFERENCED_WEIGHTS_KEY]


def test_rebuild_with_other_weights_fails_clearly(tmp_path: Path) -> None:
    """A slim checkpoint loaded into a model whose frozen weights differ is an error, not a silent difference."""
    slim = fit_and_save(build("dense_hybrid_ad", slim_checkpoint=True), tmp_path)
    torch.manual_seed(1)  # another random initialisation of the segmenter
    with pytest.raises(RuntimeError, match="differ"):
        DenseHybridAD.load_from_checkpoint(slim, map_location="cpu", **components())


def test_training_resumes_from_a_slim_checkpoint(tmp_path: Path) -> None:
    """``fit(ckpt_path=slim)`` restores the referenced weights and continues; the next checkpoint is slim again."""
    slim = fit_and_save(build("uflow_nfa", slim_checkpoint=True), tmp_path / "first")
    model = build("uflow_nfa", slim_checkpoint=True)
    trainer = cpu_trainer(tmp_path / "resumed", epochs=2)
    trainer.fit(model, datamodule=TinyDataModule(), ckpt_path=slim)
    assert trainer.current_epoch == 2
    path = tmp_path / "resumed.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert (
        checkpoint[REFERENCED_WEIGHTS_KEY].keys() == torch.load(slim, weights_only=False)[REFERENCED_WEIGHTS_KEY].keys()
    )


def test_slim_checkpoint_with_a_weights_file_reloads_identically(tmp_path: Path) -> None:
    """A slim DenseHybridAD checkpoint keeps the weights file it references (the full one may drop it)."""
    weights = tmp_path / "deeplabv3.pth"
    torch.manual_seed(3)
    torch.save(DenseHybridAD(pre_trained=False, **components()).model.segmenter.state_dict(), weights)
    model = build("dense_hybrid_ad", segmenter_weights=str(weights), slim_checkpoint=True)
    slim = fit_and_save(model, tmp_path / "slim")
    assert torch.load(slim, map_location="cpu", weights_only=False)[REFERENCED_WEIGHTS_KEY]

    reloaded = DenseHybridAD.load_from_checkpoint(slim, map_location="cpu", **components())
    expected, actual = outputs(model), outputs(reloaded)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def _weights_file(name: str, path: Path) -> dict[str, Any]:
    """A local weights file (seeded random: neither the offline ImageNet weights nor a fresh initialisation)."""
    torch.manual_seed(7)
    if name == "dense_hybrid_ad":
        torch.save(DenseHybridAD(pre_trained=False, **components()).model.segmenter.state_dict(), path)
        return {"segmenter_weights": str(path)}
    torch.save(timm.create_model("efficientnet_lite0", pretrained=False).state_dict(), path)
    return {"pre_trained": True, "backbone_weights": str(path)}


@pytest.mark.parametrize("name", list(MODELS))
def test_full_checkpoint_reloads_without_its_weight_sources(name: str, tmp_path: Path) -> None:
    """A checkpoint that stores every tensor reloads identically after the weights file it was trained from is gone
    (and so without any download): its hyper-parameters name no weight source, the originals are kept beside them."""
    weights = tmp_path / "weights.pth"
    sources = _weights_file(name, weights)
    model = build(name, **sources)
    path = fit_and_save(model, tmp_path / "full", epochs_of(name))
    weights.unlink()
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert REFERENCED_WEIGHTS_KEY not in checkpoint
    assert checkpoint[WEIGHT_SOURCES_KEY] == {key: model.hparams[key] for key in type(model).weight_sources}
    assert sources.items() <= checkpoint[WEIGHT_SOURCES_KEY].items()
    assert all(checkpoint["hyper_parameters"][key] in (False, None) for key in checkpoint[WEIGHT_SOURCES_KEY])
    assert sources.items() <= model.hparams.items()  # the live model keeps its own

    reloaded = type(model).load_from_checkpoint(path, map_location="cpu", **components())
    expected, actual = outputs(model), outputs(reloaded)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
