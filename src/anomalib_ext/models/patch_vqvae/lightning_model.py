"""Patch auto-encoder (``PatchAE``) and patch VQ-VAE (``PatchVQVAE``) as Anomalib models.

Pinon, Trombetta, Lartizien: "Détection d'anomalies dans l'espace image ou l'espace latent d'auto-encodeurs par patch
pour l'analyse d'images industrielles", GRETSI 2023. No ImageNet backbone: everything is learnt from the normal
training images.

One Anomalib ``fit`` runs the stages the chosen scorer needs, one after the other (epochs counted by the model, which
therefore sets ``max_epochs``):

1. ``autoencoder`` (``ae_epochs``, paper: 10): Adam on random training patches (``patches_per_image`` per image,
   paper: 1000), mini-batches of ``patch_batch_size`` (paper: 100) patches. ``patch_sampling="batch"``: each image
   batch's patches are shuffled and split into mini-batches at once (a mini-batch mixes only ``train_batch_size``
   images). ``"pool"`` (the paper's protocol): the epoch's patch positions of *all* training images are pooled and
   shuffled, and the mini-batches run at the end of the epoch (the epoch's images are kept in CPU memory).
2. ``ocsvm`` (1 epoch, scorer ``"ocsvm"``): latents of ``svm_patches_per_image`` random patches per image are collected
   (gathered across DDP ranks) and a one-class SVM (nu = 0.03, gamma = 1/(var * dim), scikit-learn's value) is fitted
   on the last batch; its solution lives in buffers, so checkpoints hold it.
3. ``prior`` (``prior_epochs``, scorer ``"restoration"``): the autoregressive Transformer prior learns the code
   sequences of random training patches (encoder frozen).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
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
from torch import nn
from torchvision.transforms.v2 import Resize

from .anomaly_map import gather_patches
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
        patch_sampling: str,
    ) -> None:
        if patch_sampling not in {"batch", "pool"}:
            msg = f"patch_sampling must be 'batch' or 'pool', got {patch_sampling!r}."
            raise ValueError(msg)
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
        self.patch_sampling = patch_sampling
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
        self._pool_images: list[torch.Tensor] = []

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
        self._pool_images = []

    def on_train_epoch_end(self) -> None:
        """Under DDP, average BatchNorm running statistics over the ranks after each auto-encoder epoch.

        Each rank updates them from its own patches; the later stages and the saved checkpoint need one encoder.
        """
        if self.trainer.world_size > 1 and self.stage == "autoencoder":
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:  # noqa: SLF001
                    for statistic in (module.running_mean, module.running_var):
                        statistic.copy_(self.trainer.strategy.reduce(statistic.clone(), reduce_op="mean"))

    def training_step(self, batch: Batch, batch_idx: int, *args, **kwargs) -> STEP_OUTPUT:
        del args, kwargs
        stage = self.stage
        self.log("stage", float(self.stages.index(stage)), on_step=True, prog_bar=True, logger=False)
        if stage == "autoencoder":
            if self.patch_sampling == "batch":
                return self._train_autoencoder(self.model.random_patches(batch.image, self.patches_per_image))
            self._pool_images.append(batch.image.detach().cpu())
            if batch_idx + 1 < self.trainer.num_training_batches:
                return None
            return self._train_autoencoder_on_pool()
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

    def _train_autoencoder(self, patches: torch.Tensor) -> STEP_OUTPUT:
        """Adam steps on shuffled mini-batches of ``patch_batch_size`` patches."""
        order = torch.randperm(patches.shape[0], device=patches.device)
        return self._autoencoder_steps(patches[indices] for indices in order.split(self.patch_batch_size))

    def _train_autoencoder_on_pool(self) -> STEP_OUTPUT:
        """Paper protocol: ``patches_per_image`` random positions in every image of the epoch, pooled and shuffled."""
        images = torch.cat(self._pool_images)
        self._pool_images = []
        count, _, height, width = images.shape
        size = self.model.patch_size
        if min(height, width) < size:
            msg = f"Training images must be at least {size} x {size} pixels (the patch size), got {height} x {width}."
            raise ValueError(msg)
        total = count * self.patches_per_image
        image_index = torch.randperm(total) // self.patches_per_image  # shuffled pool: image of each patch
        tops = torch.randint(0, height - size + 1, (total,))
        lefts = torch.randint(0, width - size + 1, (total,))
        mini_batches = (
            gather_patches(images, image_index[chunk], tops[chunk], lefts[chunk], size).to(self.device)
            for chunk in torch.arange(total).split(self.patch_batch_size)
        )
        return self._autoencoder_steps(mini_batches)

    def _autoencoder_steps(self, mini_batches: Iterable[torch.Tensor]) -> STEP_OUTPUT:
        optimizer = self.optimizers()
        optimizer = optimizer[0] if isinstance(optimizer, list) else optimizer
        for patches in mini_batches:
            reconstruction, codebook_loss, commitment_loss, indices = self.model.reconstruct(patches)
            loss = self.loss(patches, reconstruction, codebook_loss, commitment_loss)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        self.log("train_loss", loss.detach(), on_step=True, prog_bar=True)
        if indices is not None:  # codes of the last mini-batch, from its training pass (no extra BatchNorm update)
            self.log("codes_used", float(indices.unique().numel()), on_step=True, prog_bar=True)
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
        """Scores with the chosen scorer.

        Inside ``fit``, validations before the scorer's stage has finished (earlier epochs, or an SVM not fitted yet)
        use the reconstruction scorer; outside ``fit`` (validate, test, predict) always the chosen scorer, which raises
        for an unfitted SVM instead of reporting another scorer's numbers under its name.
        """
        del args, kwargs
        ready = True
        if self.trainer.state.fn == "fit":
            ready = self.current_epoch >= len(self.stages) - 1
            if self.model.scorer == "ocsvm":
                ready = ready and self.model.ocsvm.is_fitted
        anomaly_map = self.model.anomaly_map(batch.image, scorer=None if ready else "reconstruction")
        return batch.update(pred_score=anomaly_map.flatten(1).amax(1), anomaly_map=anomaly_map)

    def to_onnx(self, export_root: Path | str, *args, **kwargs) -> Path:  # noqa: ANN002, ANN003
        """ONNX (and OpenVINO, which goes through ONNX) export of the reconstruction and OC-SVM scorers at any size.

        Raises:
            NotImplementedError: for the restoration scorer, whose codes are drawn from the prior in a data-dependent
                loop that ONNX cannot express.
        """
        if self.model.scorer == "restoration":
            msg = (
                "The restoration scorer cannot be exported: it draws codes from the prior in a data-dependent "
                "autoregressive loop that ONNX/OpenVINO graphs cannot express. The 'reconstruction' scorer (and "
                "'ocsvm' once an SVM is fitted) export at any input size; the same checkpoint exports with "
                "model.model.scorer = 'reconstruction'."
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
        patch_sampling: ``"batch"`` (mini-batches from one image batch's patches) or ``"pool"`` (the paper's shuffled
            pool of all training patches of the epoch; the epoch's images are kept in CPU memory).
        learning_rate: Adam learning rate (not given in the paper).
        ae_epochs: auto-encoder epochs (paper: 10).
        svm_nu: one-class SVM nu (paper: 0.03).
        svm_patches_per_image: random patches per training image whose latents fit the SVM (its cost is quadratic).
        chunk_elements: OC-SVM dense map: at most this many values per temporary (chunks sized from ``B * H * W``).
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
        patch_sampling: str = "batch",
        learning_rate: float = 1e-3,
        ae_epochs: int = 10,
        svm_nu: float = 0.03,
        svm_patches_per_image: int = 20,
        chunk_elements: int = 1 << 22,
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
            chunk_elements=chunk_elements,
        )
        self._setup_training(
            patches_per_image=patches_per_image,
            patch_batch_size=patch_batch_size,
            patch_sampling=patch_sampling,
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
            patch_sampling, svm_nu, svm_patches_per_image, chunk_elements: as :class:`PatchAE`.
        num_codes: codebook size K (paper: 1024).
        commitment_weight: beta of the commitment loss (0.25, van den Oord et al.).
        prior_epochs: epochs of prior training after the auto-encoder (restoration only; not given in the paper).
        prior_learning_rate, prior_batch_size: Adam learning rate and sequences per step of the prior.
        prior_dim, prior_layers, prior_heads, prior_feedforward, prior_dropout: prior Transformer (paper: 256, 8, 8,
            512; dropout not given).
        restoration_threshold: tau (paper: 0.05).
        restoration_mode: ``"sequential"`` (faithful: each conditional sees the restored prefix; one cached sweep)
            or ``"single_pass"`` (teacher-forced conditionals of the input codes).
        restoration_stride: stride of the grid of restored patches, interpolated to full resolution.
        restoration_seed: seed of the resampling (the draws of a patch depend only on it and the patch's position).
        restoration_chunk_size: patches restored at once (key/value cache: ``2 * layers * chunk * 289 * dim`` values).
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
        patch_sampling: str = "batch",
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
        restoration_chunk_size: int = 128,
        ssim_data_range: float = 1.0,
        chunk_elements: int = 1 << 22,
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
            restoration_chunk_size=restoration_chunk_size,
            ssim_data_range=ssim_data_range,
            chunk_elements=chunk_elements,
        )
        self._setup_training(
            patches_per_image=patches_per_image,
            patch_batch_size=patch_batch_size,
            patch_sampling=patch_sampling,
            learning_rate=learning_rate,
            ae_epochs=ae_epochs,
            commitment_weight=commitment_weight,
            svm_nu=svm_nu,
            svm_patches_per_image=svm_patches_per_image,
            prior_epochs=prior_epochs,
            prior_learning_rate=prior_learning_rate,
            prior_batch_size=prior_batch_size,
        )
