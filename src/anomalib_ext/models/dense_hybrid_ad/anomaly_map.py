"""DenseHybridAD scores: the hybrid pixel score and its reduction to an image score."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812

ImageScore = Literal["max", "mean_top_k"]
IMAGE_SCORES: tuple[str, ...] = ("max", "mean_top_k")


def anomaly_score_map(class_logits: torch.Tensor, outlier_logit: torch.Tensor) -> torch.Tensor:
    """Hybrid score ``ln P(d_out|x) - ln p̂(x)`` per pixel (DenseHybrid Eq. 8; higher = more anomalous).

    Args:
        class_logits: s(x), [B, K, H, W], read as the unnormalised log-joint ln p̂(x, y); ln p̂(x) = logsumexp_k s_k(x).
        outlier_logit: z(x), [B, 1, H, W], with P(d_out|x) = sigmoid(z(x)).

    Returns:
        The score map [B, 1, H, W].
    """
    return F.logsigmoid(outlier_logit) - torch.logsumexp(class_logits, dim=1, keepdim=True)


def image_scores(anomaly_map: torch.Tensor, mode: ImageScore = "max", top_k: float = 0.01) -> torch.Tensor:
    """Reduce a [B, 1, H, W] score map to [B] image scores: the maximum, or the mean of the ``top_k`` highest fraction."""
    flat = anomaly_map.flatten(1)
    if mode == "max":
        return flat.amax(dim=1)
    if mode == "mean_top_k":
        if not 0.0 < top_k <= 1.0:
            msg = f"top_k must be a fraction in (0, 1], got {top_k}."
            raise ValueError(msg)
        count = max(1, round(top_k * flat.shape[1]))
        return flat.topk(count, dim=1).values.mean(dim=1)
    msg = f"Unknown image score {mode!r}; expected one of {IMAGE_SCORES}."
    raise ValueError(msg)
