"""Task-specific pre-training: synthetic batches, the U-Net, the BCE step, the schedule and the encoder weights file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from safetensors import safe_open

from anomalib_ext.components.backbones import build_timm_model
from anomalib_ext.components.synthetic import paste_region
from anomalib_ext.components.task_pretraining import (
    SegmentationUNet,
    SyntheticAnomalyGenerator,
    build_segmentation_unet,
    save_encoder_weights,
    segmentation_loss,
    step_schedule_factor,
)
from anomalib_ext.models.msflow.torch_model import MSFlowModel

SIZE = 64


def _texture_batch(count: int = 4) -> torch.Tensor:
    gravel = skimage.data.gravel().astype(np.float32) / 255
    tiles = [gravel[i * SIZE : (i + 1) * SIZE, :SIZE] for i in range(count)]
    return torch.from_numpy(np.stack(tiles))[:, None].repeat(1, 3, 1, 1)


def _synthesise_batch(
    generator: SyntheticAnomalyGenerator, images: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-image synthesiser over a ``[N, 3, H, W]`` batch: anomalous images and ``[N, 1, H, W]`` float masks."""
    outputs, masks = zip(
        *(
            generator(image.permute(1, 2, 0).numpy(), np.random.default_rng([seed, i]))
            for i, image in enumerate(images)
        ),
        strict=True,
    )
    anomalous = torch.from_numpy(np.stack(outputs)).permute(0, 3, 1, 2)
    return torch.where(torch.from_numpy(np.stack(masks))[:, None], anomalous, images), torch.from_numpy(
        np.stack(masks)
    )[:, None].float()


def _write_defect_source(root: Path, count: int = 3, mismatched: bool = False, drop_mask: bool = False) -> Path:
    """An MVTec-like category: test/<defect>/NNN.png with ground_truth/<defect>/NNN_mask.png."""
    brick = skimage.data.brick()
    (root / "test" / "crack").mkdir(parents=True)
    (root / "ground_truth" / "crack").mkdir(parents=True)
    for index in range(count):
        image = np.repeat(brick[index * 80 : index * 80 + 80, :80, None], 3, axis=2)
        mask = np.zeros((80, 80), np.uint8)
        cv2.circle(mask, (40, 40), 12 + 3 * index, 255, -1)
        if mismatched and index == 1:
            mask = cv2.resize(mask, (60, 60), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(root / "test" / "crack" / f"{index:03d}.png"), image)
        if not (drop_mask and index == 2):
            cv2.imwrite(str(root / "ground_truth" / "crack" / f"{index:03d}_mask.png"), mask)
    return root


@pytest.mark.parametrize("task", ["cutpaste", "poisson"])
def test_generator_masks_mark_changed_pixels(task: str, tmp_path: Path) -> None:
    source = _write_defect_source(tmp_path / "wood") if task == "poisson" else None
    generator = SyntheticAnomalyGenerator(task, source=source)  # type: ignore[arg-type]
    images = _texture_batch()
    anomalous, masks = _synthesise_batch(generator, images, 3)
    assert anomalous.shape == images.shape and masks.shape == (4, 1, SIZE, SIZE)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    changed = (anomalous - images).abs().amax(dim=1, keepdim=True) > 1 / 255
    mask = masks.bool()
    assert not (changed & ~mask).any(), "pixels outside the synthetic-anomaly mask changed"
    for index in range(4):
        assert mask[index].any()
        assert changed[index][mask[index]].float().mean() > 0.5


def _border_gradient(image: np.ndarray, region: np.ndarray) -> float:
    ring = cv2.dilate(region.astype(np.uint8), np.ones((3, 3))) - cv2.erode(region.astype(np.uint8), np.ones((3, 3)))
    magnitude = np.hypot(*np.gradient(image.astype(np.float32).mean(axis=2)))
    return float(magnitude[ring > 0].mean())


def test_poisson_samples_have_no_seam(tmp_path: Path) -> None:
    """The gradient at the mask border is smaller after Poisson cloning than after a hard paste of the same defects."""
    generator = SyntheticAnomalyGenerator("poisson", source=_write_defect_source(tmp_path / "wood"))
    images = (_texture_batch() * 255).round().byte().permute(0, 2, 3, 1).numpy()
    cloned, pasted = [], []
    for index, image in enumerate(images):
        cloned.append(_border_gradient(*generator.synthesise(image, np.random.default_rng(index))))
        rng = np.random.default_rng(index)  # the same defect, hard-pasted
        defect_image, defect_mask = generator.random_defect(SIZE, SIZE, rng)
        pasted.append(_border_gradient(*paste_region(image, defect_image, defect_mask, rng)))
    assert all(c < p for c, p in zip(cloned, pasted, strict=True))
    assert np.mean(cloned) < 0.85 * np.mean(pasted)


