"""Training losses of the patch auto-encoders and the code prior (Pinon et al. 2023, section 2.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

__all__ = ["CodePriorLoss", "PatchAutoencoderLoss"]


class PatchAutoencoderLoss(nn.Module):
    """``||x - x_hat||^2 + ||sg[z] - z_q||^2 + beta ||z - sg[z_q]||^2`` (the last two terms only for the VQ-VAE).

    Every term is a mean over its elements (the usual VQ-VAE normalisation); ``beta`` is the commitment weight (0.25,
    van den Oord et al. 2017; the paper does not give its value).
    """

    def __init__(self, commitment_weight: float = 0.25) -> None:
        super().__init__()
        self.commitment_weight = commitment_weight

    def forward(
        self,
        patches: torch.Tensor,
        reconstruction: torch.Tensor,
        codebook_loss: torch.Tensor,
        commitment_loss: torch.Tensor,
    ) -> torch.Tensor:
        return F.mse_loss(reconstruction, patches) + codebook_loss + self.commitment_weight * commitment_loss


class CodePriorLoss(nn.Module):
    """Negative log-likelihood of the code sequences under the autoregressive prior (mean over codes)."""

    def forward(self, logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), codes.flatten())
