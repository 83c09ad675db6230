"""Tests of the post-processor that keeps a model's own mask and label."""

from __future__ import annotations

import torch
from anomalib.data import ImageBatch, InferenceBatch
from anomalib.post_processing import PostProcessor

from anomalib_ext.components.post_processing import ModelMaskPostProcessor


def _fitted(processor: PostProcessor) -> PostProcessor:
    """Thresholds and min/max as after a validation epoch: every map value above 0.5 would be anomalous."""
    processor._image_threshold.fill_(0.5)  # noqa: SLF001
    processor._pixel_threshold.fill_(0.5)  # noqa: SLF001
    processor.image_min.fill_(0.0)
    processor.image_max.fill_(1.0)
    processor.pixel_min.fill_(0.0)
    processor.pixel_max.fill_(1.0)
    return processor


def _predictions(with_mask: bool, with_label: bool) -> InferenceBatch:
    anomaly_map = torch.full((2, 1, 4, 4), 0.9)  # above the learnt threshold everywhere
    own_mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    own_mask[1, 0, 0] = True
    return InferenceBatch(
        pred_score=torch.tensor([0.9, 0.9]),
        pred_label=own_mask.flatten(1).any(1) if with_label else None,
        anomaly_map=anomaly_map,
        pred_mask=own_mask if with_mask else None,
    )


def test_forward_keeps_model_mask_and_label() -> None:
    output = _fitted(ModelMaskPostProcessor())(_predictions(with_mask=True, with_label=True))
    assert output.pred_mask.sum() == 1
    assert output.pred_label.tolist() == [False, True]
    stock = _fitted(PostProcessor())(_predictions(with_mask=True, with_label=True))
    assert stock.pred_mask.all()  # the stock forward overrides the model's mask
    torch.testing.assert_close(output.anomaly_map, stock.anomaly_map)  # normalisation unchanged
    torch.testing.assert_close(output.pred_score, stock.pred_score)


def test_label_derived_from_mask_or_thresholds() -> None:
    output = _fitted(ModelMaskPostProcessor())(_predictions(with_mask=True, with_label=False))
    assert output.pred_label.tolist() == [False, True]
    output = _fitted(ModelMaskPostProcessor(derive_label_from_mask=False))(
        _predictions(with_mask=True, with_label=False)
    )
    assert output.pred_label.tolist() == [True, True]
    output = _fitted(ModelMaskPostProcessor())(_predictions(with_mask=False, with_label=False))
    assert output.pred_mask.all()  # no own mask: stock thresholding
    assert output.pred_label.tolist() == [True, True]


def test_batch_path_keeps_model_mask() -> None:
    predictions = _predictions(with_mask=True, with_label=False)
    batch = ImageBatch(image=torch.rand(2, 3, 4, 4), **predictions._asdict())
    _fitted(ModelMaskPostProcessor()).post_process_batch(batch)
    assert batch.pred_mask.sum() == 1
    assert batch.pred_label.tolist() == [False, True]


def test_checkpoint_config_round_trip() -> None:
    config = ModelMaskPostProcessor(derive_label_from_mask=False).checkpoint_config()
    restored = ModelMaskPostProcessor()
    restored.load_checkpoint_config(config)
    assert restored.derive_label_from_mask is False
