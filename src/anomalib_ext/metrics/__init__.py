"""Metrics of anomalib-ext, usable in any Anomalib :class:`~anomalib.metrics.Evaluator`."""

from .miou import MIoU, OracleMIoU, oracle_miou, per_image_iou

__all__ = ["MIoU", "OracleMIoU", "oracle_miou", "per_image_iou"]
