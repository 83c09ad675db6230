"""Metrics of anomalib-ext, usable in any Anomalib :class:`~anomalib.metrics.Evaluator`."""

from .miou import MIoU, OracleMIoU, per_image_iou

__all__ = ["MIoU", "OracleMIoU", "per_image_iou"]
