"""MSFlow anomaly maps and image score.

Per scale the latent's log-likelihood map is ``logp_s = -1/2 mean_c z_s^2`` and the multi-scale map is
``S = sum_s up(logp_s)``. MSFlow's detection map ``A = 1 - exp(S - max S)`` is normalised per image, so it only
compares pixels of one image; the image score is the mean of its top ``k`` (3 %) pixels, as in the paper.

The map handed to Anomalib is ``-S`` (the summed per-pixel negative log-likelihood up to constants): un-normalised,
so its values compare across images and a single threshold means the same for every image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


class AnomalyMapGenerator(nn.Module):
    """Turn per-scale latents into the cross-image anomaly map ``-S`` and MSFlow's top-k image score."""

    def __init__(self, top_k: float = 0.03) -> None:
        super().__init__()
        if not 0 < top_k <= 1:
            msg = f"top_k is the fraction of pixels averaged into the image score and must be in (0, 1], got {top_k}."
            raise ValueError(msg)
        self.top_k = top_k

    @staticmethod
    def log_likelihood(latents: list[torch.Tensor], image_size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """``S = sum_s up(-1/2 mean_c z_s^2)``, shape ``[N, 1, H, W]``."""
        maps = [-0.5 * torch.mean(z**2, dim=1, keepdim=True) for z in latents]
        return sum(F.interpolate(m, size=tuple(image_size), mode="bilinear", align_corners=False) for m in maps)

    def detection_map(self, log_likelihood: torch.Tensor) -> torch.Tensor:
        """MSFlow's per-image detection map ``A = 1 - exp(S - max S)`` in ``[0, 1)``."""
        return 1 - torch.exp(log_likelihood - log_likelihood.flatten(1).amax(dim=1).view(-1, 1, 1, 1))

    def image_score(self, log_likelihood: torch.Tensor) -> torch.Tensor:
        """Mean of the top ``k`` fraction of the detection map, per image.

        ``A`` saturates at 1 where ``max S - S`` exceeds ~17 in float32; computing it in float64 moves that to ~36, so
        strongly anomalous images keep distinct scores.
        """
        flat = self.detection_map(log_likelihood.double()).flatten(1)
        count = max(1, int(flat.shape[1] * self.top_k))
        return flat.topk(count, dim=1).values.mean(dim=1).to(log_likelihood.dtype)

    def forward(
        self, latents: list[torch.Tensor], image_size: tuple[int, int] | torch.Size
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(anomaly_map [N, 1, H, W], image_score [N])``."""
        log_likelihood = self.log_likelihood(latents, image_size)
        return -log_likelihood, self.image_score(log_likelihood)
