"""DenseHybridAD training loss (paper Eq. 1, β = 0.03) with the anchors that keep it bounded.

Paper Eq. 1::

    L_AD = -E_in[ln P(d_in|x)] - β · E_out[ln P(d_out|x) - ln p̂(x)],     ln p̂(x) = logsumexp_k s_k(x)

The only likelihood term, ``+β·E_out[ln p̂(x)]``, is unbounded below: shifting every logit down (e.g. through the final
conv's bias) lowers it without limit while nothing else changes. Two documented anchors, both on by default:

* ``inlier_likelihood``: DenseHybrid's own inlier data term ``-β·E_in[ln p̂(x)]`` (the adaptation dropped it together with
  the segmentation loss). The energy part becomes ``β·(E_out[ln p̂] - E_in[ln p̂])``: invariant to a common logit shift,
  and, because logsumexp is 1-Lipschitz in the max-norm, bounded below by ``-β·max_{x,x'} ||s(x) - s(x')||_∞`` whenever
  only biases move (the drift case).
* ``distillation_weight``: cross-entropy from the frozen initial segmenter's class posterior to the model's, on normal
  pixels. It stands in for the missing primary discriminative task (paper, Sec. III: "lack of the primary discriminative
  loss") and keeps the class posterior of the pretrained segmenter. It is shift-invariant, so it complements, not
  replaces, the first anchor.

With both off (``inlier_likelihood=False, distillation_weight=0``) the loss is exactly Eq. 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

PAPER_BETA = 0.03


class LossTerms(NamedTuple):
    """The total loss and its parts (for logging)."""

    total: torch.Tensor
    outlier_head: torch.Tensor  # -E_in[ln P(d_in|x)] - β·E_out[ln P(d_out|x)]
    likelihood: torch.Tensor  # β·E_out[ln p̂(x)] (- β·E_in[ln p̂(x)] with the inlier anchor)
    distillation: torch.Tensor  # E_in[KL(teacher posterior || model posterior)]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the pixels where ``mask`` is set; 0 (with a gradient path) if there are none."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


class DenseHybridLoss(nn.Module):
    """Bounded DenseHybridAD loss.

    Args:
        beta: weight of the outlier terms (paper: 0.03).
        inlier_likelihood: add DenseHybrid's inlier term ``-β·E_in[ln p̂(x)]`` (bounds the logit drift).
        distillation_weight: weight of the cross-entropy to the frozen initial segmenter on normal pixels (0 disables).
    """

    def __init__(
        self, beta: float = PAPER_BETA, inlier_likelihood: bool = True, distillation_weight: float = 1.0
    ) -> None:
        super().__init__()
        if beta < 0 or distillation_weight < 0:
            msg = f"beta and distillation_weight must be non-negative, got {beta} and {distillation_weight}."
            raise ValueError(msg)
        self.beta = beta
        self.inlier_likelihood = inlier_likelihood
        self.distillation_weight = distillation_weight

    def forward(
        self,
        class_logits: torch.Tensor,
        outlier_logit: torch.Tensor,
        outlier_mask: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
    ) -> LossTerms:
        """Loss for a batch with pasted negatives.

        Args:
            class_logits: s(x), [B, K, H, W].
            outlier_logit: z(x), [B, 1, H, W].
            outlier_mask: [B, H, W] or [B, 1, H, W], true on pasted (negative) pixels.
            teacher_logits: the frozen initial segmenter's s(x), needed when ``distillation_weight > 0``.
        """
        outlier = outlier_mask.reshape(outlier_logit.shape[0], *outlier_logit.shape[-2:]).bool()
        inlier = ~outlier
        z = outlier_logit[:, 0]
        log_density = torch.logsumexp(class_logits, dim=1)  # ln p̂(x)

        outlier_head = -_masked_mean(F.logsigmoid(-z), inlier) - self.beta * _masked_mean(F.logsigmoid(z), outlier)
        likelihood = self.beta * _masked_mean(log_density, outlier)
        if self.inlier_likelihood:
            likelihood = likelihood - self.beta * _masked_mean(log_density, inlier)

        distillation = class_logits.new_zeros(())
        if self.distillation_weight > 0:
            if teacher_logits is None:
                msg = "distillation_weight > 0 needs the teacher's logits (build the model with distill=True)."
                raise ValueError(msg)
            # KL(teacher || model): the cross-entropy minus the teacher's (constant) entropy, so 0 at the start.
            teacher_log_posterior = teacher_logits.log_softmax(dim=1)
            divergence = (teacher_log_posterior.exp() * (teacher_log_posterior - class_logits.log_softmax(dim=1))).sum(
                dim=1
            )
            distillation = _masked_mean(divergence, inlier)

        total = outlier_head + likelihood + self.distillation_weight * distillation
        return LossTerms(total=total, outlier_head=outlier_head, likelihood=likelihood, distillation=distillation)
