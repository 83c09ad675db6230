"""A post-processor for models that decide their own anomaly mask and label (e.g. with an a-contrario NFA test).

Anomalib's :class:`~anomalib.post_processing.PostProcessor` normalises scores and maps, and thresholds them with
F1-adaptive thresholds learnt on the validation set. On the ``engine.test`` / ``engine.predict`` path it already keeps
a ``pred_mask`` / ``pred_label`` that the model filled in, but its ``forward`` (used by ``model(x)`` and therefore by
every export: torch, ONNX, OpenVINO) always recomputes both from the thresholds.

:class:`ModelMaskPostProcessor` keeps the model's own ``pred_mask`` and ``pred_label`` on **every** path:

* ``forward(predictions)``: normalisation as usual; ``pred_mask`` / ``pred_label`` are taken from ``predictions``
  when the model provided them, and only otherwise computed from the learnt thresholds (the stock behaviour).
* ``on_test_batch_end`` / ``on_predict_batch_end``: same rule (inherited from the stock post-processor).
* Validation: the learnt thresholds and min/max statistics are unchanged, so normalised ``pred_score`` /
  ``anomaly_map`` mean the same as with the stock post-processor.

Generic contract for any model (U-Flow-NFA, MSFlow or NF-BMR with an optional NFA mask, ...): the torch model returns
``InferenceBatch(pred_score, pred_label, anomaly_map, pred_mask)`` and sets ``pred_mask`` (bool ``[B, H, W]``) and/or
``pred_label`` (bool ``[B]``) when it decides them itself, ``None`` otherwise. ``derive_label_from_mask=True`` makes an
image anomalous exactly when its own mask has a pixel set, when the model gave a mask but no label.

Usage::

    class MyModel(AnomalibModule):
        @classmethod
        def configure_post_processor(cls) -> ModelMaskPostProcessor:
            return ModelMaskPostProcessor()
"""

from __future__ import annotations

import torch
from anomalib.data import Batch, InferenceBatch
from anomalib.post_processing import PostProcessor


class ModelMaskPostProcessor(PostProcessor):
    """:class:`PostProcessor` that passes a model's own ``pred_mask`` / ``pred_label`` through on every path.

    Args:
        derive_label_from_mask: when the model gives a mask but no label, label an image anomalous iff its mask has
            at least one pixel set (instead of thresholding the image score). Defaults to ``True``.
        **kwargs: arguments of :class:`~anomalib.post_processing.PostProcessor` (normalisation, thresholding,
            sensitivities).
    """

    def __init__(self, derive_label_from_mask: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.derive_label_from_mask = derive_label_from_mask

    @property
    def _checkpoint_config_keys(self) -> tuple[str, ...]:
        return (*super()._checkpoint_config_keys, "derive_label_from_mask")

    def _own_label(self, pred_label: torch.Tensor | None, pred_mask: torch.Tensor | None) -> torch.Tensor | None:
        if pred_label is not None:
            return pred_label
        if pred_mask is not None and self.derive_label_from_mask:
            return pred_mask.flatten(1).any(dim=1)
        return None

    def forward(self, predictions: InferenceBatch) -> InferenceBatch:
        """Normalise as the stock post-processor; keep the model's mask and label when present."""
        processed = super().forward(predictions)
        pred_mask = predictions.pred_mask if predictions.pred_mask is not None else processed.pred_mask
        pred_label = self._own_label(predictions.pred_label, predictions.pred_mask)
        if pred_label is None:
            pred_label = processed.pred_label
        return InferenceBatch(
            pred_score=processed.pred_score,
            pred_label=pred_label,
            anomaly_map=processed.anomaly_map,
            pred_mask=pred_mask,
        )

    def threshold_batch(self, batch: Batch) -> None:
        """Fill only the missing ``pred_label`` / ``pred_mask`` of a test/predict batch from the thresholds."""
        batch.pred_label = self._own_label(batch.pred_label, batch.pred_mask)
        super().threshold_batch(batch)
