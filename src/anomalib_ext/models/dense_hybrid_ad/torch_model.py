"""DenseHybridAD network: a DeepLabV3-ResNet50 segmenter read as an energy model, plus an outlier head g.

Layout of torchvision's ``deeplabv3_resnet50`` and the names used here::

    x -> backbone (ResNet-50, output stride 8) -> classifier[0:2] (ASPP, 3x3 conv)  = decoder features f (pre-BN)
    f -> classifier[2:5] (BN-ReLU-1x1 conv, K classes) = s(x)      the segmentation head's final BN-ReLU-Conv
    f -> g: BN-ReLU-1x1 conv (1 logit)                = z(x)      the outlier head (DenseHybrid's "g")

The K logits are read as an unnormalised joint log-density, ln p̂(x, y) = s_y(x), so ln p̂(x) = logsumexp_k s_k(x); the
outlier head gives P(d_out | x) = sigmoid(z(x)). Test-time pixel score (paper, Sec. III-A, DenseHybrid Eq. 8):
``ln P(d_out|x) - ln p̂(x)``, higher = more anomalous, both terms upsampled bilinearly to the input size.

Freezing (Table I of the paper): ``"all"`` trains only the final BN-ReLU-Conv of both heads, ``"backbone"`` freezes the
ResNet-50, ``"none"`` trains everything. The segmenter is fine-tuned as a deterministic function: its BatchNorm layers keep
their pretrained running statistics and ASPP's dropout is off (eval mode, also after ``train()``); only the affine
parameters of the BatchNorm layers in the trainable part train. Otherwise small training batches of industrial images
with pasted negatives would renormalise the COCO features (and dropout would perturb them), and the student would not
start equal to the teacher (the frozen initial segmenter of the loss anchors): the KL would not be 0 at the start. The
new outlier head's BatchNorm learns its statistics as usual.

Weights, in order: ``segmenter_weights`` (a local torchvision-keyed DeepLabV3 state dict), torchvision's
``COCO_WITH_VOC_LABELS_V1`` weights when ``pre_trained=True`` (download), random initialisation when ``pre_trained=False``.
``backbone_weights`` (a local ImageNet ResNet-50 state dict, torchvision or timm keys) initialises only the ResNet-50.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn
from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights, deeplabv3_resnet50

from anomalib_ext.components.backbones import BackboneWeightsError, load_into, load_weights_file

from .anomaly_map import ImageScore, anomaly_score_map, image_scores

FreezeMode = Literal["all", "backbone", "none"]
FREEZE_MODES: tuple[str, ...] = ("all", "backbone", "none")
VOC_NUM_CLASSES = 21
DECODER_CHANNELS = 256


class TrainingOutput(NamedTuple):
    """Full-resolution outputs of one training forward pass."""

    class_logits: torch.Tensor  # s(x): [B, K, H, W]
    outlier_logit: torch.Tensor  # z(x): [B, 1, H, W]
    teacher_logits: torch.Tensor | None  # s(x) of the frozen initial segmenter (distillation anchor), [B, K, H, W]


def _strip_prefix(state_dict: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    for prefix in prefixes:
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def build_segmenter(
    num_classes: int = VOC_NUM_CLASSES,
    pre_trained: bool = True,
    segmenter_weights: str | Path | None = None,
    backbone_weights: str | Path | None = None,
) -> nn.Module:
    """torchvision's DeepLabV3-ResNet50 (no auxiliary head) with weights resolved as described in the module docstring."""
    segmenter = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    if backbone_weights is not None:
        state = _strip_prefix(load_weights_file(backbone_weights), ("module.", "model.", "backbone."))
        load_into(segmenter.backbone, state, str(backbone_weights))  # the classifier ``fc.*`` keys are ignored
    if segmenter_weights is not None:
        state = _strip_prefix(load_weights_file(segmenter_weights), ("module.", "model.", "segmenter."))
        load_into(segmenter, state, str(segmenter_weights))  # ``aux_classifier.*`` keys are ignored
    elif pre_trained and backbone_weights is None:
        if num_classes != VOC_NUM_CLASSES:
            msg = f"torchvision's pretrained DeepLabV3 has {VOC_NUM_CLASSES} classes, not {num_classes}: pass segmenter_weights."
            raise ValueError(msg)
        weights = DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as error:  # noqa: BLE001 - every download failure becomes one actionable message
            msg = (
                f"Could not download torchvision's DeepLabV3-ResNet50 weights ({weights.url}): {type(error).__name__}: {error}. "
                "Offline, pass a local torchvision-keyed DeepLabV3 state dict with `segmenter_weights=PATH` (save it once "
                "online with `torch.save(deeplabv3_resnet50(weights='COCO_WITH_VOC_LABELS_V1').state_dict(), PATH)`), an "
                "ImageNet ResNet-50 with `backbone_weights=PATH`, or set `pre_trained=False` for random initialisation."
            )
            raise BackboneWeightsError(msg) from error
        load_into(segmenter, state, weights.url)
    return segmenter


class OutlierHead(nn.Sequential):
    """DenseHybrid's head g: BN -> ReLU -> 1x1 conv giving one logit z(x) with P(d_out | x) = sigmoid(z(x))."""

    def __init__(self, in_channels: int = DECODER_CHANNELS) -> None:
        super().__init__(nn.BatchNorm2d(in_channels), nn.ReLU(), nn.Conv2d(in_channels, 1, kernel_size=1))


