"""DenseHybridAD training loss (paper Eq. 1, β = 0.03) with the anchors that make it bounded below.

Paper Eq. 1::

    L_AD = -E_in[ln P(d_in|x)] - β · E_out[ln P(d_out|x) - ln p̂(x)],     ln p̂(x) = logsumexp_k s_k(x)

Its only likelihood term, ``+β·E_out[ln p̂(x)]``, is unbounded below: every trainable weight that can move all K logits
together (the final conv's bias, or a vector ``a`` added to every row of its weight, which adds ``a·f(x)`` to all logits)
lowers it without limit while the class posterior, and so every other term, stays the same. Three anchors, all on by
default (``Δ(x) = ln p̂(x) - ln p̂_T(x)`` is the log-density relative to the frozen initial segmenter, the teacher T):

* ``density_anchor`` λ: ``λ·(E_out[Δ²] + E_in[Δ²])`` keeps the log-density itself near the teacher's. Per pixel,
  ``±β·Δ + λ·Δ² >= -β²/(4λ)``, so the likelihood part is bounded below by ``-β²/(4λ)`` per set of pixels, for every
  value of every parameter (minimum at ``Δ = ∓β/(2λ)``: 5 nats with the defaults). This is the anchor that bounds the loss.
* ``inlier_likelihood``: DenseHybrid's own inlier data term ``-β·E_in[ln p̂(x)]`` (the adaptation dropped it together with
  the segmentation loss): raise the density of normal pixels as Eq. 1 lowers that of negatives.
* ``distillation_weight``: KL divergence from the teacher's class posterior to the model's on normal pixels, standing in for
  the missing primary discriminative task (paper, Sec. III: "lack of the primary discriminative loss").

The likelihood terms are reported relative to the teacher (``Δ`` instead of ``ln p̂``): the teacher's part is a constant
of the parameters, so the gradients are exactly those of Eq. 1, and the reported loss has the fixed lower bound
:attr:`DenseHybridLoss.lower_bound`. With all anchors off (``density_anchor=0, inlier_likelihood=False,
distillation_weight=0``, no teacher) the loss is exactly Eq. 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

PAPER_BETA = 0.03
DEFAULT_DENSITY_ANCHOR = 0.003  # optimum shift β/(2λ) = 5 nats with β = 0.03


class LossTerms(NamedTuple):
    """The total loss and its parts (for logging)."""

    total: torch.Tensor
    outlier_head: torch.Tensor  # -E_in[ln P(d_in|x)] - β·E_out[ln P(d_out|x)]
    likelihood: torch.Tensor  # β·E_out[Δ] (- β·E_in[Δ] with the inlier term)
    density_anchor: torch.Tensor  # E_out[Δ²] + E_in[Δ²] (unweighted)
    distillation: torch.Tensor  # E_in[KL(teacher posterior || model posterior)]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the pixels where ``mask`` is set; 0 (with a gradient path) if there are none."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


class DenseHybridLoss(nn.Module):
    """Bounded DenseHybridAD loss.

    Args:
        beta: weight of the outlier terms (paper: 0.03).
        inlier_likelihood: add DenseHybrid's inlier term ``-β·E_in[ln p̂(x)]``.
        distillation_weight: weight of the KL divergence to the teacher's class posterior on normal pixels (0 disables).
        density_anchor: weight λ of the squared log-density shift from the teacher (0 disables; then the loss is not
            bounded below).
    """

    def __init__(
        self,
        beta: float = PAPER_BETA,
        inlier_likelihood: bool = True,
        distillation_weight: float = 1.0,
        density_anchor: float = DEFAULT_DENSITY_ANCHOR,
    ) -> None:
        super().__init__()
        if min(beta, distillation_weight, density_anchor) < 0:
            msg = (
                "beta, distillation_weight and density_anchor must be non-negative, got "
                f"{beta}, {distillation_weight} and {density_anchor}."
            )
            raise ValueError(msg)
        self.beta = beta
        self.inlier_likelihood = inlier_likelihood
        self.distillation_weight = distillation_weight
        self.density_anchor = density_anchor

    @property
    def needs_teacher(self) -> bool:
        """Whether :meth:`forward` needs the teacher's logits."""
        return self.distillation_weight > 0 or self.density_anchor > 0

    @property
    def lower_bound(self) -> float:
        """Lower bound of the total loss over all parameter values (``-inf`` without the density anchor)."""
        if self.density_anchor == 0:
            return float("-inf") if self.beta > 0 else 0.0
        return -(1 + int(self.inlier_likelihood)) * self.beta**2 / (4 * self.density_anchor)

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
            teacher_logits: the frozen initial segmenter's s(x); needed when :attr:`needs_teacher`.
        """
        if self.needs_teacher and teacher_logits is None:
            msg = "distillation_weight > 0 or density_anchor > 0 needs the teacher's logits (build the model with a teacher)."
            raise ValueError(msg)
        outlier = outlier_mask.reshape(outlier_logit.shape[0], *outlier_logit.shape[-2:]).bool()
        inlier = ~outlier
        z = outlier_logit[:, 0]
        log_density = torch.logsumexp(class_logits, dim=1)  # ln p̂(x)
        if teacher_logits is not None:
            log_density = log_density - torch.logsumexp(teacher_logits, dim=1)  # Δ(x): same gradient as ln p̂(x)

        outlier_head = -_masked_mean(F.logsigmoid(-z), inlier) - self.beta * _masked_mean(F.logsigmoid(z), outlier)
        likelihood = self.beta * _masked_mean(log_density, outlier)
        if self.inlier_likelihood:
            likelihood = likelihood - self.beta * _masked_mean(log_density, inlier)
        squared = log_density.square()
        density_anchor = _masked_mean(squared, outlier) + _masked_mean(squared, inlier)

        distillation = class_logits.new_zeros(())
        if self.distillation_weight > 0:
            # KL(teacher || model): the cross-entropy minus the teacher's (constant) entropy, so 0 at the start.
            teacher_log_posterior = teacher_logits.log_softmax(dim=1)
            divergence = (teacher_log_posterior.exp() * (teacher_log_posterior - class_logits.log_softmax(dim=1))).sum(
                dim=1
            )
            distillation = _masked_mean(divergence, inlier)

        total = (
            outlier_head + likelihood + self.density_anchor * density_anchor + self.distillation_weight * distillation
        )
        return LossTerms(
            total=total,
            outlier_head=outlier_head,
            likelihood=likelihood,
            density_anchor=density_anchor,
            distillation=distillation,
        )
