"""MSFlow negative log-likelihood."""

from __future__ import annotations

import torch
from torch import nn


class MSFlowLoss(nn.Module):
    """``mean_batch [ sum_s 1/2 ||z_s||^2 - log|det J| ]``, as MSFlow back-propagates it.

    ``log|det J|`` is the sum of the parallel flows' and the fusion flow's log-determinants. The loss is not divided by
    the number of latent dimensions ``D``: MSFlow's gradient-norm clip at 2 is tuned for this scale (divided by ``D``, the
    gradients would stay far below 2 and the clip would never act). :meth:`per_dimension` gives the O(1) value to log.
    """

    def forward(self, latents: list[torch.Tensor], log_det: torch.Tensor) -> torch.Tensor:
        squared_norm = sum(0.5 * (z**2).flatten(1).sum(dim=1) for z in latents)
        return torch.mean(squared_norm - log_det)

    @staticmethod
    def per_dimension(loss: torch.Tensor, latents: list[torch.Tensor]) -> torch.Tensor:
        """``loss / D`` with ``D`` the latent dimensions per sample (comparable across input sizes)."""
        return loss / sum(z[0].numel() for z in latents)
