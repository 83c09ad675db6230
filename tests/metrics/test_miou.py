"""Tests of the per-image mIoU metrics."""

from __future__ import annotations

import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.metrics import Evaluator

from anomalib_ext.metrics import MIoU, OracleMIoU, per_image_iou


def _masks() -> tuple[torch.Tensor, torch.Tensor]:
    gt = torch.zeros(3, 4, 4, dtype=torch.bool)
    gt[0, :2, :2] = True  # 4 pixels
    pred = torch.zeros(3, 4, 4, dtype=torch.bool)
    pred[0, :2, :1] = True  # 2 of them: IoU 0.5
    pred[1, 3, 3] = True  # a false alarm on a normal image: IoU ~0
    return pred, gt  # image 2: normal, no detection: IoU 1


def test_per_image_convention() -> None:
    pred, gt = _masks()
    iou = per_image_iou(pred, gt)
    torch.testing.assert_close(iou, torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64), atol=1e-5, rtol=0)


def test_miou_from_batches() -> None:
    pred, gt = _masks()
    metric = MIoU()
    metric.update(ImageBatch(image=torch.rand(2, 3, 4, 4), pred_mask=pred[:2], gt_mask=gt[:2]))
    metric.update(ImageBatch(image=torch.rand(1, 3, 4, 4), pred_mask=pred[2:], gt_mask=gt[2:]))
    assert metric.compute().item() == pytest.approx(0.5, abs=1e-5)
    assert metric.name == "MIoU"


def test_oracle_miou_finds_best_threshold() -> None:
    pred, gt = _masks()
    generator = torch.Generator().manual_seed(0)
    anomaly_map = torch.rand(3, 4, 4, generator=generator) * 0.4
    noise_max = anomaly_map.max().item()
    anomaly_map[gt] = 0.9  # perfectly separable: the oracle reaches 1
    metric = OracleMIoU(prefix="pixel_oracle_")
    metric.update(ImageBatch(image=torch.rand(3, 3, 4, 4), anomaly_map=anomaly_map, gt_mask=gt))
    assert metric.compute().item() == pytest.approx(1.0, abs=1e-5)
    assert noise_max <= metric.best_threshold.item() < 0.9
    assert metric.name == "pixel_oracle_OracleMIoU"
    noisy = OracleMIoU()
    noisy.update(
        ImageBatch(image=torch.rand(3, 3, 4, 4), anomaly_map=torch.rand(3, 4, 4, generator=generator), gt_mask=gt)
    )
    assert noisy.compute().item() < 1.0


def test_usable_in_evaluator_and_errors() -> None:
    evaluator = Evaluator(test_metrics=[MIoU(prefix="pixel_nfa_", strict=False)])
    assert evaluator.test_metrics[0].name == "pixel_nfa_MIoU"
    with pytest.raises(ValueError, match="same shape"):
        per_image_iou(torch.zeros(2, 4, 4), torch.zeros(2, 5, 5))
    with pytest.raises(RuntimeError, match="before any image"):
        MIoU().compute()


def test_oracle_miou_computes_on_ddp_synced_state() -> None:
    """After a DDP sync torchmetrics replaces list states by one concatenated tensor; compute() must accept it."""
    _, gt = _masks()
    anomaly_map = torch.zeros(3, 4, 4)
    anomaly_map[gt] = 1.0
    metric = OracleMIoU()
    metric.update(ImageBatch(image=torch.rand(3, 3, 4, 4), anomaly_map=anomaly_map, gt_mask=gt))
    metric.maps, metric.masks = torch.cat(metric.maps), torch.cat(metric.masks)  # what the "cat" sync leaves
    assert metric.compute().item() == pytest.approx(1.0, abs=1e-5)
