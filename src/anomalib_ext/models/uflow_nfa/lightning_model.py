"""U-Flow with the a-contrario NFA tree segmentation as an Anomalib model.

Tailanian, Pardo, Musé: "U-Flow: A U-shaped Normalizing Flow for Anomaly Detection with Unsupervised Threshold",
J. Math. Imaging Vis. 2024. Outputs: ``anomaly_map`` = likelihood map (eq. 2), ``pred_score`` = its maximum,
``pred_mask`` = NFA detections (``log10 NFA < log_nfa_threshold``, default NFA < 1), ``pred_label`` = the mask has a
pixel. The ``-log10 NFA`` map is attached to test/predict batches as ``batch.neg_log10_nfa`` and drawn by
:class:`NFAVisualizer` as an extra panel; the raw (un-normalised) likelihood map as ``batch.raw_anomaly_map``.

Calibrated null (``nfa_null="calibrated"``): the images whose path hashes into ``calibration_fraction`` are held out
of the flow's loss (weight 0) and kept; after every training epoch (and before validation during fit, so every saved
checkpoint holds the current calibration) the model encodes them and fits ``s_l chi2(nu_l)`` per latent scale to
``||z_l||^2`` by moments (:func:`~anomalib_ext.components.nfa.moment_matched_null`); the values are buffers of the
torch model, hence in checkpoints.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import AUPRO, AUROC, Evaluator, F1Score
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.utils.path import generate_output_filename
from anomalib.visualization import ImageVisualizer, Visualizer
from anomalib.visualization.image.functional import add_text_to_image
from anomalib.visualization.image.item_visualizer import visualize_image_item
from lightning.pytorch.utilities.types import STEP_OUTPUT
from PIL import Image

from anomalib_ext.components.checkpoint import SlimCheckpointMixin
from anomalib_ext.components.nfa import moment_matched_null
from anomalib_ext.components.post_processing import ModelMaskPostProcessor
from anomalib_ext.deploy.nfa_inferencer import nfa_export_outputs
from anomalib_ext.metrics import MIoU, OracleMIoU

from .loss import UFlowNFALoss
from .torch_model import MCAIT, MCAIT_INPUT_SIZE, UFlowNFAModel

__all__ = ["NFAVisualizer", "UFlowNFA"]

logger = logging.getLogger(__name__)

NFA_MAP_FIELD = "neg_log10_nfa"
RAW_MAP_FIELD = "raw_anomaly_map"
CNN_INPUT_SIZE = (256, 256)
HASH_BUCKETS = 10_000


def is_calibration_image(path: str, fraction: float) -> bool:
    """Deterministic hold-out by the path's last two parts (CRC32): the same images on every epoch, rank, resume and
    machine."""
    key = "/".join(Path(path).parts[-2:])
    return zlib.crc32(key.encode()) % HASH_BUCKETS < fraction * HASH_BUCKETS


class NFAVisualizer(ImageVisualizer):
    """Stock image visualisation plus a ``-log10 NFA`` panel per image (clipped at 0: only regions with NFA < 1 show).

    Reads the extra batch attribute ``neg_log10_nfa`` ``[B, H, W]`` that :class:`UFlowNFA` attaches on test and
    predict; without it, behaves exactly like :class:`~anomalib.visualization.ImageVisualizer`.
    """

    def nfa_panel(self, item: Any, neg_log_nfa: torch.Tensor) -> Image.Image | None:  # noqa: ANN401
        """The image overlaid with ``max(0, -log10 NFA)`` scaled by its maximum (at least 1)."""
        significance = neg_log_nfa.detach().float().cpu().clamp(min=0)
        scale = float(significance.max().clamp(min=1.0))
        nfa_item = replace(item, anomaly_map=significance / scale)
        return visualize_image_item(
            nfa_item,
            fields=[],
            overlay_fields=[("image", ["anomaly_map"])],
            field_size=self.field_size,
            fields_config=self.fields_config,
            overlay_fields_config={**self.overlay_fields_config, "anomaly_map": {"colormap": True, "normalize": False}},
            text_config={**self.text_config, "enable": False},
        )

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        neg_log_nfa = getattr(batch, NFA_MAP_FIELD, None)
        if neg_log_nfa is None:
            super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
            return
        if self.output_dir is None:
            self.output_dir = Path(trainer.default_root_dir) / "images"
        datamodule = getattr(trainer, "datamodule", None)
        for index, item in enumerate(batch):
            stock = visualize_image_item(
                item,
                fields=self.fields,
                overlay_fields=self.overlay_fields,
                field_size=self.field_size,
                fields_config=self.fields_config,
                overlay_fields_config=self.overlay_fields_config,
                text_config=self.text_config,
            )
            if stock is None:
                continue
            panel = self.nfa_panel(item, neg_log_nfa[index])
            if panel is None:
                continue
            panel = add_text_to_image(
                panel.resize((panel.width * stock.height // panel.height, stock.height)), "-log10 NFA"
            )
            canvas = Image.new("RGB", (stock.width + panel.width, stock.height))
            canvas.paste(stock, (0, 0))
            canvas.paste(panel, (stock.width, 0))
            filename = generate_output_filename(
                input_path=item.image_path or "",
                output_path=self.output_dir,
                dataset_name=getattr(datamodule, "name", None) if datamodule else None,
                category=getattr(datamodule, "category", None) if datamodule else None,
            )
            canvas.save(filename)


class UFlowNFA(SlimCheckpointMixin, AnomalibModule):
    """U-Flow (MS-CaiT or timm CNN features + U-shaped normalizing flow) with a-contrario NFA segmentation.

    Args:
        backbone: ``"mcait"`` (paper, 448 px input) or a timm CNN name (e.g. ``"efficientnet_lite0"``, ``"resnet18"``).
        layers: CNN feature taps, strides doubling (default: the taps at strides 8, 16, 32, else 4, 8, 16). Ignored for
            MS-CaiT.
        pre_trained: ImageNet weights (offline for ``efficientnet_lite0``; hub or ``backbone_weights`` otherwise).
        backbone_weights: a local timm-keyed weights file; for ``"mcait"`` a list of two files
            ``[cait_m48_448, cait_s24_224]``.
        flow_steps: flow steps per scale (paper: 4).
        affine_clamp: affine coupling clamp (paper: 2.0).
        affine_subnet_channels_ratio: hidden width of the coupling subnets relative to their input (paper: 1.0).
        permute_soft: random orthogonal instead of hard permutations (paper: hard).
        log_nfa_threshold: detections where ``log10 NFA < log_nfa_threshold`` (paper: 0, i.e. NFA < 1).
        clamp_chernoff: clamp the Chernoff bound to 0 for regions below the null mean (see the NFA component).
        nfa_null: ``"chi2"`` (paper: ``||z_l||^2 ~ chi2(C_l)``) or ``"calibrated"`` (``s_l chi2(nu_l)`` fitted on held-out
            normal training images at the end of ``fit``). Default: ``"chi2"`` for MS-CaiT, ``"calibrated"`` for CNNs.
        calibration_fraction: share of the training images (chosen by a hash of their path) held out of the flow's
            loss for the calibrated null. Ignored with ``nfa_null="chi2"``.
        nfa_scales: latent scales (indices, finest first) tested by the NFA and counted in ``N_tests``. Default: all
            for MS-CaiT (paper), the coarsest (``[-1]``) for a CNN.
        nfa_tail: region PFA ``P(s chi2_nu >= m)^|R|`` from the Chernoff bound (``"chernoff"``, paper) or the exact
            chi-square tail (``"exact"``: never a larger PFA, so more detections under the same null).
        lr, weight_decay: Adam's; the learning rate decays linearly to 0.4x over the whole fit.
        pre_processor, post_processor, evaluator, visualizer: Anomalib components (``True``: this model's defaults;
            the default pre-processor resizes to 448 px for MS-CaiT and to 256 px for a CNN).
    """

    def __init__(
        self,
        backbone: str = MCAIT,
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        backbone_weights: str | list[str] | None = None,
        flow_steps: int = 4,
        affine_clamp: float = 2.0,
        affine_subnet_channels_ratio: float = 1.0,
        permute_soft: bool = False,
        log_nfa_threshold: float = 0.0,
        clamp_chernoff: bool = True,
        nfa_null: str | None = None,
        calibration_fraction: float = 0.2,
        nfa_scales: Sequence[int] | None = None,
        nfa_tail: str = "chernoff",
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        pre_processor: PreProcessor | bool = True,
        post_processor: PostProcessor | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
        slim_checkpoint: bool = False,
    ) -> None:
        if pre_processor is True and backbone != MCAIT:
            pre_processor = self.configure_pre_processor(CNN_INPUT_SIZE)
        if not 0.0 <= calibration_fraction < 1.0:
            msg = f"calibration_fraction must be in [0, 1), got {calibration_fraction}."
            raise ValueError(msg)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        if self.input_size is None:
            msg = "UFlowNFA needs a fixed input size: give it a pre-processor that resizes (e.g. Resize((448, 448)))."
            raise ValueError(msg)
        self.model = self._build_model(self.input_size)
        if backbone != MCAIT and layers is None:  # saved resolved: a later change of default cannot break checkpoints
            self.hparams["layers"] = list(self.model.feature_extractor.layers)
        self.loss = UFlowNFALoss()
        self.calibration_fraction = calibration_fraction
        self.lr = lr
        self.weight_decay = weight_decay
        self._calibration_images: dict[str, torch.Tensor] = {}
        self._calibrated_at_step: int | None = None
        self._warned_no_calibration = False
        self._export_nfa_inputs = False

    def _build_model(self, input_size: tuple[int, int]) -> UFlowNFAModel:
        """The torch model for ``input_size`` from this module's hyper-parameters."""
        hparams = self.hparams
        return UFlowNFAModel(
            input_size=input_size,
            backbone=hparams.backbone,
            layers=hparams.layers,
            pre_trained=hparams.pre_trained,
            backbone_weights=hparams.backbone_weights,
            flow_steps=hparams.flow_steps,
            affine_clamp=hparams.affine_clamp,
            affine_subnet_channels_ratio=hparams.affine_subnet_channels_ratio,
            permute_soft=hparams.permute_soft,
            log_nfa_threshold=hparams.log_nfa_threshold,
            clamp_chernoff=hparams.clamp_chernoff,
            nfa_null=hparams.nfa_null or ("chi2" if hparams.backbone == MCAIT else "calibrated"),
            nfa_scales=hparams.nfa_scales if hparams.nfa_scales is not None or hparams.backbone == MCAIT else [-1],
            nfa_tail=hparams.nfa_tail,
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the pre-processor, then rebuild the size-dependent model if the checkpoint's input size differs.

        ``load_from_checkpoint`` (and ``anomalib export --ckpt_path``) constructs the module with the default
        pre-processor; the flow's LayerNorms are shaped by the input size the checkpoint was trained at.
        """
        super().on_load_checkpoint(checkpoint)
        if self.input_size is not None and tuple(self.input_size) != self.model.input_size:
            self.model = self._build_model(tuple(self.input_size))

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` (default 448 x 448, the paper's MS-CaiT input; ``__init__`` passes 256 x 256 for
        a CNN backbone) and ImageNet-normalise, as Anomalib's default pre-processor."""
        return super().configure_pre_processor(image_size or MCAIT_INPUT_SIZE)

    @classmethod
    def configure_post_processor(cls) -> ModelMaskPostProcessor:
        """Keeps the NFA mask and label on every path (test, predict, ``model(x)``)."""
        return ModelMaskPostProcessor()

    @classmethod
    def configure_evaluator(cls) -> Evaluator:
        """Image AUROC/F1, pixel AUROC/AUPRO/F1 and the paper's per-image mIoU (Table 3) three ways.

        ``pixel_nfa_MIoU``: the unsupervised NFA mask; ``pixel_nfa_map_OracleMIoU``: the ``-log10 NFA`` map at its best
        test-set threshold ("oracle threshold, ours"); ``pixel_likelihood_OracleMIoU``: the raw likelihood map at its
        best test-set threshold (the protocol applied to competitors). Oracles sweep exact thresholds on raw maps.
        """
        return Evaluator(
            test_metrics=[
                AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
                F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
                AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
                AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
                F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
                MIoU(fields=["pred_mask", "gt_mask"], prefix="pixel_nfa_", strict=False),
                OracleMIoU(fields=[NFA_MAP_FIELD, "gt_mask"], prefix="pixel_nfa_map_", strict=False),
                OracleMIoU(fields=[RAW_MAP_FIELD, "gt_mask"], prefix="pixel_likelihood_", strict=False),
            ],
        )

    @classmethod
    def configure_visualizer(cls) -> NFAVisualizer:
        return NFAVisualizer()

    def configure_optimizers(self) -> dict[str, Any]:
        """Adam (``lr``, ``weight_decay``; frozen backbones excluded) with a per-step linear decay to 0.4x over the
        fit's ``trainer.estimated_stepping_batches`` (Anomalib's U-Flow decays over a fixed 25k steps)."""
        parameters = [parameter for parameter in self.parameters() if parameter.requires_grad]
        optimizer = torch.optim.Adam(parameters, lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.4, total_iters=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _calibration_weights(self, batch: Batch) -> torch.Tensor | None:
        """0/1 loss weights (0 = held out for the calibrated null); held-out images are kept for calibration."""
        if self.model.nfa_null != "calibrated" or self.calibration_fraction <= 0 or batch.image_path is None:
            return None
        held_out = [is_calibration_image(path, self.calibration_fraction) for path in batch.image_path]
        for index, (path, out) in enumerate(zip(batch.image_path, held_out, strict=True)):
            if out and str(path) not in self._calibration_images:
                self._calibration_images[str(path)] = batch.image[index].detach().cpu()
        return torch.tensor([0.0 if out else 1.0 for out in held_out], device=batch.image.device)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        del args, kwargs
        latents, log_jacobian = self.model(batch.image)
        loss = self.loss(latents, log_jacobian, self._calibration_weights(batch))
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True, logger=True)
        return {"loss": loss}

    @torch.no_grad()
    def calibrate_null(self, batch_size: int = 8) -> None:
        """Fit ``s_l chi2(nu_l)`` per scale to ``||z_l||^2`` of the held-out images (summed over DDP ranks)."""
        sums = torch.zeros(len(self.model.latent_shapes), 3, dtype=torch.float64, device=self.device)
        images = list(self._calibration_images.values())
        was_training = self.model.training
        self.model.eval()
        for start in range(0, len(images), batch_size):
            latents, _ = self.model.encode(torch.stack(images[start : start + batch_size]).to(self.device))
            for index, latent in enumerate(latents):
                squared_norm = latent.double().square().sum(dim=1)
                sums[index] += torch.stack(
                    [squared_norm.new_tensor(squared_norm.numel()), squared_norm.sum(), squared_norm.square().sum()]
                )
        self.model.train(was_training)
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        count = sums[:, 0]  # pixels per scale
        if count[0] == 0:
            if not self._warned_no_calibration:
                logger.warning(
                    "UFlowNFA: nfa_null='calibrated' but no held-out normal image was seen (calibration_fraction=%s; "
                    "training batches must carry image_path); the NFA uses the chi2 null.",
                    self.calibration_fraction,
                )
                self._warned_no_calibration = True
            return
        mean = sums[:, 1] / count
        variance = sums[:, 2] / count - mean.square()
        self.model.set_calibration(*moment_matched_null(mean, variance))

    def _calibrate_if_stale(self) -> None:
        if self.model.nfa_null != "calibrated" or self._calibrated_at_step == self.global_step:
            return
        self.calibrate_null()
        self._calibrated_at_step = self.global_step

    def on_train_epoch_end(self) -> None:
        """Calibration stage (before the epoch-end checkpoint callbacks)."""
        self._calibrate_if_stale()

    def on_validation_epoch_start(self) -> None:
        """Calibration stage before a fit's validation (whose end may save the checkpoint)."""
        if self.trainer.training or self.trainer.state.fn == "fit":
            self._calibrate_if_stale()

    def _predict(self, batch: Batch, with_nfa: bool) -> Batch:
        latents, _ = self.model.encode(batch.image)
        predictions, log_nfa = self.model.predict(latents, with_nfa=with_nfa)
        batch = batch.update(**predictions._asdict())
        if with_nfa:
            setattr(batch, RAW_MAP_FIELD, predictions.anomaly_map.clone())
            if log_nfa is not None:
                setattr(batch, NFA_MAP_FIELD, -log_nfa)
        return batch

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Likelihood map and score only: validation feeds the post-processor's statistics, never the NFA."""
        del args, kwargs
        return self._predict(batch, with_nfa=False)

    def test_step(self, batch: Batch, batch_idx: int, *args, **kwargs) -> STEP_OUTPUT:
        del args, kwargs, batch_idx
        return self._predict(batch, with_nfa=True)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> STEP_OUTPUT:
        del batch_idx, dataloader_idx
        return self._predict(batch, with_nfa=True)

    def forward(self, batch: torch.Tensor, *args, **kwargs) -> Any:  # noqa: ANN401
        """The stock pipeline; while :meth:`to_onnx` exports, the NFA's inputs instead of a mask (see ``deploy``)."""
        if not self._export_nfa_inputs:
            return super().forward(batch, *args, **kwargs)
        image = self.pre_processor(batch) if self.pre_processor else batch
        latents, _ = self.model.encode(image)
        predictions, _ = self.model.predict(latents, with_nfa=False)
        processed = self.post_processor(predictions) if self.post_processor else predictions
        return nfa_export_outputs(processed, latents, self.model)

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs,
    ) -> Path:  # noqa: ANN003
        """ONNX graph (also the first step of OpenVINO export) with the NFA's inputs as outputs.

        The tree NFA is data-dependent numpy/scikit-image code and cannot be in a graph, so the graph has no
        ``pred_mask`` / ``pred_label``; it outputs ``pred_score``, ``anomaly_map``, the latents of the tested scales
        and the null and threshold, and :class:`anomalib_ext.deploy.NFAInferencer` applies the NFA step to them.
        """
        logger.warning(
            "UFlowNFA export: the NFA mask is not part of the graph (the tree test runs in numpy); the graph outputs "
            "the latents it needs and no pred_mask/pred_label. Use anomalib_ext.deploy.NFAInferencer for the NFA mask "
            "(the torch export, TorchInferencer, computes it itself)."
        )
        self._export_nfa_inputs = True
        try:
            return super().to_onnx(export_root, model_file_name, input_size, **kwargs)
        finally:
            self._export_nfa_inputs = False

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation pass (it would feed untrained outputs to the post-processor's statistics)."""
        return {"num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS
