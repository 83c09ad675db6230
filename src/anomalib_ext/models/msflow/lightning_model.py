"""MSFlow (Zhou et al., TNNLS 2024) with optional task-specific extractor pre-training (Marc et al., EUSIPCO 2024).

One ``fit`` runs up to two stages, chosen by the epoch counter so that a checkpoint taken in either stage resumes where it
stopped:

1. epochs ``[0, pretrain_epochs)`` (only when ``pretrain_task`` is ``cutpaste`` or ``poisson``): the extractor's stages,
   inside a U-Net, learn to segment synthetic anomalies (BCE); the extractor is fine-tuned in place;
2. the remaining epochs: the extractor is frozen and the parallel + fusion flows are trained by maximum likelihood.

``trainer.max_epochs`` therefore counts both stages. The synthetic anomalies of stage 1 are made in the training
DataLoader's workers, seeded per sample (:mod:`anomalib_ext.components.data_synthesis`); the training step receives them
with their masks (``gt_mask``). Each stage follows MSFlow's schedule over its own epochs (Adam, linear
warm-up over the first 12 %, x1/3 at 70 % and 90 %).

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_ext.data import Textures
    >>> from anomalib_ext.models import MSFlow
    >>> model = MSFlow(backbone="efficientnet_lite0", pretrain_task="cutpaste", pretrain_epochs=5)  # doctest: +SKIP
    >>> Engine(max_epochs=15).fit(model, datamodule=Textures(category="gravel"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn, optim

from anomalib_ext.components.checkpoint import SlimCheckpointMixin
from anomalib_ext.components.data_synthesis import (
    SyntheticAnomalyDataset,
    install_synthesis,
    pre_processor_resize,
    remove_synthesis,
)
from anomalib_ext.components.post_processing import ModelMaskPostProcessor
from anomalib_ext.components.task_pretraining import (
    PRETRAIN_TASKS,
    SegmentationUNet,
    SyntheticAnomalyGenerator,
    save_encoder_weights,
    segmentation_loss,
    step_schedule_factor,
)

from .anomaly_map import AnomalyMapMode
from .loss import MSFlowLoss
from .torch_model import (
    DEFAULT_BACKBONE,
    DEFAULT_CLAMP,
    DEFAULT_FLOW_BLOCKS,
    DEFAULT_POSITIONAL_CHANNELS,
    MSFlowModel,
)

logger = logging.getLogger(__name__)

PAPER_IMAGE_SIZE = (512, 512)
PRETRAIN_PREFIX = "pretrain_network"
ENCODER_PREFIX = "model.feature_extractor.feature_extractor"  # the same module as pretrain_network.encoder


class MSFlow(SlimCheckpointMixin, AnomalibModule):
    """MSFlow: multi-scale normalising flows on a frozen (optionally task-pre-trained) CNN extractor.

    Args:
        backbone: timm CNN (default ``wide_resnet50_2.tv_in1k``: torchvision's ImageNet weights, as MSFlow; timm's plain
            ``wide_resnet50_2`` resolves to other weights; ``efficientnet_lite0`` works offline).
        layers: three feature taps, finest first; ``None``: the taps at strides 4/8/16 (``layer1..3`` for ResNets).
        pre_trained: start from ImageNet weights.
        backbone_weights: local timm-keyed weights file, e.g. an encoder written by ``anomalib-ext pretrain``.
        flow_blocks: AllInOne blocks of the parallel flows, finest scale first (paper: 2, 5, 8).
        clamp: affine clamp of the couplings (paper: 1.9).
        positional_channels: channels of the positional condition (paper: 64).
        top_k: fraction of the detection map averaged into the image score (paper: 0.03).
        anomaly_map: the map handed to Anomalib, both bounded in ``[0, 1)`` and comparable across images: ``add``
            (default; MSFlow's pixel-AUROC map) or ``mul`` (MSFlow's PRO map). See :mod:`.anomaly_map`.
        lr: Adam learning rate of the flows (paper: 1e-4; 1e-6 after task pre-training in the pre-training paper).
        lr_warmup_fraction / lr_warmup_start_factor / lr_milestones / lr_decay: MSFlow's schedule (12 %, 0.1, 70/90 %, 1/3).
        gradient_clip_norm: max gradient norm of the flow parameters (paper: 2; it acts on the un-normalised loss, as in
            MSFlow; the logged ``train_loss`` is the same loss per latent dimension).
        pretrain_task: ``none``, ``cutpaste`` or ``poisson``.
        pretrain_epochs: epochs of the pre-training stage (paper: 400).
        pretrain_lr: Adam learning rate of the U-Net (paper: 1e-4, same schedule).
        pretrain_adapt_batch_norm: let the encoder's BatchNorm running statistics follow the training images during
            pre-training (default ``False``: ImageNet's statistics stay frozen; the paper does not say).
        poisson_source: folder of defect images with masks for ``poisson`` (MVTec category, ``images/``+``masks/``, or
            ``<stem>_mask`` side by side).
        cutpaste_variant / poisson_mode: ``normal``/``scar`` CutPaste; ``normal`` (paper) / ``mixed`` seamless cloning.
        decoder_channels: U-Net decoder widths, finest first (``None``: the skip's channels).
        pretrain_weights_out: if set, the fine-tuned encoder is also written there (timm-keyed safetensors) when
            pre-training ends.
        seed: seed of the synthetic anomalies; sample ``i`` of epoch ``e`` uses ``(seed, e, i)``, made in the DataLoader
            workers, so the samples depend neither on ``num_workers`` nor on DDP sharding.
        use_nfa_mask: ``pred_mask`` from the a-contrario NFA test on the latents (as UFlowNFA) instead of a threshold
            learnt on validation maps; ``pred_label`` = the mask has a pixel. Not in exported graphs (numpy max-tree):
            there the post-processor thresholds the map as usual.
        log_nfa_threshold: NFA detections where ``log10 NFA < log_nfa_threshold`` (0: on average < 1 false region per
            normal image).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        backbone_weights: str | None = None,
        flow_blocks: Sequence[int] = DEFAULT_FLOW_BLOCKS,
        clamp: float = DEFAULT_CLAMP,
        positional_channels: int = DEFAULT_POSITIONAL_CHANNELS,
        top_k: float = 0.03,
        anomaly_map: AnomalyMapMode = "add",
        lr: float = 1e-4,
        lr_warmup_fraction: float = 0.12,
        lr_warmup_start_factor: float = 0.1,
        lr_milestones: Sequence[float] = (0.7, 0.9),
        lr_decay: float = 1 / 3,
        gradient_clip_norm: float = 2.0,
        pretrain_task: Literal["none", "cutpaste", "poisson"] = "none",
        pretrain_epochs: int = 400,
        pretrain_lr: float = 1e-4,
        pretrain_adapt_batch_norm: bool = False,
        poisson_source: str | None = None,
        cutpaste_variant: Literal["normal", "scar"] = "normal",
        poisson_mode: Literal["normal", "mixed"] = "normal",
        decoder_channels: Sequence[int] | None = None,
        pretrain_weights_out: str | None = None,
        seed: int = 0,
        use_nfa_mask: bool = False,
        log_nfa_threshold: float = 0.0,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
        slim_checkpoint: bool = False,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        if pretrain_task not in ("none", *PRETRAIN_TASKS):
            msg = f"pretrain_task must be 'none', 'cutpaste' or 'poisson', got '{pretrain_task}'."
            raise ValueError(msg)
        if pretrain_task == "poisson" and not poisson_source:
            msg = "pretrain_task='poisson' needs `poisson_source`: a folder of defect images with masks (e.g. an MVTec category)."
            raise ValueError(msg)
        if pretrain_task != "none" and pretrain_epochs < 1:
            msg = f"pretrain_epochs must be >= 1 when pretrain_task='{pretrain_task}', got {pretrain_epochs}."
            raise ValueError(msg)
        self.backbone = backbone
        self.pre_trained = pre_trained
        self.backbone_weights = backbone_weights
        self.lr = lr
        self.schedule = {
            "warmup_fraction": lr_warmup_fraction,
            "warmup_start_factor": lr_warmup_start_factor,
            "milestones": tuple(lr_milestones),
            "decay": lr_decay,
        }
        self.gradient_clip_norm = gradient_clip_norm
        self.pretrain_task = pretrain_task
        self.pretrain_epochs = pretrain_epochs if pretrain_task != "none" else 0
        self.pretrain_lr = pretrain_lr
        self.pretrain_adapt_batch_norm = pretrain_adapt_batch_norm
        self.poisson_source = poisson_source
        self.cutpaste_variant = cutpaste_variant
        self.poisson_mode = poisson_mode
        self.pretrain_weights_out = pretrain_weights_out
        self.seed = seed

        self.model = MSFlowModel(
            backbone=backbone,
            layers=layers,
            pre_trained=pre_trained,
            backbone_weights=backbone_weights,
            flow_blocks=flow_blocks,
            clamp=clamp,
            positional_channels=positional_channels,
            top_k=top_k,
            anomaly_map=anomaly_map,
            use_nfa_mask=use_nfa_mask,
            log_nfa_threshold=log_nfa_threshold,
        )
        self.loss = MSFlowLoss()
        self.pretrain_network: SegmentationUNet | None = None
        self.synthetic_data: SyntheticAnomalyDataset | None = None
        self._resume_epoch: int | None = None
        if self.pretrain_epochs:
            self.model.encoder.requires_grad_(True)
            self.pretrain_network = SegmentationUNet(
                self.model.encoder,
                channels=self.model.feature_extractor.out_dims,
                reductions=self.model.encoder.feature_info.reduction(),
                decoder_channels=decoder_channels,
            )

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to 512x512 (paper) and ImageNet-normalise."""
        return super().configure_pre_processor(image_size or PAPER_IMAGE_SIZE)

    @classmethod
    def configure_post_processor(cls) -> ModelMaskPostProcessor:
        """Stock normalisation and thresholds; keeps the model's own NFA mask and label when ``use_nfa_mask`` is set."""
        return ModelMaskPostProcessor()

    @property
    def flow_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the parallel and fusion flows."""
        return [
            p
            for module in (self.model.parallel_flows, self.model.fusion_flow)
            for p in module.parameters()
            if p.requires_grad
        ]

    def in_pretraining(self) -> bool:
        """Whether the current epoch belongs to the pre-training stage."""
        return self.current_epoch < self.pretrain_epochs

    def on_fit_start(self) -> None:
        """Check the epoch budget; for pre-training, install the synthesis in the training DataLoader's workers.

        The Poisson source is read (and checked) here, only when the fit starts or resumes in the pre-training stage.
        """
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            msg = "MSFlow's learning-rate schedule needs a finite `trainer.max_epochs`."
            raise ValueError(msg)
        if self.pretrain_epochs and max_epochs <= self.pretrain_epochs:
            msg = (
                f"trainer.max_epochs={max_epochs} leaves no epoch for the flows after {self.pretrain_epochs} pre-training "
                f"epochs: max_epochs counts both stages (e.g. {self.pretrain_epochs} + 100 = {self.pretrain_epochs + 100})."
            )
            raise ValueError(msg)
        strategy = self.trainer.strategy
        if (
            self.pretrain_epochs
            and isinstance(strategy, DDPStrategy)
            and not strategy._ddp_kwargs.get("find_unused_parameters")
        ):  # noqa: SLF001
            msg = (
                "With pretrain_task each stage leaves the other stage's parameters unused, which plain DDP rejects: use "
                "`--trainer.strategy ddp_find_unused_parameters_true` (or DDPStrategy(find_unused_parameters=True))."
            )
            raise ValueError(msg)
        first_epoch = self._resume_epoch if self.trainer.ckpt_path and self._resume_epoch is not None else 0
        self.synthetic_data = None
        remove_synthesis(self.trainer)  # e.g. left by an earlier fit with the same datamodule
        if first_epoch < self.pretrain_epochs:  # a fit resumed in the flow stage needs no synthesis (nor its source)
            generator = SyntheticAnomalyGenerator(
                self.pretrain_task,  # type: ignore[arg-type]
                source=self.poisson_source,
                cutpaste_variant=self.cutpaste_variant,
                poisson_mode=self.poisson_mode,
            )
            self.synthetic_data = install_synthesis(
                self.trainer, generator, seed=self.seed, resize=pre_processor_resize(self.pre_processor)
            )
            self.synthetic_data.epoch = first_epoch  # the first epoch's DataLoader iterator is built before its hooks

    def on_train_epoch_start(self) -> None:
        """Seed this epoch's synthetic samples; after pre-training the workers pass the normal images through."""
        if self.synthetic_data is not None:
            self.synthetic_data.start_epoch(self.current_epoch, self.trainer.train_dataloader)
            self.synthetic_data.enabled = self.in_pretraining()

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Pre-training stage: BCE of the U-Net on synthetic anomalies. Flow stage: MSFlow's negative log-likelihood."""
        del args, kwargs
        if self.in_pretraining():
            if batch.gt_mask is None:
                msg = "Pre-training batches need the synthetic-anomaly masks made in the DataLoader workers (gt_mask)."
                raise ValueError(msg)
            loss = segmentation_loss(
                self.pretrain_network,  # type: ignore[arg-type]
                batch.image,
                batch.gt_mask,
                adapt_batch_norm=self.pretrain_adapt_batch_norm,
            )
            self.log(
                "pretrain_bce", loss.item(), on_epoch=True, prog_bar=True, logger=True, batch_size=len(batch.image)
            )
            return {"loss": loss}
        latents, log_det = self.model(batch.image)
        loss = self.loss(latents, log_det)  # un-normalised, as MSFlow back-propagates it (the clip at 2 acts on it)
        per_dimension = self.loss.per_dimension(loss.detach(), latents)
        self.log("train_loss", per_dimension, on_epoch=True, prog_bar=True, logger=True, batch_size=len(batch.image))
        return {"loss": loss}

    def on_train_epoch_end(self) -> None:
        """When pre-training ends, optionally write the fine-tuned encoder (rank zero only)."""
        if self.pretrain_weights_out and self.current_epoch == self.pretrain_epochs - 1 and self.trainer.is_global_zero:
            path = save_encoder_weights(
                self.model.encoder,
                self.pretrain_weights_out,
                backbone=self.backbone,
                pre_trained=self.pre_trained,
                backbone_weights=self.backbone_weights,
                metadata={"task": self.pretrain_task, "epochs": str(self.pretrain_epochs)},
            )
            logger.info("Task-pre-trained encoder written to %s", path)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """After pre-training the U-Net is dead weight: checkpoints of the flow stage keep only MSFlow itself."""
        super().on_save_checkpoint(checkpoint)
        if not self.in_pretraining():
            state = checkpoint["state_dict"]
            for key in [key for key in state if key.startswith(f"{PRETRAIN_PREFIX}.")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Match the checkpoint to this model's pre-training configuration.

        A model without pre-training ignores a checkpoint's U-Net; a model with pre-training that loads a flow-stage
        checkpoint (no U-Net saved) keeps its fresh decoder and takes the encoder from the checkpoint's extractor.
        """
        super().on_load_checkpoint(checkpoint)
        epoch_progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
        self._resume_epoch = epoch_progress.get("current", {}).get("completed")  # where a resumed fit continues
        state = checkpoint["state_dict"]
        if self.pretrain_network is None:
            for key in [key for key in state if key.startswith(f"{PRETRAIN_PREFIX}.")]:
                del state[key]
            return
        for key, value in self.state_dict().items():
            if key.startswith(f"{PRETRAIN_PREFIX}.") and key not in state:
                shared = key.replace(f"{PRETRAIN_PREFIX}.encoder.", f"{ENCODER_PREFIX}.", 1)
                state[key] = state.get(shared, value)

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Anomaly maps and scores of the validation batch."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    def configure_gradient_clipping(
        self,
        optimizer: optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """The user's clipping (if any), then MSFlow's grad-norm clip of the flow parameters during the flow stage."""
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if not self.in_pretraining() and self.gradient_clip_norm > 0:
            nn.utils.clip_grad_norm_(self.flow_parameters, self.gradient_clip_norm)

    def configure_optimizers(self) -> dict[str, Any]:
        """One Adam with a flow group and (with pre-training) a U-Net group; each group follows MSFlow's schedule in its stage."""
        total_epochs = self.trainer.max_epochs
        pretrain_epochs = self.pretrain_epochs
        flow_epochs = max(1, total_epochs - pretrain_epochs)

        def flow_factor(epoch: int) -> float:
            return (
                0.0
                if epoch < pretrain_epochs
                else step_schedule_factor(epoch - pretrain_epochs, flow_epochs, **self.schedule)
            )

        def pretrain_factor(epoch: int) -> float:
            return step_schedule_factor(epoch, pretrain_epochs, **self.schedule) if epoch < pretrain_epochs else 0.0

        groups = [{"params": self.flow_parameters, "lr": self.lr}]
        factors = [flow_factor]
        if self.pretrain_network is not None:
            groups.append({"params": list(self.pretrain_network.parameters()), "lr": self.pretrain_lr})
            factors.append(pretrain_factor)
        optimizer = optim.Adam(groups)
        scheduler = optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=factors)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation (untrained flows); clipping is done in :meth:`configure_gradient_clipping`."""
        return {"num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on normal images only."""
        return LearningType.ONE_CLASS

    def save_pretrained_encoder(self, path: str | Path) -> Path:
        """Write the (possibly task-fine-tuned) encoder as a timm-keyed safetensors file for ``backbone_weights``."""
        return save_encoder_weights(
            self.model.encoder,
            path,
            backbone=self.backbone,
            pre_trained=self.pre_trained,
            backbone_weights=self.backbone_weights,
            metadata={"task": self.pretrain_task},
        )
