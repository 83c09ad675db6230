"""U-Flow with the a-contrario NFA tree segmentation as an Anomalib model.

Tailanian, Pardo, Musé: "U-Flow: A U-shaped Normalizing Flow for Anomaly Detection with Unsupervised Threshold",
J. Math. Imaging Vis. 2024. Outputs: ``anomaly_map`` = likelihood map (eq. 2), ``pred_score`` = its maximum,
``pred_mask`` = NFA detections (``log10 NFA < log_nfa_threshold``, default NFA < 1), ``pred_label`` = the mask has a
pixel. The ``-log10 NFA`` map is attached to test/predict batches as ``batch.neg_log10_nfa`` and drawn by
:class:`NFAVisualizer` as an extra panel.
"""

from __future__ import annotations

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
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_ext.components.checkpoint import SlimCheckpointMixin
from anomalib_ext.components.post_processing import ModelMaskPostProcessor
from anomalib_ext.metrics import MIoU, OracleMIoU

from .loss import UFlowNFALoss
from .torch_model import MCAIT, MCAIT_INPUT_SIZE, UFlowNFAModel

__all__ = ["NFAVisualizer", "UFlowNFA"]

NFA_MAP_FIELD = "neg_log10_nfa"


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
        layers: CNN feature taps, strides doubling (default: the taps at strides 4, 8, 16). Ignored for MS-CaiT.
        pre_trained: ImageNet weights (offline for ``efficientnet_lite0``; hub or ``backbone_weights`` otherwise).
        backbone_weights: a local timm-keyed weights file; for ``"mcait"`` a list of two files
            ``[cait_m48_448, cait_s24_224]``.
        flow_steps: flow steps per scale (paper: 4).
        affine_clamp: affine coupling clamp (paper: 2.0).
        affine_subnet_channels_ratio: hidden width of the coupling subnets relative to their input (paper: 1.0).
        permute_soft: random orthogonal instead of hard permutations (paper: hard).
        log_nfa_threshold: detections where ``log10 NFA < log_nfa_threshold`` (paper: 0, i.e. NFA < 1).
        clamp_chernoff: clamp the Chernoff bound to 0 for regions below the null mean (see the NFA component).
        pre_processor, post_processor, evaluator, visualizer: Anomalib components (``True``: this model's defaults).
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
        if self.input_size is None:
            msg = "UFlowNFA needs a fixed input size: give it a pre-processor that resizes (e.g. Resize((448, 448)))."
            raise ValueError(msg)
        self.model = UFlowNFAModel(
            input_size=self.input_size,
            backbone=backbone,
            layers=layers,
            pre_trained=pre_trained,
            backbone_weights=backbone_weights,
            flow_steps=flow_steps,
            affine_clamp=affine_clamp,
            affine_subnet_channels_ratio=affine_subnet_channels_ratio,
            permute_soft=permute_soft,
            log_nfa_threshold=log_nfa_threshold,
            clamp_chernoff=clamp_chernoff,
        )
        self.loss = UFlowNFALoss()

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` (default 448 x 448, the paper's MS-CaiT input) and ImageNet-normalise."""
        transform = Compose(
            [
                Resize(image_size or MCAIT_INPUT_SIZE, antialias=True),
                Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
            ]
        )
        return PreProcessor(transform=transform)

    @classmethod
    def configure_post_processor(cls) -> ModelMaskPostProcessor:
        """Keeps the NFA mask and label on every path (test, predict, ``model(x)``)."""
        return ModelMaskPostProcessor()

    @classmethod
    def configure_evaluator(cls) -> Evaluator:
        """Image AUROC/F1, pixel AUROC/AUPRO/F1 and the paper's per-image mIoU of the NFA mask."""
        return Evaluator(
            test_metrics=[
                AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
                F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
                AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
                AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
                F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
                MIoU(fields=["pred_mask", "gt_mask"], prefix="pixel_nfa_", strict=False),
                OracleMIoU(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            ],
        )

    @classmethod
    def configure_visualizer(cls) -> NFAVisualizer:
        return NFAVisualizer()

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[torch.optim.lr_scheduler.LRScheduler]]:
        """Adam (lr 1e-3, weight decay 1e-5) with a linear decay to 0.4x over 25k steps, as Anomalib's U-Flow."""
        parameters = [parameter for parameter in self.parameters() if parameter.requires_grad]
        optimizer = torch.optim.Adam([{"params": parameters, "initial_lr": 1e-3}], lr=1e-3, weight_decay=1e-5)
        scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.4, total_iters=25000)
        return [optimizer], [scheduler]

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        del args, kwargs
        latents, log_jacobian = self.model(batch.image)
        loss = self.loss(latents, log_jacobian)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True, logger=True)
        return {"loss": loss}

    def _predict(self, batch: Batch, with_nfa_map: bool) -> Batch:
        latents, _ = self.model.encode(batch.image)
        predictions, log_nfa = self.model.predict(latents)
        batch = batch.update(**predictions._asdict())
        if with_nfa_map and log_nfa is not None:
            setattr(batch, NFA_MAP_FIELD, -log_nfa)
        return batch

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        del args, kwargs
        return self._predict(batch, with_nfa_map=False)

    def test_step(self, batch: Batch, batch_idx: int, *args, **kwargs) -> STEP_OUTPUT:
        del args, kwargs, batch_idx
        return self._predict(batch, with_nfa_map=True)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> STEP_OUTPUT:
        del batch_idx, dataloader_idx
        return self._predict(batch, with_nfa_map=True)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation pass (it would feed untrained outputs to the post-processor's statistics)."""
        return {"num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS
