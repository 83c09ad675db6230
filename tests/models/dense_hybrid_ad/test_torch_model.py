"""DenseHybridAD network, scores, loss and freezing (random init, 64 px inputs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torchvision.models import resnet50
from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights

from anomalib_ext.components.backbones import BackboneWeightsError
from anomalib_ext.models.dense_hybrid_ad.anomaly_map import anomaly_score_map, image_scores
from anomalib_ext.models.dense_hybrid_ad.torch_model import DenseHybridADModel

HEAD_TAILS = {"segmenter.classifier.2", "segmenter.classifier.4", "outlier_head.0", "outlier_head.2"}


@pytest.fixture(scope="module")
def model() -> DenseHybridADModel:
    torch.manual_seed(0)
    return DenseHybridADModel(pre_trained=False)


def _trainable(model: DenseHybridADModel) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_freeze_all_trains_only_the_final_bn_relu_conv_of_both_heads(model: DenseHybridADModel) -> None:
    expected = {f"{module}.{kind}" for module in HEAD_TAILS for kind in ("weight", "bias")}
    assert _trainable(model) == expected
    assert not any(parameter.requires_grad for parameter in model.teacher.parameters())


@pytest.mark.parametrize("freeze", ["backbone", "none"])
def test_freeze_backbone_and_none(freeze: str) -> None:
    model = DenseHybridADModel(pre_trained=False, freeze=freeze, teacher=False)
    names = {name for name, _ in model.named_parameters()}
    if freeze == "backbone":
        expected = {name for name in names if name.startswith(("segmenter.classifier.", "outlier_head."))}
        assert not any(name.startswith("segmenter.backbone.") for name in _trainable(model))
        assert any(name.startswith("segmenter.classifier.0.") for name in expected)  # ASPP trains
    else:
        expected = names
    assert _trainable(model) == expected


def test_unknown_freeze_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="freeze mode"):
        DenseHybridADModel(pre_trained=False, freeze="heads")  # type: ignore[arg-type]


def test_segmenter_batchnorm_stays_in_eval_mode_and_frozen_weights_do_not_move() -> None:
    model = DenseHybridADModel(pre_trained=False)
    assert not model.segmenter.backbone.layer1[0].bn1.training  # already at construction
    model.train()
    frozen_bn = model.segmenter.backbone.bn1
    assert not frozen_bn.training and not model.teacher.training
    # the trainable class-head BN keeps its running statistics (affine part trains); the new outlier head's BN learns them
    assert not model.segmenter.classifier[2].training and model.outlier_head[0].training
    assert model.segmenter.classifier[2].weight.requires_grad
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    output = model(torch.randn(2, 3, 64, 64))
    (output.class_logits.mean() + output.outlier_logit.mean()).backward()
    optimizer.step()
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    trainable_prefixes = tuple(f"{module}." for module in HEAD_TAILS)
    assert changed, "nothing trained"
    assert all(name.startswith(trainable_prefixes) for name in changed), sorted(changed)[:5]


def test_outputs_and_hybrid_score(model: DenseHybridADModel) -> None:
    images = torch.randn(2, 3, 64, 64)
    model.train()
    training = model(images)
    assert training.class_logits.shape == (2, 21, 64, 64) and training.outlier_logit.shape == (2, 1, 64, 64)
    assert torch.allclose(training.teacher_logits, training.class_logits, atol=1e-5)  # teacher = initial segmenter
    model.eval()
    with torch.no_grad():
        result = model(images)
        heads = model.heads(images)
    expected = F.logsigmoid(heads.outlier_logit) - torch.logsumexp(heads.class_logits, dim=1, keepdim=True)
    assert result.anomaly_map.shape == (2, 1, 64, 64)
    assert torch.allclose(result.anomaly_map, expected)
    assert torch.allclose(result.pred_score, expected.flatten(1).amax(1))


def test_image_scores() -> None:
    scores = torch.arange(100, dtype=torch.float32).reshape(1, 1, 10, 10)
    assert image_scores(scores, "max").item() == 99
    assert image_scores(scores, "mean_top_k", top_k=0.05).item() == pytest.approx(97.0)
    with pytest.raises(ValueError, match="image score"):
        image_scores(scores, "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_k"):
        image_scores(scores, "mean_top_k", top_k=0.0)


def test_score_is_shift_equivariant_in_log_density() -> None:
    logits, outlier = torch.randn(1, 21, 4, 4), torch.randn(1, 1, 4, 4)
    assert torch.allclose(anomaly_score_map(logits - 3.0, outlier), anomaly_score_map(logits, outlier) + 3.0, atol=1e-5)


def test_local_segmenter_and_backbone_weights(tmp_path: Path, model: DenseHybridADModel) -> None:
    segmenter_file = tmp_path / "deeplab.pth"
    torch.save(model.segmenter.state_dict(), segmenter_file)
    loaded = DenseHybridADModel(pre_trained=False, segmenter_weights=segmenter_file, teacher=False)
    for key, value in model.segmenter.state_dict().items():
        assert torch.equal(loaded.segmenter.state_dict()[key], value), key
    resnet = resnet50()
    backbone_file = tmp_path / "resnet50.pth"
    torch.save(resnet.state_dict(), backbone_file)  # includes the ImageNet classifier ``fc``, which is ignored
    with_backbone = DenseHybridADModel(pre_trained=False, backbone_weights=backbone_file, teacher=False)
    assert torch.equal(with_backbone.segmenter.backbone.layer4[2].conv3.weight, resnet.layer4[2].conv3.weight)
    torch.save({"conv1.weight": resnet.conv1.weight}, tmp_path / "partial.pth")
    with pytest.raises(BackboneWeightsError, match="lack"):
        DenseHybridADModel(pre_trained=False, segmenter_weights=tmp_path / "partial.pth")


def test_offline_pretrained_without_file_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(DeepLabV3_ResNet50_Weights, "get_state_dict", offline)
    with pytest.raises(BackboneWeightsError, match="segmenter_weights=PATH"):
        DenseHybridADModel(pre_trained=True)
