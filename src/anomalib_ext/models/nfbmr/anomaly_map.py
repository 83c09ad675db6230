"""Anomaly score map of NF-BMR (eq. 14), the flow-likelihood map of the ``nf_only`` ablation and the optional NFA mask."""

from __future__ import annotations

import torch
from anomalib.data import InferenceBatch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_ext.components.nfa import a_contrario_segmentation

__all__ = ["AnomalyMapGenerator"]


class AnomalyMapGenerator(nn.Module):
    """Turns a feature-resolution distance map into ``InferenceBatch`` outputs.

    * :meth:`mapping_distance` = eq. 14: ``(||y - y_hat||^2 + ||z - z_hat||^2) / 2`` per position.
    * :meth:`flow_distance`: ``-log p_Z(z) + const = ||z||^2 / 2`` per position (TNF alone).
    * ``forward``: bilinear upsampling to the size of the scored images, ``pred_score`` = maximum of the map, and with
      ``use_nfa_mask`` the a-contrario NFA mask of the TNF latents (``log10 NFA < log_nfa_threshold``) with
      ``pred_label`` = the mask has a pixel. The NFA step runs in numpy/scikit-image and is left out while exporting.
    """

    def __init__(self, input_size: tuple[int, int], use_nfa_mask: bool = False, log_nfa_threshold: float = 0.0) -> None:
        super().__init__()
        self.input_size = tuple(input_size)
        self.use_nfa_mask = use_nfa_mask
        self.log_nfa_threshold = log_nfa_threshold

    @staticmethod
    def mapping_distance(
        source: torch.Tensor,
        source_hat: torch.Tensor,
        target: torch.Tensor,
        target_hat: torch.Tensor,
    ) -> torch.Tensor:
        """Eq. 14 at feature resolution, ``[B, 1, h, w]``."""
        source_error = (source - source_hat).square().sum(dim=1, keepdim=True)
        target_error = (target - target_hat).square().sum(dim=1, keepdim=True)
        return (source_error + target_error) / 2

    @staticmethod
    def flow_distance(target: torch.Tensor) -> torch.Tensor:
        """``||z||^2 / 2`` per position, ``[B, 1, h, w]``."""
        return target.square().sum(dim=1, keepdim=True) / 2

    def forward(
        self, distance: torch.Tensor, target: torch.Tensor, image_size: tuple[int, int] | torch.Size | None = None
    ) -> InferenceBatch:
        """Upsample ``distance`` to ``image_size`` (the size of the scored images; default: the build-time size)."""
        image_size = tuple(image_size) if image_size is not None else self.input_size
        anomaly_map = F.interpolate(distance, size=image_size, mode="bilinear", align_corners=False)
        pred_score = anomaly_map.flatten(1).amax(dim=1)
        pred_mask = pred_label = None
        if self.use_nfa_mask and not torch.compiler.is_exporting():
            _, pred_mask = a_contrario_segmentation([target], image_size, self.log_nfa_threshold)
            pred_label = pred_mask.flatten(1).any(dim=1)
        return InferenceBatch(
            pred_score=pred_score, pred_label=pred_label, anomaly_map=anomaly_map, pred_mask=pred_mask
        )
