"""MSFlow torch model: frozen multi-scale extractor, parallel flows, fusion flow (Zhou et al., TNNLS 2024).

The parallel flows are FrEIA ``SequenceINN`` stacks of Anomalib's :class:`AllInOneBlock`, one stack per scale, each block
conditioned on cflow's fixed 2D sin/cos positional encoding. The fusion flow permutes each scale's channels, then a
two-pass affine coupling lets the three scales exchange information: a cross-scale mixture computed on the coarsest grid is
added to each scale's own conditioning half, and per-scale convolutions give the scale and shift at full resolution. Both
are fully convolutional, so the flows do not depend on the input size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from anomalib.models.components.flow import AllInOneBlock
from anomalib.models.image.cflow.utils import positional_encoding_2d
from FrEIA.framework import SequenceINN
from torch import nn

from anomalib_ext.components.backbones import create_feature_extractor
from anomalib_ext.components.nfa import a_contrario_segmentation
from anomalib_ext.components.task_pretraining import default_feature_layers

from .anomaly_map import AnomalyMapGenerator, AnomalyMapMode

# Paper settings (MSFlow, section III / public configuration).
DEFAULT_FLOW_BLOCKS = (2, 5, 8)
DEFAULT_CLAMP = 1.9
DEFAULT_POSITIONAL_CHANNELS = 64
DEFAULT_BACKBONE = (
    "wide_resnet50_2.tv_in1k"  # torchvision's ImageNet weights, as MSFlow (timm's plain name is another set)
)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of an ``[N, C, H, W]`` tensor."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return super().forward(inputs.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_ln_subnet(in_channels: int, out_channels: int) -> nn.Sequential:
    """MSFlow's coupling subnet of the parallel flows: conv3x3 -> LayerNorm(channels) -> ReLU -> conv3x3."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, padding=1),
        ChannelLayerNorm(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
    )


def parallel_flow(channels: int, n_blocks: int, condition_channels: int, clamp: float) -> SequenceINN:
    """One scale's flow: ``n_blocks`` conditional AllInOne blocks (affine clamp ``clamp``, softplus global affine).

    The blocks are built for a nominal 1x1 grid; their convolutional subnets apply to any spatial size.
    """
    flow = SequenceINN(channels, 1, 1)
    for _ in range(n_blocks):
        flow.append(
            AllInOneBlock,
            cond=0,
            cond_shape=(condition_channels, 1, 1),
            subnet_constructor=conv_ln_subnet,
            affine_clamping=clamp,
            global_affine_type="SOFTPLUS",
        )
    return flow


class ChannelPermutation(nn.Module):
    """A fixed random channel permutation (log-det 0), kept as buffers so checkpoints and DDP ranks share it.

    FrEIA's ``PermuteRandom`` would do the same but reseeds NumPy's global generator; this one draws from its own.
    """

    def __init__(self, channels: int, generator: torch.Generator) -> None:
        super().__init__()
        permutation = torch.randperm(channels, generator=generator)
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse", torch.argsort(permutation))

    def forward(self, inputs: torch.Tensor, rev: bool = False) -> torch.Tensor:
        return inputs.index_select(1, self.inverse if rev else self.permutation)


