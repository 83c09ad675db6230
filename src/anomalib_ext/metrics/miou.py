"""Per-image mean Intersection over Union (mIoU), the segmentation metric of U-Flow (Tailanian et al., 2024, Sec. 4.1).

Every test image counts once, whatever the size of its anomaly: ``IoU_i = (|P_i & G_i| + eps) / (|P_i | G_i| + eps)``
and ``mIoU = mean_i IoU_i``. A normal image without any detection therefore scores 1, and any false detection on it
scores about 0.

* :class:`MIoU` scores binary masks (default fields ``pred_mask`` / ``gt_mask``), e.g. the unsupervised NFA mask.
* :class:`OracleMIoU` scores continuous maps (default fields ``anomaly_map`` / ``gt_mask``) at the single threshold
  that maximises the mIoU over the whole evaluated set (the paper's "oracle" threshold). Prediction = ``map >= t``;
  the candidates are exact map values: every distinct value (up to ``max_thresholds`` of them, else that many
  evenly spaced order statistics of the distinct values) plus "above the maximum" (no detection). Give it raw,
  un-normalised maps (min-max normalisation with clipping merges values). The chosen threshold is kept in
  ``best_threshold`` after :meth:`compute` (``inf`` = detect nothing).

Both are Anomalib metrics usable in any model's :class:`~anomalib.metrics.Evaluator`::

    Evaluator(test_metrics=[MIoU(prefix="pixel_nfa_", strict=False), OracleMIoU(prefix="pixel_oracle_")])
"""

from __future__ import annotations

import torch
from anomalib.metrics import AnomalibMetric
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

DEFAULT_EPS = 1e-6


def _flatten_pairs(preds: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as ``[N, H*W]`` (a channel dimension of size 1 is dropped); shapes must agree."""
    if preds.ndim == 4 and preds.shape[1] == 1:
        preds = preds[:, 0]
    if target.ndim == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if preds.ndim == 2:
        preds, target = preds[None], (target[None] if target.ndim == 2 else target)
    if preds.shape != target.shape:
        msg = (
            f"Prediction and target masks must have the same shape, got {tuple(preds.shape)} and {tuple(target.shape)}."
        )
        raise ValueError(msg)
    return preds.flatten(1), target.flatten(1).bool()


def per_image_iou(pred_mask: torch.Tensor, gt_mask: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``(|P & G| + eps) / (|P | G| + eps)`` per image for masks ``[N, H, W]``."""
    preds, target = _flatten_pairs(pred_mask, gt_mask)
    preds = preds.bool()
    intersection = (preds & target).sum(dim=1, dtype=torch.float64)
    union = (preds | target).sum(dim=1, dtype=torch.float64)
    return (intersection + eps) / (union + eps)


class _MIoU(Metric):
    """Mean over images of the per-image IoU of binary masks."""

    full_state_update = False

    def __init__(self, eps: float = DEFAULT_EPS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.eps = eps
        self.add_state("iou_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, pred_mask: torch.Tensor, gt_mask: torch.Tensor) -> None:
        iou = per_image_iou(pred_mask, gt_mask, self.eps)
        self.iou_sum += iou.sum()
        self.num_images += iou.numel()

    def compute(self) -> torch.Tensor:
        if self.num_images == 0:
            msg = "MIoU.compute() called before any image was seen."
            raise RuntimeError(msg)
        return (self.iou_sum / self.num_images).float()


class MIoU(AnomalibMetric, _MIoU):  # type: ignore[misc]
    """Per-image mIoU of binary masks (fields ``pred_mask``, ``gt_mask`` by default)."""

    default_fields = ("pred_mask", "gt_mask")


class _OracleMIoU(Metric):
    """mIoU of continuous maps at the best single threshold over the evaluated set (exact candidate values)."""

    full_state_update = False

    def __init__(self, max_thresholds: int = 100_000, eps: float = DEFAULT_EPS, **kwargs) -> None:
        super().__init__(**kwargs)
        if max_thresholds < 2:
            msg = f"max_thresholds must be >= 2, got {max_thresholds}."
            raise ValueError(msg)
        self.max_thresholds = max_thresholds
        self.eps = eps
        self.best_threshold: torch.Tensor | None = None
        self.add_state("maps", default=[], dist_reduce_fx="cat")
        self.add_state("masks", default=[], dist_reduce_fx="cat")

    def update(self, anomaly_map: torch.Tensor, gt_mask: torch.Tensor) -> None:
        maps, masks = _flatten_pairs(anomaly_map, gt_mask)
        self.maps.append(maps.to(torch.promote_types(maps.dtype, torch.float32)))  # raw values, not rounded
        self.masks.append(masks)

    def compute(self) -> torch.Tensor:
        if len(self.maps) == 0:  # a list before DDP sync, a concatenated tensor after it
            msg = "OracleMIoU.compute() called before any image was seen."
            raise RuntimeError(msg)
        miou, self.best_threshold = oracle_miou(
            dim_zero_cat(self.maps), dim_zero_cat(self.masks), self.max_thresholds, self.eps
        )
        return miou.float()


def oracle_miou(
    maps: torch.Tensor, masks: torch.Tensor, max_thresholds: int = 100_000, eps: float = DEFAULT_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(best mIoU, its threshold)`` of ``maps >= t`` over exact candidate values (see the module docstring)."""
    maps, masks = _flatten_pairs(maps, masks)
    maps = maps.double()
    thresholds = torch.unique(maps)
    if thresholds.numel() > max_thresholds - 1:
        index = torch.linspace(0, thresholds.numel() - 1, max_thresholds - 1, device=thresholds.device)
        thresholds = thresholds[index.round().long()]
    thresholds = torch.cat([thresholds, thresholds.new_tensor([torch.inf])])  # inf: no detection
    iou_sum = torch.zeros_like(thresholds)
    for image_map, image_mask in zip(maps, masks, strict=True):
        values = torch.sort(image_map).values
        target_values = torch.sort(image_map[image_mask]).values
        predicted = values.numel() - torch.searchsorted(values, thresholds, side="left")  # |{map >= t}|
        intersection = target_values.numel() - torch.searchsorted(target_values, thresholds, side="left")
        union = predicted + target_values.numel() - intersection
        iou_sum += (intersection + eps) / (union + eps)
    best = int(torch.argmax(iou_sum))
    return iou_sum[best] / maps.shape[0], thresholds[best]


class OracleMIoU(AnomalibMetric, _OracleMIoU):  # type: ignore[misc]
    """Per-image mIoU at the oracle (best test-set) threshold (fields ``anomaly_map``, ``gt_mask`` by default)."""

    default_fields = ("anomaly_map", "gt_mask")
