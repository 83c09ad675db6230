"""Losses of NF-BMR: the TNF negative log-likelihood (eq. 8) and the bidirectional mapping loss (eqs. 11-13)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

__all__ = ["BidirectionalMappingLoss", "FlowNLLLoss"]


class FlowNLLLoss(nn.Module):
    """Eq. 8, ``-log p_Y(y) = ||z||^2 / 2 - log|det dz/dy|`` (+ const), per sample.

    Averaged over the batch and divided by the number of feature elements ``c * h * w`` (nats per dimension), which
    rescales eq. 8 by a constant so that the loss scale does not depend on the feature size.
    """

    def forward(self, target: torch.Tensor, log_jacobian: torch.Tensor) -> torch.Tensor:
        per_sample = 0.5 * target.square().flatten(1).sum(dim=1) - log_jacobian
        return per_sample.mean() / target[0].numel()


class BidirectionalMappingLoss(nn.Module):
    """Eqs. 11-13: ``loss_S + loss_T`` with ``loss_S = ||y - y_hat||^2 / (w h c)`` and ``loss_T = ||z - z_hat||^2 / (w h c)``
    (batch mean). Returns ``(total, loss_S, loss_T)``."""

    def forward(
        self,
        source: torch.Tensor,
        source_hat: torch.Tensor,
        target: torch.Tensor,
        target_hat: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        source_loss = F.mse_loss(source_hat, source)
        target_loss = F.mse_loss(target_hat, target)
        return source_loss + target_loss, source_loss, target_loss
