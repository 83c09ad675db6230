"""Tests of the per-image mIoU metrics."""

from __future__ import annotations

import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.metrics import Evaluator

from anomalib_ext.metrics import MIoU, OracleMIoU, oracle_miou, per_image_iou


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


def test_oracle_sweeps_exact_values_of_raw_maps() -> None:
    """Values crowded next to an outlier: 256 evenly spaced levels cannot separate them, exact values can."""
    gt = torch.zeros(2, 4, 4, dtype=torch.bool)
    gt[0, :2, :2] = True
    anomaly_map = torch.full((2, 4, 4), 1.0, dtype=torch.float64)
    anomaly_map[gt] = 1.0 + 1e-6
    anomaly_map[1, 3, 3] = 1000.0  # a false alarm far above everything on the normal image
    miou, threshold = oracle_miou(anomaly_map, gt)
    assert miou.item() == pytest.approx(0.5, abs=1e-5)  # 1 on image 0 at t = 1 + 1e-6, the outlier costs image 1
    assert threshold.item() == pytest.approx(1.0 + 1e-6, rel=0, abs=1e-9)
    coarse = torch.linspace(1.0, 1000.0, 256)
    assert not ((coarse > 1.0) & (coarse <= 1.0 + 1e-6)).any()  # no 256-level threshold lies in between


def test_oracle_over_nfa_map_hand_checkable() -> None:
    """-log10 NFA maps: a true detection at 5 decades on image 0, a false one at 2 decades on the normal image 1.

    The NFA mask (-log10 NFA > 0) flags both: mIoU (1 + 0) / 2 = 0.5. The oracle threshold (any t in (2, 5]) keeps
    only the true one: mIoU 1.
    """
    gt = torch.zeros(2, 4, 4, dtype=torch.bool)
    gt[0, 1:3, 1:3] = True
    neg_log_nfa = torch.full((2, 4, 4), -40.0)  # -log10 N_tests outside detections
    neg_log_nfa[0][gt[0]] = 5.0
    neg_log_nfa[1, 0, :2] = 2.0
    nfa_mask = MIoU()
    nfa_mask.update(ImageBatch(image=torch.rand(2, 3, 4, 4), pred_mask=neg_log_nfa > 0, gt_mask=gt))
    assert nfa_mask.compute().item() == pytest.approx(0.5, abs=1e-5)
    metric = OracleMIoU(fields=["neg_log10_nfa", "gt_mask"], prefix="pixel_nfa_map_")
    batch = ImageBatch(image=torch.rand(2, 3, 4, 4), gt_mask=gt)
    batch.neg_log10_nfa = neg_log_nfa
    metric.update(batch)
    assert metric.compute().item() == pytest.approx(1.0, abs=1e-5)
    assert metric.best_threshold.item() == 5.0
    assert metric.name == "pixel_nfa_map_OracleMIoU"


def test_oracle_can_choose_no_detection() -> None:
    gt = torch.zeros(3, 4, 4, dtype=torch.bool)
    anomaly_map = torch.rand(3, 4, 4)  # only normal images: the best is to detect nothing
    miou, threshold = oracle_miou(anomaly_map, gt)
    assert miou.item() == pytest.approx(1.0)
    assert threshold.item() == float("inf")