def test_poisson_source_errors_name_the_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="poisson_source"):
        SyntheticAnomalyGenerator("poisson")
    missing = _write_defect_source(tmp_path / "missing", drop_mask=True)
    with pytest.raises(FileNotFoundError, match="002.png has no mask"):
        SyntheticAnomalyGenerator("poisson", source=missing)
    mismatched = _write_defect_source(tmp_path / "mismatched", mismatched=True)
    with pytest.raises(ValueError, match=r"001.png is 80x80 but its mask .*001_mask.png is 60x60"):
        SyntheticAnomalyGenerator("poisson", source=mismatched)
    with pytest.raises(ValueError, match="Unknown pre-training task"):
        SyntheticAnomalyGenerator("draem")  # type: ignore[arg-type]


def test_unet_predicts_full_resolution_logits() -> None:
    network = build_segmentation_unet("efficientnet_lite0", pre_trained=False)
    assert isinstance(network, SegmentationUNet)
    assert network(torch.randn(2, 3, 64, 96)).shape == (2, 1, 64, 96)
    assert network(torch.randn(1, 3, 50, 50)).shape == (1, 1, 50, 50)  # sizes that are not multiples of the stride


def test_pretraining_steps_reduce_bce_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    network = build_segmentation_unet("efficientnet_lite0", pre_trained=True)
    images, masks = _synthesise_batch(SyntheticAnomalyGenerator("cutpaste"), _texture_batch(), 0)
    mean, std = (
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
    )
    images = (images - mean) / std
    encoder_before = {key: value.clone() for key, value in network.encoder.state_dict().items()}
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = segmentation_loss(network, images, masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    prior = masks.mean().item()
    constant_predictor_bce = -prior * np.log(prior) - (1 - prior) * np.log(1 - prior)
    assert losses[-1] < 0.5 * losses[0]
    assert losses[-1] < 0.6 * constant_predictor_bce  # it localises the anomalies, not only their frequency
    encoder_after = network.encoder.state_dict()
    assert any(not torch.equal(encoder_before[key], encoder_after[key]) for key in encoder_before if "weight" in key)
    # BatchNorm running statistics stay the ImageNet ones
    assert all(torch.equal(encoder_before[key], encoder_after[key]) for key in encoder_before if "running_" in key)


@pytest.mark.parametrize("adapt", [False, True])
def test_batch_norm_statistics_adapt_only_when_asked(adapt: bool) -> None:
    torch.manual_seed(0)
    network = build_segmentation_unet("efficientnet_lite0", pre_trained=True).train()
    before = {k: v.clone() for k, v in network.encoder.state_dict().items() if "running_mean" in k}
    images, masks = _synthesise_batch(SyntheticAnomalyGenerator("cutpaste"), _texture_batch(), 0)
    segmentation_loss(network, images, masks[:, 0].bool(), adapt_batch_norm=adapt).backward()
    after = network.encoder.state_dict()
    changed = any(not torch.equal(value, after[key]) for key, value in before.items())
    assert changed == adapt


def test_saved_encoder_loads_into_msflow_and_changes_its_features(tmp_path: Path) -> None:
    torch.manual_seed(0)
    network = build_segmentation_unet("efficientnet_lite0", pre_trained=True)
    with torch.no_grad():
        for parameter in network.encoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    path = save_encoder_weights(
        network.encoder, tmp_path / "tuned.safetensors", "efficientnet_lite0", metadata={"task": "cutpaste"}
    )
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"backbone": "efficientnet_lite0", "task": "cutpaste"}
        assert "classifier.weight" in handle.keys()  # noqa: SIM118 - safe_open has no __contains__; a complete timm state dict
    build_timm_model("efficientnet_lite0", backbone_weights=path)  # loads into the full model as well

    images = torch.randn(2, 3, 64, 64)
    imagenet = MSFlowModel("efficientnet_lite0", flow_blocks=(1, 1, 1))
    tuned = MSFlowModel("efficientnet_lite0", backbone_weights=str(path), flow_blocks=(1, 1, 1))
    network.encoder.eval()
    with torch.no_grad():
        expected = [tuned.feature_pool(feature) for feature in network.encoder(images)]
    tuned_features, imagenet_features = tuned.extract_features(images), imagenet.extract_features(images)
    for tuned_feature, reference, original in zip(tuned_features, expected, imagenet_features, strict=True):
        assert torch.allclose(tuned_feature, reference, atol=1e-5)
        assert not torch.allclose(tuned_feature, original, atol=1e-2)


def test_save_rejects_an_encoder_of_another_architecture(tmp_path: Path) -> None:
    network = build_segmentation_unet("resnet18", pre_trained=False)
    with pytest.raises(ValueError, match="not keys of timm's 'efficientnet_lite0'"):
        save_encoder_weights(network.encoder, tmp_path / "x.safetensors", "efficientnet_lite0", pre_trained=False)


def test_paper_schedule() -> None:
    factors = [step_schedule_factor(epoch, 100) for epoch in range(100)]
    assert factors[0] == pytest.approx(0.1)  # 1e-5 of 1e-4
    assert factors[6] == pytest.approx(0.1 + 0.9 * 6 / 12)
    assert factors[12] == factors[69] == pytest.approx(1.0)
    assert factors[70] == factors[89] == pytest.approx(1 / 3)
    assert factors[90] == factors[99] == pytest.approx(1 / 9)
    assert step_schedule_factor(0, 1) == pytest.approx(1.0)  # no warm-up epoch in a 1-epoch run