class DenseHybridADModel(nn.Module):
    """DenseHybridAD torch model (no Lightning).

    Args:
        num_classes: segmentation classes K (21 for torchvision's COCO/VOC weights).
        pre_trained: load torchvision's COCO/VOC weights when no local file is given.
        segmenter_weights: local DeepLabV3-ResNet50 state dict (torchvision keys).
        backbone_weights: local ImageNet ResNet-50 state dict for the backbone only.
        freeze: ``"all"`` (paper's best), ``"backbone"`` or ``"none"`` (Table I).
        teacher: keep a frozen copy of the initial segmenter's trainable part; its logits anchor the loss.
        image_score: ``"max"`` of the score map or ``"mean_top_k"`` (mean of the ``top_k`` highest-scoring fraction).
        top_k: fraction of pixels averaged by ``"mean_top_k"``.
    """

    def __init__(
        self,
        num_classes: int = VOC_NUM_CLASSES,
        pre_trained: bool = True,
        segmenter_weights: str | Path | None = None,
        backbone_weights: str | Path | None = None,
        freeze: FreezeMode = "all",
        teacher: bool = True,
        image_score: ImageScore = "max",
        top_k: float = 0.01,
    ) -> None:
        super().__init__()
        if freeze not in FREEZE_MODES:
            msg = f"Unknown freeze mode {freeze!r}; expected one of {FREEZE_MODES}."
            raise ValueError(msg)
        self.segmenter = build_segmenter(num_classes, pre_trained, segmenter_weights, backbone_weights)
        self.outlier_head = OutlierHead(DECODER_CHANNELS)
        self.freeze = freeze
        self.image_score = image_score
        self.top_k = top_k
        self._fixed_modules = self._apply_freeze()
        # Teacher: a frozen copy of the smallest suffix of the segmenter that contains every trainable
        # segmenter parameter; it runs on the (identical, frozen) input of that suffix.
        self.teacher: nn.Module | None = None
        if teacher:
            self.teacher = copy.deepcopy(self._trainable_suffix()).requires_grad_(False).eval()
        image_scores(torch.zeros(1, 1, 2, 2), image_score, top_k)  # validate the image-score options early
        self.train()  # puts the segmenter's BatchNorm and dropout layers into eval mode from the start

    # -- structure --------------------------------------------------------------------------------------------------
    @property
    def class_head(self) -> nn.Sequential:
        """The segmentation head's final BN-ReLU-1x1 conv (``classifier[2:5]``)."""
        return nn.Sequential(*list(self.segmenter.classifier.children())[2:])

    @property
    def decoder(self) -> nn.Sequential:
        """ASPP and the 3x3 conv that produce the shared decoder features f (``classifier[0:2]``)."""
        return nn.Sequential(*list(self.segmenter.classifier.children())[:2])

    def trainable_module_names(self) -> list[str]:
        """Qualified names of the modules whose parameters train under the chosen freeze mode."""
        heads = ["segmenter.classifier.2", "segmenter.classifier.4", "outlier_head"]
        if self.freeze == "all":
            return heads
        if self.freeze == "backbone":
            return ["segmenter.classifier", "outlier_head"]
        return ["segmenter", "outlier_head"]

    def _apply_freeze(self) -> list[nn.Module]:
        """Set ``requires_grad`` by freeze mode; return the segmenter's BatchNorm and dropout layers (always in eval mode)."""
        self.requires_grad_(False)
        for name in self.trainable_module_names():
            self.get_submodule(name).requires_grad_(True)
        fixed = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
        return [module for module in self.segmenter.modules() if isinstance(module, fixed)]

    def _trainable_suffix(self) -> nn.Module:
        return {"all": self.class_head, "backbone": self.segmenter.classifier, "none": self.segmenter}[self.freeze]

    def train(self, mode: bool = True) -> DenseHybridADModel:
        """Switch modes; the segmenter's BatchNorm and dropout layers and the teacher always stay in eval mode."""
        super().train(mode)
        for module in self._fixed_modules:
            module.eval()
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # -- forward ----------------------------------------------------------------------------------------------------
    def _teacher_logits(
        self, images: torch.Tensor, backbone_features: torch.Tensor, decoder_features: torch.Tensor
    ) -> torch.Tensor:
        assert self.teacher is not None  # noqa: S101 - only called with a teacher
        with torch.no_grad():
            if self.freeze == "all":
                return self.teacher(decoder_features)
            if self.freeze == "backbone":
                return self.teacher(backbone_features)
            return self.teacher.classifier(self.teacher.backbone(images)["out"])

    def heads(self, images: torch.Tensor) -> TrainingOutput:
        """Class logits s(x), outlier logit z(x) (and the teacher's logits in training), upsampled to the input size."""
        size = images.shape[-2:]
        backbone_features = self.segmenter.backbone(images)["out"]
        decoder_features = self.decoder(backbone_features)
        class_logits = self.class_head(decoder_features)
        outlier_logit = self.outlier_head(decoder_features)
        teacher_logits = None
        if self.teacher is not None and self.training:
            teacher_logits = self._teacher_logits(images, backbone_features, decoder_features)
            teacher_logits = F.interpolate(teacher_logits, size=size, mode="bilinear", align_corners=False)
        return TrainingOutput(
            class_logits=F.interpolate(class_logits, size=size, mode="bilinear", align_corners=False),
            outlier_logit=F.interpolate(outlier_logit, size=size, mode="bilinear", align_corners=False),
            teacher_logits=teacher_logits,
        )

    def forward(self, images: torch.Tensor) -> TrainingOutput | InferenceBatch:
        """Training: :class:`TrainingOutput`. Eval: ``InferenceBatch`` with the score map [B, 1, H, W] and image scores."""
        output = self.heads(images)
        if self.training:
            return output
        anomaly_map = anomaly_score_map(output.class_logits, output.outlier_logit)
        return InferenceBatch(
            pred_score=image_scores(anomaly_map, self.image_score, self.top_k), anomaly_map=anomaly_map
        )
