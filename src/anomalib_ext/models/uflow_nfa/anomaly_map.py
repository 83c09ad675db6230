"""U-Flow outputs from latents: the likelihood anomaly map (eq. 2) and the NFA segmentation (eqs. 5-9)."""

from __future__ import annotations

import torch
from anomalib.models.image.uflow.anomaly_map import AnomalyMapGenerator as LikelihoodMapGenerator
from torch import nn

from anomalib_ext.components.nfa import a_contrario_segmentation


class AnomalyMapGenerator(nn.Module):
    """Likelihood map and a-contrario segmentation of per-scale latents.

    * ``forward(latents)`` -> ``A(x) = 1 - (1/L) sum_l up(exp(-1/2 mean_c z_l(x)^2))`` ``[B, 1, H, W]`` (eq. 2,
      Anomalib's U-Flow implementation of it, reused);
    * ``segment(latents)`` -> ``(log10 NFA [B, H, W], mask [B, H, W])`` with ``mask = log10 NFA < log_nfa_threshold``
      (region PFAs from the Chernoff bound or, ``tail="exact"``, the exact chi-square tail).
    """

    def __init__(
        self,
        input_size: tuple[int, int],
        log_nfa_threshold: float = 0.0,
        clamp_chernoff: bool = True,
        tail: str = "chernoff",
    ) -> None:
        super().__init__()
        self.input_size = tuple(input_size)
        self.log_nfa_threshold = log_nfa_threshold
        self.clamp_chernoff = clamp_chernoff
        self.tail = tail
        self.likelihood = LikelihoodMapGenerator(self.input_size)

    def forward(self, latents: list[torch.Tensor]) -> torch.Tensor:
        return self.likelihood(latents)

    def segment(
        self,
        latents: list[torch.Tensor],
        null: list[tuple[float, float]] | None = None,
        scales: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """NFA of ``latents`` under ``null`` (``None``: ``chi2(C_l)``) over the ``scales`` tested (``None``: all)."""
        return a_contrario_segmentation(
            latents,
            self.input_size,
            self.log_nfa_threshold,
            self.clamp_chernoff,
            null=null,
            scales=scales,
            tail=self.tail,
        )
