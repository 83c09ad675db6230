"""DenseHybridAD: hybrid generative/discriminative dense anomaly detection (Deković, Grcić, Šegvić).

DenseHybrid (Grcić et al., ECCV 2022) adapted to industrial images: a pretrained DeepLabV3-ResNet50 segmenter whose logits
are read as an unnormalised log-density, an outlier head g, and negatives (object masks cut from another image source)
pasted into the normal training images. The training DataLoader's workers paste one negative per image (seeded per
sample); each training step minimises the bounded Eq. 1 loss (:mod:`.loss`). At test time the pixel score is
``ln P(d_out|x) - ln p̂(x)``.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_ext.data import Textures
    >>> from anomalib_ext.models import DenseHybridAD
    >>> model = DenseHybridAD(segmenter_weights="deeplabv3_resnet50_coco.pth", negative_source="ADEChallengeData2016")  # doctest: +SKIP
    >>> Engine(max_epochs=40).fit(model, datamodule=Textures(category="gravel"))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_ext.components.checkpoint import SlimCheckpointMixin
from anomalib_ext.components.data_synthesis import SyntheticAnomalyDataset, install_synthesis, pre_processor_resize
from anomalib_ext.components.negative_sources import ADE20KSplit

from .anomaly_map import ImageScore
from .loss import DEFAULT_DENSITY_ANCHOR, PAPER_BETA, DenseHybridLoss
from .negatives import NegativePaster, NegativeShape
from .torch_model import VOC_NUM_CLASSES, DenseHybridADModel, FreezeMode


class DenseHybridAD(SlimCheckpointMixin, AnomalibModule):
    """DenseHybridAD Lightning module.

    Args:
        pre_trained: load torchvision's COCO/VOC DeepLabV3 weights (download) when no local file is given; ``False``:
            random initialisation (tests). The method needs a pretrained segmenter to work well (paper, Sec. III).
        segmenter_weights: local torchvision-keyed DeepLabV3-ResNet50 state dict (the offline way to get the paper's weights).
        backbone_weights: local ImageNet ResNet-50 state dict (torchvision/timm keys) for the backbone only.
        num_classes: classes K of the segmenter (21 for the COCO/VOC weights).
        freeze: ``"all"`` (all but the final BN-ReLU-Conv of both heads; paper's best), ``"backbone"``, ``"none"``.
        beta: weight β of the outlier terms (paper: 0.03).
        inlier_likelihood: DenseHybrid's inlier term ``-β·E_in[ln p̂(x)]`` (see :mod:`.loss`).
        distillation_weight: weight of the KL divergence to the frozen initial segmenter on normal pixels (0 disables).
        density_anchor: weight λ of the squared log-density shift from the frozen initial segmenter; it bounds the loss
            below by ``-2β²/(4λ)`` for every parameter value (0 disables: the loss is then unbounded, see :mod:`.loss`).
        negative_source: folder of negatives (ADE20K, or images with masks); ``None``: procedural shapes and colours.
        negative_shape: ``"mask"`` (object-shaped, paper) or ``"rectangle"`` (DenseHybrid's original).
        negative_size: extent of a negative as fractions of the shorter image side.
        negative_split: ADE20K scene-parsing split used as negatives.
        image_score: ``"max"`` of the pixel scores or ``"mean_top_k"``.
        top_k: fraction of pixels averaged by ``"mean_top_k"``.
        learning_rate: Adam learning rate (the paper does not state one).
    """

    weight_sources: ClassVar[dict[str, Any]] = {
        "pre_trained": False,
        "segmenter_weights": None,
        "backbone_weights": None,
    }

    def __init__(
        self,
        pre_trained: bool = True,
        segmenter_weights: str | Path | None = None,
        backbone_weights: str | Path | None = None,
        num_classes: int = VOC_NUM_CLASSES,
        freeze: FreezeMode = "all",
        beta: float = PAPER_BETA,
        inlier_likelihood: bool = True,
        distillation_weight: float = 1.0,
        density_anchor: float = DEFAULT_DENSITY_ANCHOR,
        negative_source: str | Path | None = None,
        negative_shape: NegativeShape = "mask",
        negative_size: Sequence[float] = (0.1, 0.5),
        negative_split: ADE20KSplit = "training",
        image_score: ImageScore = "max",
        top_k: float = 0.01,
        learning_rate: float = 1e-4,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
        slim_checkpoint: bool = False,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        self.save_hyperparameters(ignore=["pre_processor", "post_processor", "evaluator", "visualizer"])
        self.negatives = NegativePaster(negative_source, negative_shape, negative_size, negative_split)
        self.loss = DenseHybridLoss(
            beta=beta,
            inlier_likelihood=inlier_likelihood,
            distillation_weight=distillation_weight,
            density_anchor=density_anchor,
        )
        self.model = DenseHybridADModel(
            num_classes=num_classes,
            pre_trained=pre_trained,
            segmenter_weights=segmenter_weights,
            backbone_weights=backbone_weights,
            freeze=freeze,
            teacher=self.loss.needs_teacher,
            image_score=image_score,
            top_k=top_k,
        )
        self.learning_rate = learning_rate

    negative_data: SyntheticAnomalyDataset | None = (
        None  # the training dataset's wrapper, installed by ``on_fit_start``
    )

    def on_fit_start(self) -> None:
        """Paste the negatives in the training DataLoader's workers (see :mod:`anomalib_ext.components.data_synthesis`).

        Sample ``i`` of epoch ``e`` is seeded with ``(torch.initial_seed(), e, i)``: ``seed_everything`` makes the
        negatives reproducible, whatever ``num_workers`` or the DDP sharding.
        """
        self.negative_data = install_synthesis(
            self.trainer, self.negatives, seed=torch.initial_seed(), resize=pre_processor_resize(self.pre_processor)
        )
        self.negative_data.epoch = self.current_epoch  # the first epoch's DataLoader iterator is built before its hooks

    def on_train_epoch_start(self) -> None:
        """Seed this epoch's negatives."""
        self.negative_data.start_epoch(self.current_epoch, self.trainer.train_dataloader)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Minimise the bounded DenseHybridAD loss on images that carry their pasted negative (``gt_mask``)."""
        del args, kwargs
        if batch.gt_mask is None:
            msg = "Training batches need the pasted-negative masks made in the DataLoader workers (gt_mask)."
            raise ValueError(msg)
        images, outlier_mask = batch.image, batch.gt_mask.bool()
        output = self.model(images)
        terms = self.loss(output.class_logits, output.outlier_logit, outlier_mask, output.teacher_logits)
        batch_size = images.shape[0]
        self.log("train_loss", terms.total, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log_dict(
            {
                "train_outlier_head": terms.outlier_head,
                "train_likelihood": terms.likelihood,
                "train_density_anchor": terms.density_anchor,
                "train_distillation": terms.distillation,
            },
            on_step=False,
            on_epoch=True,
            batch_size=batch_size,
        )
        return {"loss": terms.total}

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score the batch: the hybrid pixel score map and the image score."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over the parameters left trainable by the freeze mode."""
        parameters = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        return torch.optim.Adam(parameters, lr=self.learning_rate)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No method-specific trainer settings: epochs (paper: 40) come from the user's configuration."""
        return {}

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on normal images only (negatives are synthetic)."""
        return LearningType.ONE_CLASS
