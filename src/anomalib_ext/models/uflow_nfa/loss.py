"""U-Flow negative log-likelihood (paper eq. 1): per image ``sum_l 1/2 ||z_l||^2 - log|det J|``, mean over the batch."""

from __future__ import annotations

import torch
from torch import nn


class UFlowNFALoss(nn.Module):
    """Maximum likelihood of a standard normal latent, averaged over images.

    Unlike Anomalib 2.7's ``UFlowLoss`` (which sums the ``1/2 ||z||^2`` term over the whole batch but averages the
    log-determinant, pulling the latent variance towards ``1/B``), both terms are per image here, so the latents
    are driven to unit variance: the null model of the NFA test.
    """

    @staticmethod
    def forward(
        latents: list[torch.Tensor], log_jacobian: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean NLL over images; with ``weights`` (0/1 per image), the mean over the images of weight 1 (0 if none)."""
        half_squared_norm = sum(0.5 * latent.square().flatten(1).sum(dim=1) for latent in latents)
        nll = half_squared_norm - log_jacobian
        if weights is None:
            return torch.mean(nll)
        return (nll * weights).sum() / weights.sum().clamp(min=1)
