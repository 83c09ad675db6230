"""MSFlow negative log-likelihood."""

from __future__ import annotations

import torch
from torch import nn


class MSFlowLoss(nn.Module):
    """``mean_batch [ sum_s 1/2 ||z_s||^2 - log|det J| ] / D``.

    ``log|det J|`` is the sum of the parallel flows' and the fusion flow's log-determinants; ``D`` is the number of latent
    dimensions per sample. Dividing by ``D`` only rescales the loss (and keeps it O(1) for any input size).
    """

    def forward(self, latents: list[torch.Tensor], log_det: torch.Tensor) -> torch.Tensor:
        squared_norm = sum(0.5 * (z**2).flatten(1).sum(dim=1) for z in latents)
        dimensions = sum(z[0].numel() for z in latents)
        return torch.mean(squared_norm - log_det) / dimensions
