"""Patch auto-encoder (``PatchAE``) and patch VQ-VAE (``PatchVQVAE``) as Anomalib models.

Pinon, Trombetta, Lartizien: "Détection d'anomalies dans l'espace image ou l'espace latent d'auto-encodeurs par patch
pour l'analyse d'images industrielles", GRETSI 2023. No ImageNet backbone: everything is learnt from the normal
training images.

One Anomalib ``fit`` runs the stages the chosen scorer needs, one after the other (epochs counted by the model, which
therefore sets ``max_epochs``):

1. ``autoencoder`` (``ae_epochs``, paper: 10): Adam on random training patches (``patches_per_image``, paper: 1000),
   mini-batches of ``patch_batch_size`` (paper: 100) patches.
2. ``ocsvm`` (1 epoch, scorer ``"ocsvm"``): latents of ``svm_patches_per_image`` random patches per image are collected
   (gathered across DDP ranks) and a one-class SVM (nu = 0.03, gamma = 1/(var * dim)) is fitted on the last batch; its
   solution lives in buffers, so checkpoints hold it.
3. ``prior`` (``prior_epochs``, scorer ``"restoration"``): the autoregressive Transformer prior learns the code
   sequences of random training patches (encoder frozen).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torchvision.transforms.v2 import Resize

from .loss import CodePriorLoss, PatchAutoencoderLoss
from .torch_model import (
    PAPER_CHANNELS,
    PAPER_KERNEL_SIZES,
    PAPER_PATCH_SIZE,
    PAPER_STRIDES,
    PatchAutoencoderModel,
)

logger = logging.getLogger(__name__)

__all__ = ["PatchAE", "PatchVQVAE"]


class _PatchAutoencoderTraining:
    """Staged training, validation and export shared by :class:`PatchAE` and :class:`PatchVQVAE`.

    A mixin (not an ``AnomalibModule`` subclass) so that both models subclass ``AnomalibModule`` directly, which is
    what Anomalib's model registry and the CLI look for.
    """

    model: PatchAutoencoderModel

    def _setup_training(
        self,
        patches_per_image: int,
        patch_batch_size: int,
        learning_rate: float,
        ae_epochs: int,
        commitment_weight: float,
        svm_nu: float,
        svm_patches_per_image: int,
        prior_epochs: int,
        prior_learning_rate: float,
        prior_batch_size: int,
    ) -> None:
        if min(patches_per_image, patch_batch_size, ae_epochs, svm_patches_per_image, prior_batch_size) < 1:
            msg = "patches_per_image, patch_batch_size, ae_epochs, svm_patches_per_image and prior_batch_size must be >= 1."
            raise ValueError(msg)
        if self.model.scorer == "restoration" and prior_epochs < 1:
            msg = "The restoration scorer needs a trained prior: prior_epochs must be >= 1."
            raise ValueError(msg)
        if not 0.0 < svm_nu <= 1.0:
            msg = f"svm_nu must lie in (0, 1], got {svm_nu}."
            raise ValueError(msg)
        self.automatic_optimization = False
        self.patches_per_image = patches_per_image
        self.patch_batch_size = patch_batch_size
        self.learning_rate = learning_rate
        self.svm_nu = svm_nu
        self.svm_patches_per_image = svm_patches_per_image
        self.prior_learning_rate = prior_learning_rate
        self.prior_batch_size = prior_batch_size
        self.loss = PatchAutoencoderLoss(commitment_weight)
        self.prior_loss = CodePriorLoss()
        self.stages = ["autoencoder"] * ae_epochs
        if self.model.scorer == "ocsvm":
            self.stages.append("ocsvm")
        if self.model.scorer == "restoration":
            self.stages += ["prior"] * prior_epochs
        self._svm_latents: list[torch.Tensor] = []

    # -------------------------------------------------------------------------------------------------- Anomalib API
    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Images at their own resolution (paper: MVTec AD's 1024 x 1024) in [0, 1], no ImageNet normalisation.

        With ``image_size`` the images are resized to it.
        """
        return PreProcessor(transform=Resize(image_size, antialias=True) if image_size else None)

    @classmethod
    def configure_evaluator(cls) -> Evaluator:
        """Image AUROC/F1 and the paper's pixel metrics (AUROC, AUPRO), pixel F1."""
        return Evaluator(
            test_metrics=[
                AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
                F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
                AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
                AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
                F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
            ],
        )

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """The staged fit fixes the number of epochs (``ae_epochs`` + SVM + ``prior_epochs``); no sanity pass."""
        return {"max_epochs": len(self.stages), "num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Adam for the auto-encoder (and codebook); a second Adam for the prior when there is one."""
        autoencoder = [p for name, p in self.model.named_parameters() if not name.startswith("prior.")]
        optimizers = [torch.optim.Adam(autoencoder, lr=self.learning_rate)]
        if self.model.prior is not None:
            optimizers.append(torch.optim.Adam(self.model.prior.parameters(), lr=self.prior_learning_rate))
        return optimizers

    def setup(self, stage: str) -> None:
        """Under DDP, each stage trains only part of the parameters: tell DDP to expect unused ones."""
        del stage
        strategy = self.trainer.strategy
        if isinstance(strategy, DDPStrategy):
            strategy._ddp_kwargs.setdefault("find_unused_parameters", True)  # noqa: SLF001

    # ------------------------------------------------------------------------------------------------------ training
    @property
    def stage(self) -> str:
        return self.stages[min(self.current_epoch, len(self.stages) - 1)]

    def on_train_epoch_start(self) -> None:
        self._svm_latents = []

    def training_step(self, batch: Batch, batch_idx: int, *args, **kwargs) -> STEP_OUTPUT:
        del args, kwargs
        stage = self.stage
        self.log("stage", float(self.stages.index(stage)), on_step=True, prog_bar=True, logger=False)
        if stage == "autoencoder":
            return self._train_autoencoder(batch.image)
        # Later stages use the trained auto-encoder as a fixed feature map (BatchNorm with running statistics).
        self.model.encoder.eval()
        self.model.decoder.eval()
        if stage == "prior":
            return self._train_prior(batch.image)
        with torch.no_grad():
            patches = self.model.random_patches(batch.image, self.svm_patches_per_image)
            self._svm_latents.append(self.model.patch_latents(patches).cpu())
        if batch_idx + 1 >= self.trainer.num_training_batches:
            self._fit_svm()
            # Count the fit as one (parameter-free) optimisation step: Lightning saves a checkpoint only when the
            # global step moved, and Adam leaves parameters without gradients untouched.
            optimizer = self.optimizers()
            optimizer = optimizer[0] if isinstance(optimizer, list) else optimizer
            optimizer.zero_grad(set_to_none=True)
            optimizer.step()
        return None

    def _train_autoencoder(self, images: torch.Tensor) -> STEP_OUTPUT:
        optimizer = self.optimizers()
        optimizer = optimizer[0] if isinstance(optimizer, list) else optimizer
        patches = self.model.random_patches(images, self.patches_per_image)
        order = torch.randperm(patches.shape[0], device=patches.device)
        for indices in order.split(self.patch_batch_size):
            chunk = patches[indices]
            reconstruction, codebook_loss, commitment_loss = self.model.reconstruct(chunk)
            loss = self.loss(chunk, reconstruction, codebook_loss, commitment_loss)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        self.log("train_loss", loss.detach(), on_step=True, prog_bar=True)
        if self.model.quantizer is not None:
            with torch.no_grad():
                used = self.model.patch_codes(chunk).unique().numel()
            self.log("codes_used", float(used), on_step=True, prog_bar=True)
        return {"loss": loss.detach()}

    def _train_prior(self, images: torch.Tensor) -> STEP_OUTPUT:
        optimizer = self.optimizers()[1]
        self.model.prior.train()
        with torch.no_grad():
            codes = self.model.patch_codes(self.model.random_patches(images, self.patches_per_image))
        for indices in torch.randperm(codes.shape[0], device=codes.device).split(self.prior_batch_size):
            loss = self.prior_loss(self.model.prior(codes[indices]), codes[indices])
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        self.log("prior_loss", loss.detach(), on_step=True, prog_bar=True)
        return {"loss": loss.detach()}

    def _fit_svm(self) -> None:
        """Fit the one-class SVM on the latents of all ranks (on rank 0) and share its solution."""
        latents = torch.cat(self._svm_latents)
        self._svm_latents = []
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            gathered: list[torch.Tensor | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, latents)
            latents = torch.cat(gathered)
        solution: list[dict[str, torch.Tensor] | None] = [None]
        if not distributed or dist.get_rank() == 0:
            self.model.ocsvm.fit(latents, nu=self.svm_nu)
            solution = [{key: value.cpu() for key, value in self.model.ocsvm.solution().items()}]
        if distributed:
            dist.broadcast_object_list(solution, src=0)
            self.model.ocsvm.set_solution(**solution[0])
        count = self.model.ocsvm.support_vectors.shape[0]
        self.log("svm_support_vectors", float(count), on_step=True, prog_bar=True, sync_dist=False)
        logger.info("One-class SVM fitted on %d latents: %d support vectors.", latents.shape[0], count)

    # -------------------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Scores with the chosen scorer; before its stage has finished (earlier fit epochs), with reconstruction."""
        del args, kwargs
        fitting = self.trainer.state.fn == "fit"
        ready = not fitting or self.current_epoch >= len(self.stages) - 1
        if self.model.scorer == "ocsvm":
            ready = ready and self.model.ocsvm.is_fitted
        anomaly_map = self.model.anomaly_map(batch.image, scorer=None if ready else "reconstruction")
        return batch.update(pred_score=anomaly_map.flatten(1).amax(1), anomaly_map=anomaly_map)

    def to_onnx(self, export_root: Path | str, *args, **kwargs) -> Path:  # noqa: ANN002, ANN003
        """ONNX export of the reconstruction and OC-SVM scorers; restoration (prior sampling loop) is not exportable."""
        if self.model.scorer == "restoration":
            msg = (
                "The restoration scorer samples codes from the prior in a data-dependent loop and cannot be exported "
                "to ONNX. Export the same checkpoint with scorer='reconstruction' instead "
                "(model.model.scorer = 'reconstruction')."
            )
            raise NotImplementedError(msg)
        return super().to_onnx(export_root, *args, **kwargs)


class PatchAE(_PatchAutoencoderTraining, AnomalibModule):
    """Continuous patch auto-encoder with the centre-pixel reconstruction or the one-class SVM scorer.

    Args:
        scorer: ``"reconstruction"`` (Table 1 "AE recons.") or ``"ocsvm"`` ("E + SVMu").
        patch_size: patch side (paper: 63); smaller odd sizes ``27 + 6k`` fit the paper's layers (tests).
        kernel_sizes, strides, channels: encoder blocks (paper: 5-3-3-3, 1-1-3-1, 3-4-12-16).
        patches_per_image: random training patches per image and step (paper: 1000).
        patch_batch_size: patches per optimiser step (paper: 100).
        learning_rate: Adam learning rate (not given in the paper).
        ae_epochs: auto-encoder epochs (paper: 10).
        svm_nu: one-class SVM nu (paper: 0.03).
        svm_patches_per_image: random patches per training image whose latents fit the SVM (its cost is quadratic).
        chunk_size: support vectors scored at once.
        pre_processor, post_processor, evaluator, visualizer: Anomalib components (``True``: defaults).
    """

    def __init__(
        self,
        scorer: str = "reconstruction",
        patch_size: int = PAPER_PATCH_SIZE,
        kernel_sizes: Sequence[int] = PAPER_KERNEL_SIZES,
        strides: Sequence[int] = PAPER_STRIDES,
        channels: Sequence[int] = PAPER_CHANNELS,
        patches_per_image: int = 1000,
        patch_batch_size: int = 100,
        learning_rate: float = 1e-3,
        ae_epochs: int = 10,
        svm_nu: float = 0.03,
        svm_patches_per_image: int = 20,
        chunk_size: int = 256,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        if scorer not in {"reconstruction", "ocsvm"}:
            msg = f"PatchAE scorer must be 'reconstruction' or 'ocsvm', got {scorer!r} (restoration needs PatchVQVAE)."
            raise ValueError(msg)
        self.model = PatchAutoencoderModel(
            quantized=False,
            scorer=scorer,
            patch_size=patch_size,
            kernel_sizes=kernel_sizes,
            strides=strides,
            channels=channels,
            chunk_size=chunk_size,
        )
        self._setup_training(
            patches_per_image=patches_per_image,
            patch_batch_size=patch_batch_size,
            learning_rate=learning_rate,
            ae_epochs=ae_epochs,
            commitment_weight=0.0,
            svm_nu=svm_nu,
            svm_patches_per_image=svm_patches_per_image,
            prior_epochs=0,
            prior_learning_rate=0.0,
            prior_batch_size=1,
        )


class PatchVQVAE(_PatchAutoencoderTraining, AnomalibModule):
    """Patch VQ-VAE (codebook K = 1024) with reconstruction, one-class SVM or VQ-restoration scoring.

    Args:
        scorer: ``"reconstruction"`` ("AE discret. recons."), ``"ocsvm"`` on the quantised latents ("E discret. +
            SVMu") or ``"restoration"`` ("AE discret. restau.": ``1 - SSIM(x, D(z~_q))``).
        patch_size, kernel_sizes, strides, channels, patches_per_image, patch_batch_size, learning_rate, ae_epochs,
            svm_nu, svm_patches_per_image, chunk_size: as :class:`PatchAE`.
        num_codes: codebook size K (paper: 1024).
        commitment_weight: beta of the commitment loss (0.25, van den Oord et al.).
        prior_epochs: epochs of prior training after the auto-encoder (restoration only; not given in the paper).
        prior_learning_rate, prior_batch_size: Adam learning rate and sequences per step of the prior.
        prior_dim, prior_layers, prior_heads, prior_feedforward, prior_dropout: prior Transformer (paper: 256, 8, 8,
            512; dropout not given).
        restoration_threshold: tau (paper: 0.05).
        restoration_mode: ``"sequential"`` (faithful re-conditioning) or ``"single_pass"`` (teacher-forced, cheaper).
        restoration_stride: stride of the grid of restored patches, interpolated to full resolution.
        restoration_seed: seed of the resampling (deterministic maps).
        ssim_data_range: image range for SSIM (1.0 with the default pre-processor).
        pre_processor, post_processor, evaluator, visualizer: Anomalib components (``True``: defaults).
    """

    def __init__(
        self,
        scorer: str = "restoration",
        patch_size: int = PAPER_PATCH_SIZE,
        kernel_sizes: Sequence[int] = PAPER_KERNEL_SIZES,
        strides: Sequence[int] = PAPER_STRIDES,
        channels: Sequence[int] = PAPER_CHANNELS,
        num_codes: int = 1024,
        patches_per_image: int = 1000,
        patch_batch_size: int = 100,
        learning_rate: float = 1e-3,
        ae_epochs: int = 10,
        commitment_weight: float = 0.25,
        svm_nu: float = 0.03,
        svm_patches_per_image: int = 20,
        prior_epochs: int = 10,
        prior_learning_rate: float = 3e-4,
        prior_batch_size: int = 100,
        prior_dim: int = 256,
        prior_layers: int = 8,
        prior_heads: int = 8,
        prior_feedforward: int = 512,
        prior_dropout: float = 0.1,
        restoration_threshold: float = 0.05,
        restoration_mode: str = "sequential",
        restoration_stride: int = 8,
        restoration_seed: int = 0,
        ssim_data_range: float = 1.0,
        chunk_size: int = 256,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        self.model = PatchAutoencoderModel(
            quantized=True,
            scorer=scorer,
            patch_size=patch_size,
            kernel_sizes=kernel_sizes,
            strides=strides,
            channels=channels,
            num_codes=num_codes,
            prior_dim=prior_dim,
            prior_layers=prior_layers,
            prior_heads=prior_heads,
            prior_feedforward=prior_feedforward,
            prior_dropout=prior_dropout,
            restoration_threshold=restoration_threshold,
            restoration_mode=restoration_mode,
            restoration_stride=restoration_stride,
            restoration_seed=restoration_seed,
            ssim_data_range=ssim_data_range,
            chunk_size=chunk_size,
        )
        self._setup_training(
            patches_per_image=patches_per_image,
            patch_batch_size=patch_batch_size,
            learning_rate=learning_rate,
            ae_epochs=ae_epochs,
            commitment_weight=commitment_weight,
            svm_nu=svm_nu,
            svm_patches_per_image=svm_patches_per_image,
            prior_epochs=prior_epochs,
            prior_learning_rate=prior_learning_rate,
            prior_batch_size=prior_batch_size,
        )
