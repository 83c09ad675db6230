"""MSFlow anomaly maps and image score.

Per scale the latent's log-likelihood map is ``logp_s = -1/2 mean_c z_s^2`` (``<= 0``: the standard normal's log-density
up to its constant). MSFlow builds two maps from it, both normalised per image by their maximum:

* ``add`` (MSFlow's pixel-AUROC map): ``max - sum_s up(exp(logp_s - max logp_s))``;
* ``mul`` (MSFlow's PRO map, also its image score): ``1 - exp(S - max S)`` with ``S = sum_s up(logp_s)``.

Per-image normalisation makes values comparable only within one image. The maps handed to Anomalib replace the per-image
maximum by the bound ``logp <= 0`` that every image shares, so one threshold means the same for every image:

* ``add``: ``1 - mean_s up(exp(logp_s))`` in ``[0, 1)``;
* ``mul``: ``1 - exp(S / n_scales)`` in ``[0, 1)`` (one minus the geometric mean of the per-scale likelihoods: the same
  pixel ranking as ``S``, saturating only where ``S / n_scales < -17`` in float32 instead of ``S < -17``).

``add`` is the default: it is the map behind MSFlow's reported pixel AUROC, and it saturates only where every scale does.
The image score is MSFlow's: the mean of the top ``k`` (3 %) pixels of the per-image ``mul`` detection map.
Upsampling is bilinear with ``align_corners=True``, as in MSFlow.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

AnomalyMapMode = Literal["add", "mul"]
ANOMALY_MAP_MODES: tuple[str, ...] = ("add", "mul")


def _upsample(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=True)


class AnomalyMapGenerator(nn.Module):
    """Turn per-scale latents into a bounded, cross-image anomaly map (``add`` or ``mul``) and MSFlow's image score."""

    def __init__(self, top_k: float = 0.03, mode: AnomalyMapMode = "add") -> None:
        super().__init__()
        if not 0 < top_k <= 1:
            msg = f"top_k is the fraction of pixels averaged into the image score and must be in (0, 1], got {top_k}."
            raise ValueError(msg)
        if mode not in ANOMALY_MAP_MODES:
            msg = f"anomaly_map must be one of {ANOMALY_MAP_MODES}, got {mode!r}."
            raise ValueError(msg)
        self.top_k = top_k
        self.mode = mode

    @staticmethod
    def scale_log_likelihoods(latents: list[torch.Tensor]) -> list[torch.Tensor]:
        """``logp_s = -1/2 mean_c z_s^2`` per scale, shape ``[N, 1, h_s, w_s]``."""
        return [-0.5 * torch.mean(z**2, dim=1, keepdim=True) for z in latents]

    def log_likelihood(self, latents: list[torch.Tensor], image_size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """``S = sum_s up(logp_s)``, shape ``[N, 1, H, W]``."""
        size = tuple(image_size)
        return sum(_upsample(m, size) for m in self.scale_log_likelihoods(latents))

    def anomaly_map(self, latents: list[torch.Tensor], image_size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """The bounded map of :attr:`mode` in ``[0, 1)``, without per-image normalisation."""
        size = tuple(image_size)
        log_likelihoods = self.scale_log_likelihoods(latents)
        if self.mode == "add":
            return 1 - sum(_upsample(torch.exp(m), size) for m in log_likelihoods) / len(log_likelihoods)
        return 1 - torch.exp(sum(_upsample(m, size) for m in log_likelihoods) / len(log_likelihoods))

    @staticmethod
    def detection_map(log_likelihood: torch.Tensor) -> torch.Tensor:
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
        return self.anomaly_map(latents, image_size), self.image_score(self.log_likelihood(latents, image_size))
