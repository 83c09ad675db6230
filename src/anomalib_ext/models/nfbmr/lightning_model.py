"""NF-BMR (Zhang et al., CMC 2024) as an Anomalib model, both training stages inside one ``fit``.

Stages follow the epoch counter, so a checkpoint taken in either stage resumes where it stopped:

1. epochs ``[0, tnf_epochs)``: the TNF flow learns ``p(y)`` by maximum likelihood (eq. 8), with its own Adam
   (lr 2e-4, weight decay 1e-5);
2. epochs ``[tnf_epochs, tnf_epochs + bmr_epochs)``: SNN and TNF frozen, the mapper (BMR or B-PFM) learns eqs. 11-13
   with its own Adam (lr 3e-4, weight decay 1e-5). Skipped with ``nf_only=True``.

Manual optimisation steps only the current stage's optimiser; both optimisers' states live in the checkpoint. The
progress bar shows ``stage`` (1 or 2) and the stage's loss (``tnf_nll`` or ``bmr_loss``); the switch is logged.
Training stops after the last stage. When ``trainer.max_epochs`` is shorter than both stages together, the stages are
shrunk in proportion to fit (with a warning); the switch may then fall inside an epoch (``Engine(max_epochs=1)``: first
half of the batches stage 1, second half stage 2). The last training epoch always ends with a validation, so the
post-processor's thresholds and normalisation come from the finished model (stage 2), never from a stage-1 validation
(scored with the flow), whatever ``check_val_every_n_epoch``.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_ext.data import Textures
    >>> from anomalib_ext.models import NFBMR
    >>> model = NFBMR(backbone="efficientnet_lite0", layer="blocks.4", tnf_epochs=10, bmr_epochs=10)  # doctest: +SKIP
    >>> Engine(max_epochs=20).fit(model, datamodule=Textures(category="gravel"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT

from anomalib_ext.components.checkpoint import SlimCheckpointMixin
from anomalib_ext.components.post_processing import ModelMaskPostProcessor

from .loss import BidirectionalMappingLoss, FlowNLLLoss
from .torch_model import PAPER_BACKBONE, PAPER_LAYER, NFBMRModel

logger = logging.getLogger(__name__)

__all__ = ["NFBMR"]

PAPER_IMAGE_SIZE = (768, 768)
TNF_STAGE, BMR_STAGE = 1, 2


class NFBMR(SlimCheckpointMixin, AnomalibModule):
    """Normalizing-flow bidirectional mapping residual network.

    Args:
        backbone: timm model of the frozen SNN (paper: ``efficientnet_b5``; ``efficientnet_lite0`` works offline).
        layer: module of the backbone whose output is the source feature (paper: ``blocks.5``, 304 channels at
            stride 32 of EfficientNet-b5).
        pre_trained: ImageNet weights for the SNN.
        backbone_weights: local timm-keyed weights file for the SNN.
        mapper: ``"bmr"`` (paper) or ``"bpfm"`` (ablation, Table 5).
        nf_only: train and score with the TNF alone (ablation, Table 5); ``bmr_epochs`` is then ignored.
        tnf_epochs / bmr_epochs: epochs of the two stages (paper: 300 + 300).
        tnf_lr / tnf_weight_decay, bmr_lr / bmr_weight_decay: the stages' Adam settings (paper: 2e-4 / 1e-5,
            3e-4 / 1e-5).
        flow_blocks / flow_hidden_channels / flow_kernel_size / flow_clamp / permutation_seed: the TNF (paper: 4 coupling
            blocks, hidden 1024; kernel size not stated, 3 here; FrEIA's default clamp 2).
        mapper_hidden_channels: ``c_latent`` of BMR / hidden width of B-PFM (paper: 1024).
        bottleneck_channels: inner width of the BMR residual blocks (default ``mapper_hidden_channels // 4``).
        residual_blocks: ``n`` BMR residual blocks on each side of the shared one (paper: 2).
        use_nfa_mask: ``pred_mask`` / ``pred_label`` from the a-contrario NFA test on the TNF latents.
        log_nfa_threshold: NFA detections where ``log10 NFA < log_nfa_threshold`` (0: NFA < 1).
        pre_processor, post_processor, evaluator, visualizer: Anomalib components (``True``: this model's defaults).
    """

    def __init__(
        self,
        backbone: str = PAPER_BACKBONE,
        layer: str = PAPER_LAYER,
        pre_trained: bool = True,
        backbone_weights: str | None = None,
        mapper: Literal["bmr", "bpfm"] = "bmr",
        nf_only: bool = False,
        tnf_epochs: int = 300,
        bmr_epochs: int = 300,
        tnf_lr: float = 2e-4,
        tnf_weight_decay: float = 1e-5,
        bmr_lr: float = 3e-4,
        bmr_weight_decay: float = 1e-5,
        flow_blocks: int = 4,
        flow_hidden_channels: int = 1024,
        flow_kernel_size: int = 3,
        flow_clamp: float = 2.0,
        permutation_seed: int = 0,
        mapper_hidden_channels: int = 1024,
        bottleneck_channels: int | None = None,
        residual_blocks: int = 2,
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
        if tnf_epochs < 1 or (not nf_only and bmr_epochs < 1):
            msg = f"Both stages need at least one epoch, got tnf_epochs={tnf_epochs}, bmr_epochs={bmr_epochs}."
            raise ValueError(msg)
        if self.input_size is None:
            msg = "NFBMR needs a fixed input size: give it a pre-processor that resizes (e.g. Resize((768, 768)))."
            raise ValueError(msg)
        self.automatic_optimization = False
        self.tnf_epochs = tnf_epochs
        self.bmr_epochs = 0 if nf_only else bmr_epochs
        self.optimizer_settings = {
            TNF_STAGE: {"lr": tnf_lr, "weight_decay": tnf_weight_decay},
            BMR_STAGE: {"lr": bmr_lr, "weight_decay": bmr_weight_decay},
        }
        self.model = NFBMRModel(
            input_size=self.input_size,
            backbone=backbone,
            layer=layer,
            pre_trained=pre_trained,
            backbone_weights=backbone_weights,
            flow_blocks=flow_blocks,
            flow_hidden_channels=flow_hidden_channels,
            flow_kernel_size=flow_kernel_size,
            flow_clamp=flow_clamp,
            permutation_seed=permutation_seed,
            mapper=mapper,
            mapper_hidden_channels=mapper_hidden_channels,
            bottleneck_channels=bottleneck_channels,
            residual_blocks=residual_blocks,
            nf_only=nf_only,
            use_nfa_mask=use_nfa_mask,
            log_nfa_threshold=log_nfa_threshold,
        )
        self.flow_loss = FlowNLLLoss()
        self.mapping_loss = BidirectionalMappingLoss()
        self._announced_stage: int | None = None
        self._stage_boundary = float(self.tnf_epochs)  # training progress (epochs) where stage 2 starts
        self._last_epoch = self.total_epochs - 1

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to 768 x 768 (paper) and ImageNet-normalise."""
        return super().configure_pre_processor(image_size or PAPER_IMAGE_SIZE)

    @classmethod
    def configure_post_processor(cls) -> ModelMaskPostProcessor:
        """Stock normalisation and thresholds; keeps the NFA mask and label when ``use_nfa_mask`` is on."""
        return ModelMaskPostProcessor()

    @property
    def total_epochs(self) -> int:
        """Epochs of both stages together."""
        return self.tnf_epochs + self.bmr_epochs

    def stage_of_progress(self, progress: float) -> int:
        """``1`` (TNF) before the stage boundary (``tnf_epochs``, or its share of a shorter ``max_epochs``), else ``2``."""
        return TNF_STAGE if progress < self._stage_boundary else BMR_STAGE

    def _progress(self, batch_idx: int) -> float:
        """Training progress in epochs at batch ``batch_idx`` of the current epoch."""
        batches = self.trainer.num_training_batches
        fraction = max(batch_idx, 0) / batches if 0 < batches < float("inf") else 0.0
        return self.current_epoch + fraction

    def on_fit_start(self) -> None:
        """Fit the stages into ``trainer.max_epochs``: shrink them in proportion (with a warning) when it is shorter."""
        max_epochs = self.trainer.max_epochs
        self._stage_boundary, self._last_epoch = float(self.tnf_epochs), self.total_epochs - 1
        if max_epochs is not None and 0 < max_epochs < self.total_epochs:
            self._stage_boundary = max_epochs * self.tnf_epochs / self.total_epochs
            self._last_epoch = max_epochs - 1
            logger.warning(
                "trainer.max_epochs=%d is shorter than NF-BMR's stages (tnf_epochs=%d + bmr_epochs=%d): both are shrunk "
                "in proportion, stage 2 starts after %.2f epochs.",
                max_epochs,
                self.tnf_epochs,
                self.bmr_epochs,
                self._stage_boundary,
            )
        self._announced_stage = None

    def on_train_epoch_start(self) -> None:
        """In the last training epoch, make sure that it ends with a validation (thresholds from stage 2)."""
        every = self.trainer.check_val_every_n_epoch
        epoch = self.current_epoch
        if epoch == self._last_epoch and every is not None and (epoch + 1) % every != 0:
            logger.info("NF-BMR: validating after the last epoch (%d) so that thresholds come from stage 2.", epoch)
            self.trainer.check_val_every_n_epoch = epoch + 1

    def _enter_stage(self, stage: int) -> None:
        """Set the train/eval modes of the stage; announce it when it starts (or when a resumed run enters it)."""
        self.model.flow.train(stage == TNF_STAGE)
        if self.model.mapper is not None:
            self.model.mapper.train(stage == BMR_STAGE)
        if stage != self._announced_stage:
            self._announced_stage = stage
            if stage == TNF_STAGE:
                logger.info("NF-BMR stage 1/2: TNF flow from epoch %d (eq. 8).", self.current_epoch)
            else:
                logger.info(
                    "NF-BMR stage 2/2: %s mapper from epoch %d, extractor and TNF frozen (eqs. 11-13).",
                    self.hparams.mapper.upper(),
                    self.current_epoch,
                )

    def _idle_parameter_tie(self, stage: int) -> torch.Tensor | int:
        """Zero-valued term that touches the idle stage's parameters (DDP only).

        DDP's reducer (``find_unused_parameters=False``) expects a gradient for every trainable parameter it was
        built with; the idle stage then gets exact zero gradients, and its optimiser is not stepped.
        """
        if self.trainer.world_size <= 1:
            return 0
        idle = self.model.stage_parameters()["bmr" if stage == TNF_STAGE else "tnf"]
        return sum((parameter.sum() * 0.0 for parameter in idle), start=0)

    def training_step(self, batch: Batch, batch_idx: int = 0, *args, **kwargs) -> STEP_OUTPUT:
        """Stage 1: TNF NLL (eq. 8). Stage 2: bidirectional mapping loss (eqs. 11-13) with SNN and TNF frozen."""
        del args, kwargs
        stage = self.stage_of_progress(self._progress(batch_idx))
        self._enter_stage(stage)
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        optimizer = optimizers[stage - 1]
        batch_size = len(batch.image)
        source = self.model.extract(batch.image)
        if stage == TNF_STAGE:
            target, log_jacobian = self.model.encode(source)
            loss = self.flow_loss(target, log_jacobian)
            self.log("tnf_nll", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        else:
            with torch.no_grad():
                target, _ = self.model.encode(source)
            loss, source_loss, target_loss = self.mapping_loss(*self.model.map(source, target))
            self.log("bmr_loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
            losses = {"bmr_loss_source": source_loss.detach(), "bmr_loss_target": target_loss.detach()}
            self.log_dict(losses, on_epoch=True, batch_size=batch_size)
        self.log("stage", float(stage), on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
        optimizer.zero_grad()
        self.manual_backward(loss + self._idle_parameter_tie(stage))
        optimizer.step()
        return {"loss": loss.detach()}

    def on_train_epoch_end(self) -> None:
        """Stop once both stages are done (``trainer.max_epochs`` may be larger)."""
        if self.current_epoch >= self._last_epoch:
            self.trainer.should_stop = True

    def _predict(self, batch: Batch) -> Batch:
        return batch.update(**self.model(batch.image)._asdict())

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Scores of the validation batch; after a stage-1 epoch of a fit, the TNF likelihood (the mapper is untrained)."""
        del args, kwargs
        flow_score = False
        if self.trainer.state.fn == TrainerFn.FITTING:
            last_batch = self.trainer.num_training_batches - 1  # the stage of the epoch's last training step
            flow_score = self.stage_of_progress(self._progress(last_batch)) == TNF_STAGE
        return batch.update(**self.model(batch.image, flow_score=flow_score)._asdict())

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """One Adam per stage: TNF (lr 2e-4) and, unless ``nf_only``, the mapper (lr 3e-4); weight decay 1e-5."""
        parameters = self.model.stage_parameters()
        optimizers = [torch.optim.Adam(parameters["tnf"], **self.optimizer_settings[TNF_STAGE])]
        if parameters["bmr"]:
            optimizers.append(torch.optim.Adam(parameters["bmr"], **self.optimizer_settings[BMR_STAGE]))
        return optimizers

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation pass (untrained networks would feed the post-processor's statistics)."""
        return {"num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on normal images only."""
        return LearningType.ONE_CLASS