class FusionSubnet(nn.Module):
    """Scale and shift of every scale's target half from the conditioning halves of all scales.

    The conditioning halves are average-pooled to the coarsest grid and concatenated; ``conv3x3 (-> total/4) -> LayerNorm
    -> ReLU -> conv3x3 -> ReLU`` mixes them; the result is split per scale, upsampled (bilinear) and **added** to that
    scale's own conditioning half; per-scale 3x3 convolutions then give ``s`` and ``t`` at the scale's full resolution.
    """

    def __init__(self, condition_channels: Sequence[int], target_channels: Sequence[int]) -> None:
        super().__init__()
        self.condition_channels = list(condition_channels)
        total = sum(self.condition_channels)
        hidden = max(1, total // 4)
        self.mix = nn.Sequential(
            nn.Conv2d(total, hidden, 3, padding=1),
            ChannelLayerNorm(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, total, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        pairs = list(zip(self.condition_channels, target_channels, strict=True))
        self.scale_convs = nn.ModuleList(nn.Conv2d(c, t, 3, padding=1) for c, t in pairs)
        self.shift_convs = nn.ModuleList(nn.Conv2d(c, t, 3, padding=1) for c, t in pairs)

    def fused_conditions(self, conditions: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each scale's conditioning half plus the upsampled cross-scale mixture (the residual add)."""
        coarse_size = min((c.shape[-2:] for c in conditions), key=lambda size: size[0] * size[1])
        pooled = torch.cat([F.adaptive_avg_pool2d(c, coarse_size) for c in conditions], dim=1)
        mixed = self.mix(pooled).split(self.condition_channels, dim=1)
        return [
            condition + F.interpolate(part, size=condition.shape[-2:], mode="bilinear", align_corners=True)
            for condition, part in zip(conditions, mixed, strict=True)
        ]

    def forward(self, conditions: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Unclamped ``(s, t)`` per scale."""
        fused = self.fused_conditions(conditions)
        return [
            (scale_conv(x), shift_conv(x))
            for x, scale_conv, shift_conv in zip(fused, self.scale_convs, self.shift_convs, strict=True)
        ]


class FusionFlow(nn.Module):
    """MSFlow's fusion flow: a random channel permutation per scale, then a two-pass affine coupling across scales.

    Every (permuted) scale ``i`` is split into channel halves ``(a_i, b_i)``. Pass 1: :class:`FusionSubnet` on all ``b``
    halves gives ``s_i, t_i`` and ``a_i' = a_i * exp(log s_i) + t_i``; pass 2 does the same for ``b`` conditioned on
    the new ``a'`` halves. ``log s = clamp * (2/pi) * atan(s / clamp)`` (soft clamp); ``log|det J| = sum log s``.

    Args:
        channels: channels per scale, finest first.
        clamp: soft clamp of the log-scales (paper: 1.9).
        seed: seed of the fixed channel permutations (independent of the global random state).
    """

    def __init__(self, channels: Sequence[int], clamp: float = DEFAULT_CLAMP, seed: int = 0) -> None:
        super().__init__()
        self.first_halves = [c // 2 for c in channels]
        self.second_halves = [c - c // 2 for c in channels]
        self.clamp = clamp
        generator = torch.Generator().manual_seed(seed)
        self.permutations = nn.ModuleList(ChannelPermutation(c, generator) for c in channels)
        self.first_pass = FusionSubnet(self.second_halves, self.first_halves)
        self.second_pass = FusionSubnet(self.first_halves, self.second_halves)

    def _soft_clamp(self, log_scale: torch.Tensor) -> torch.Tensor:
        return self.clamp * (2 / math.pi) * torch.atan(log_scale / self.clamp)

    def _affine_parameters(
        self, subnet: FusionSubnet, conditions: list[torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self._soft_clamp(log_scale), shift) for log_scale, shift in subnet(conditions)]

    def forward(self, features: list[torch.Tensor], rev: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Map per-scale tensors forwards (``rev=False``) or backwards; return the outputs and per-sample log-det."""
        if not rev:
            features = [permutation(x) for x, permutation in zip(features, self.permutations, strict=True)]
        halves = [
            x.split([a, b], dim=1) for x, a, b in zip(features, self.first_halves, self.second_halves, strict=True)
        ]
        first = [a for a, _ in halves]
        second = [b for _, b in halves]
        log_det = features[0].new_zeros(features[0].shape[0])
        if not rev:
            parameters = self._affine_parameters(self.first_pass, second)
            first = [a * torch.exp(s) + t for a, (s, t) in zip(first, parameters, strict=True)]
            log_det = log_det + sum(s.flatten(1).sum(1) for s, _ in parameters)
            parameters = self._affine_parameters(self.second_pass, first)
            second = [b * torch.exp(s) + t for b, (s, t) in zip(second, parameters, strict=True)]
            log_det = log_det + sum(s.flatten(1).sum(1) for s, _ in parameters)
        else:
            parameters = self._affine_parameters(self.second_pass, first)
            second = [(b - t) * torch.exp(-s) for b, (s, t) in zip(second, parameters, strict=True)]
            log_det = log_det - sum(s.flatten(1).sum(1) for s, _ in parameters)
            parameters = self._affine_parameters(self.first_pass, second)
            first = [(a - t) * torch.exp(-s) for a, (s, t) in zip(first, parameters, strict=True)]
            log_det = log_det - sum(s.flatten(1).sum(1) for s, _ in parameters)
        outputs = [torch.cat([a, b], dim=1) for a, b in zip(first, second, strict=True)]
        if rev:
            outputs = [permutation(x, rev=True) for x, permutation in zip(outputs, self.permutations, strict=True)]
        return outputs, log_det


class MSFlowModel(nn.Module):
    """MSFlow: features at three scales -> parallel flows -> fusion flow -> Gaussian latents.

    Args:
        backbone: timm CNN name (default ``wide_resnet50_2.tv_in1k``: torchvision's ImageNet weights, as MSFlow).
        layers: three feature taps, finest first; ``None`` picks the taps at strides 4/8/16.
        pre_trained: ImageNet weights (see :mod:`anomalib_ext.components.backbones`).
        backbone_weights: local timm-keyed weights file, e.g. a task-pre-trained encoder.
        flow_blocks: AllInOne blocks per scale, finest first (paper: 2, 5, 8).
        clamp: affine clamp of the parallel and fusion couplings (paper: 1.9).
        positional_channels: channels of the 2D sin/cos condition (paper: 64).
        top_k: fraction of the detection map averaged into the image score (paper: 3 %).
        anomaly_map: ``add`` (default) or ``mul`` (see :mod:`.anomaly_map`).
        use_nfa_mask: also return ``pred_mask`` from the a-contrario NFA tree test on the latents (white Gaussian under
            normality) and ``pred_label`` = the mask has a pixel; left out while exporting (numpy/scikit-image step).
        log_nfa_threshold: NFA detections where ``log10 NFA < log_nfa_threshold`` (0: NFA < 1).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        backbone_weights: str | Path | None = None,
        flow_blocks: Sequence[int] = DEFAULT_FLOW_BLOCKS,
        clamp: float = DEFAULT_CLAMP,
        positional_channels: int = DEFAULT_POSITIONAL_CHANNELS,
        top_k: float = 0.03,
        anomaly_map: AnomalyMapMode = "add",
        use_nfa_mask: bool = False,
        log_nfa_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        self.use_nfa_mask = use_nfa_mask
        self.log_nfa_threshold = log_nfa_threshold
        self.layers = list(layers) if layers is not None else default_feature_layers(backbone)
        if len(self.layers) != len(flow_blocks):
            msg = f"MSFlow needs one flow per feature layer: got layers {self.layers} and flow_blocks {list(flow_blocks)}."
            raise ValueError(msg)
        self.feature_extractor = create_feature_extractor(backbone, self.layers, pre_trained, backbone_weights).eval()
        self.feature_extractor.requires_grad_(False)  # frozen; task pre-training re-enables it for its own stage
        self.feature_pool = nn.AvgPool2d(3, stride=2, padding=1)
        channels = self.feature_extractor.out_dims
        self.positional_channels = positional_channels
        self.parallel_flows = nn.ModuleList(
            parallel_flow(c, n, positional_channels, clamp) for c, n in zip(channels, flow_blocks, strict=True)
        )
        self.fusion_flow = FusionFlow(channels, clamp)
        self.anomaly_map_generator = AnomalyMapGenerator(top_k=top_k, mode=anomaly_map)

    @property
    def encoder(self) -> nn.Module:
        """The timm feature network (the encoder that task-specific pre-training fine-tunes)."""
        return self.feature_extractor.feature_extractor

    def extract_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Frozen extractor features of the configured layers, each average-pooled (3x3, stride 2) as in MSFlow."""
        self.encoder.eval()
        with torch.no_grad():
            features = self.encoder(images)
        return [self.feature_pool(feature) for feature in features]

    def _positional_encoding(self, feature: torch.Tensor) -> torch.Tensor:
        height, width = feature.shape[-2:]
        encoding = positional_encoding_2d(self.positional_channels, height, width).to(feature)
        return encoding.unsqueeze(0).expand(feature.shape[0], -1, -1, -1)

    def encode(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Parallel flows then fusion flow; returns latents per scale and the total per-sample log-det."""
        latents, log_det = [], features[0].new_zeros(features[0].shape[0])
        for feature, flow in zip(features, self.parallel_flows, strict=True):
            latent, block_log_det = flow(feature, c=[self._positional_encoding(feature)])
            latents.append(latent)
            log_det = log_det + block_log_det
        latents, fusion_log_det = self.fusion_flow(latents)
        return latents, log_det + fusion_log_det

    def decode(self, latents: list[torch.Tensor]) -> list[torch.Tensor]:
        """Inverse of :meth:`encode` (used to check invertibility)."""
        features, _ = self.fusion_flow(latents, rev=True)
        return [
            flow(latent, c=[self._positional_encoding(latent)], rev=True)[0]
            for latent, flow in zip(features, self.parallel_flows, strict=True)
        ]

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor] | InferenceBatch:
        """Training: ``(latents, log_det)``. Eval: :class:`InferenceBatch` with the image score and anomaly map."""
        latents, log_det = self.encode(self.extract_features(images))
        if self.training:
            return latents, log_det
        anomaly_map, pred_score = self.anomaly_map_generator(latents, images.shape[-2:])
        if not self.use_nfa_mask or torch.compiler.is_exporting():
            return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
        _, pred_mask = a_contrario_segmentation(latents, tuple(images.shape[-2:]), self.log_nfa_threshold)
        return InferenceBatch(
            pred_score=pred_score,
            pred_label=pred_mask.flatten(1).any(dim=1),
            anomaly_map=anomaly_map,
            pred_mask=pred_mask,
        )
