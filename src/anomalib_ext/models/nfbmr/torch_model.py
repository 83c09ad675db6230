"""PyTorch model of NF-BMR (Zhang et al., "A Normalizing Flow-Based Bidirectional Mapping Residual Network for
Unsupervised Defect Detection", CMC 78(2), 2024).

Three parts (paper Fig. 3):

* **SNN** (source domain, eq. 1): one layer of a frozen ImageNet CNN, ``y = SNN(x)`` with ``c`` channels. Paper:
  EfficientNet-b5 ``blocks.5`` (304 channels, stride 32, 24 x 24 for 768 px). timm's ``features_only`` cannot tap
  ``blocks.5``, so the layer is cut out of the full timm model with torch.fx (timm's feature-extraction wrapper around
  torchvision's), which also drops everything after the tap.
* **TNF** (target domain, eqs. 2-8): a RealNVP/Glow-style flow ``z = TNF(y)`` of affine coupling blocks (FrEIA
  ``GLOWCouplingBlock``: both halves transformed, eqs. 4-5), each preceded by a fixed random channel permutation
  (FrEIA ``PermuteRandom``). Subnet: conv(c/2 -> hidden) - ReLU - conv(hidden -> c), its output split into scale and
  shift. The paper gives the hidden width (1024) but not the kernel; the default is 3 x 3 (spatial context, as the
  flows of FastFlow/CS-Flow), ``flow_kernel_size=1`` gives a per-position flow.
* **Mapper**: BMR (Sec. 3.3, Fig. 4) = TMNN ``y -> z_hat`` (eq. 9) and SMNN ``z -> y_hat`` (eq. 10), each
  input conv -> n residual blocks -> ONE residual block shared by both nets -> n residual blocks -> output conv.
  Ablation ``mapper="bpfm"``: B-PFM (Wan et al. 2022), five 1 x 1 convs per direction around a shared bottleneck on
  L2-normalised features.

Eval outputs: ``anomaly_map`` = eq. 14 (or the flow's ``-log p_Z(z)`` with ``nf_only``) upsampled to the input,
``pred_score`` = its maximum, optional ``pred_mask`` from the a-contrario NFA test on the TNF latents.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from anomalib.data import InferenceBatch
from FrEIA import framework as ff
from FrEIA import modules as fm
from timm.models._features_fx import create_feature_extractor as create_fx_feature_extractor
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_ext.components.backbones import build_timm_model

from .anomaly_map import AnomalyMapGenerator

__all__ = [
    "BidirectionalFeatureMapping",
    "BidirectionalMappingResidual",
    "MappingNetwork",
    "NFBMRModel",
    "ResidualBottleneck",
    "SourceFeatureExtractor",
    "build_target_flow",
]

MAPPERS = ("bmr", "bpfm")
PAPER_BACKBONE = "tf_efficientnet_b5.in1k"  # ImageNet-1k weights, as the paper (timm's bare name is ImageNet-12k)
PAPER_LAYER = "blocks.5"


def _layer_listing(model: nn.Module, max_depth: int = 2) -> list[str]:
    """Module names of ``model`` up to ``max_depth`` dots deep (what a user would pass as ``layer``)."""
    return [name for name, _ in model.named_modules() if name and name.count(".") < max_depth]


class SourceFeatureExtractor(nn.Module):
    """Frozen SNN (eq. 1): the output of one named module of a timm model, ``[B, c, H/s, W/s]``.

    Args:
        backbone: timm model name (paper: ``efficientnet_b5``).
        layer: module name whose output is the source feature (paper: ``blocks.5``; any module name of the model,
            e.g. ``blocks.4`` of ``efficientnet_lite0`` or ``layer3`` of a ResNet).
        pre_trained / backbone_weights: ImageNet weights, resolved by :func:`build_timm_model` (offline for
            ``efficientnet_lite0`` or from a local file).

    Raises:
        ValueError: ``layer`` is not a module of the backbone (the message lists the available layers).
    """

    def __init__(
        self,
        backbone: str = PAPER_BACKBONE,
        layer: str = PAPER_LAYER,
        pre_trained: bool = True,
        backbone_weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        network = build_timm_model(backbone, pre_trained=pre_trained, backbone_weights=backbone_weights)
        modules = dict(network.named_modules())
        if not layer or layer not in modules:
            msg = f"Backbone '{backbone}' has no layer '{layer}'. Available layers: {_layer_listing(network)}."
            raise ValueError(msg)
        self.backbone = backbone
        self.layer = layer
        self.feature_extractor = create_fx_feature_extractor(network.eval(), return_nodes={layer: "feature"})
        self.feature_extractor.requires_grad_(False)
        self.feature_extractor.eval()

    @torch.no_grad()
    def probe(self, input_size: tuple[int, int]) -> tuple[int, tuple[int, int]]:
        """Channels and spatial size of the feature for an input of ``input_size``."""
        feature = self(torch.zeros(1, 3, *input_size))
        return int(feature.shape[1]), (int(feature.shape[2]), int(feature.shape[3]))

    def train(self, mode: bool = True) -> SourceFeatureExtractor:
        """Always in eval mode: the SNN is frozen, its batch-norm statistics included."""
        del mode
        return super().train(False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.feature_extractor(image)["feature"]


def _flow_subnet(hidden_channels: int, kernel_size: int) -> Callable[[int, int], nn.Module]:
    """Subnet constructor of the coupling blocks: conv - ReLU - conv, last conv zero-initialised (identity start)."""

    def constructor(in_channels: int, out_channels: int) -> nn.Sequential:
        output = nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(output.weight)
        nn.init.zeros_(output.bias)
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=kernel_size // 2),
            nn.ReLU(inplace=True),
            output,
        )

    return constructor


def _atan_clamp(scale: torch.Tensor) -> torch.Tensor:
    """FrEIA's default ``"ATAN"`` soft clamp of the log-scales, as a module-level function so the flow pickles."""
    return 0.636 * torch.atan(scale)


def build_target_flow(
    channels: int,
    feature_size: tuple[int, int],
    coupling_blocks: int = 4,
    hidden_channels: int = 1024,
    kernel_size: int = 3,
    clamp: float = 2.0,
    permutation_seed: int = 0,
) -> ff.SequenceINN:
    """TNF (eqs. 3-6): ``coupling_blocks`` x (fixed random permutation -> Glow affine coupling).

    The permutations are drawn from ``permutation_seed`` (block ``k`` uses ``seed + k``) without touching numpy's
    global random state, so every process (DDP ranks, a reloaded checkpoint) builds the same flow.
    """
    if channels < 2:
        msg = f"The flow needs at least 2 feature channels to split, got {channels}."
        raise ValueError(msg)
    if kernel_size < 1 or kernel_size % 2 == 0:
        msg = f"flow_kernel_size must be a positive odd number, got {kernel_size}."
        raise ValueError(msg)
    flow = ff.SequenceINN(channels, *feature_size)
    numpy_state = np.random.get_state()  # PermuteRandom seeds numpy's global generator
    try:
        for block in range(coupling_blocks):
            flow.append(fm.PermuteRandom, seed=permutation_seed + block)
            flow.append(
                fm.GLOWCouplingBlock,
                subnet_constructor=_flow_subnet(hidden_channels, kernel_size),
                clamp=clamp,
                clamp_activation=_atan_clamp,
            )
    finally:
        np.random.set_state(numpy_state)
    return flow


class ResidualBottleneck(nn.Module):
    """BMR residual block: ``x + ReLU(conv1x1(ReLU(conv3x3(ReLU(conv1x1(x))))))``.

    ReLU placement: the paper (Sec. 3.3, Fig. 4) puts a ReLU after each of the three convolutions and adds the skip
    connection; it does not draw a ReLU after the addition. So the last ReLU is inside the branch (the branch can only
    add non-negative values) and the block's output is not rectified, unlike ResNet's ``ReLU(x + F(x))``.
    """

    def __init__(self, channels: int, bottleneck_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, bottleneck_channels, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(bottleneck_channels, bottleneck_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(bottleneck_channels, channels, 1),
            nn.ReLU(inplace=True),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.body(features)


class MappingNetwork(nn.Module):
    """One direction of BMR (TMNN or SMNN, Fig. 4): input conv -> n blocks -> shared block -> n blocks -> output conv.

    The shared middle block is owned by :class:`BidirectionalMappingResidual` and passed to :meth:`forward`, so the
    state dict holds it once.
    """

    def __init__(self, channels: int, hidden_channels: int, bottleneck_channels: int, blocks_per_side: int) -> None:
        super().__init__()
        self.input_conv = nn.Conv2d(channels, hidden_channels, 1)
        self.head = nn.Sequential(
            *[ResidualBottleneck(hidden_channels, bottleneck_channels) for _ in range(blocks_per_side)]
        )
        self.tail = nn.Sequential(
            *[ResidualBottleneck(hidden_channels, bottleneck_channels) for _ in range(blocks_per_side)]
        )
        self.output_conv = nn.Conv2d(hidden_channels, channels, 1)

    def forward(self, features: torch.Tensor, shared_block: nn.Module) -> torch.Tensor:
        return self.output_conv(self.tail(shared_block(self.head(self.input_conv(features)))))


class BidirectionalMappingResidual(nn.Module):
    """BMR: TMNN ``y -> z_hat`` (eq. 9) and SMNN ``z -> y_hat`` (eq. 10) sharing one middle residual block.

    Args:
        channels: feature channels ``c`` of ``y`` and ``z``.
        hidden_channels: ``c_latent`` (paper: 1024).
        bottleneck_channels: inner width of the residual blocks (not given in the paper; default ``hidden / 4``,
            the ResNet bottleneck ratio).
        blocks_per_side: ``n`` residual blocks on each side of the shared one (paper: 2).
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int = 1024,
        bottleneck_channels: int | None = None,
        blocks_per_side: int = 2,
    ) -> None:
        super().__init__()
        bottleneck_channels = bottleneck_channels or max(1, hidden_channels // 4)
        self.shared_block = ResidualBottleneck(hidden_channels, bottleneck_channels)
        self.tmnn = MappingNetwork(channels, hidden_channels, bottleneck_channels, blocks_per_side)
        self.smnn = MappingNetwork(channels, hidden_channels, bottleneck_channels, blocks_per_side)

    def forward(
        self, source: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(y, y_hat, z, z_hat)``: the compared pairs of eqs. 11-14."""
        return source, self.smnn(target, self.shared_block), target, self.tmnn(source, self.shared_block)


class _FeatureMappingDirection(nn.Module):
    """One B-PFM direction: 1x1 convs ``c -> h -> h/2 -> [shared h/2 -> h/2] -> h -> c`` (ReLU between)."""

    def __init__(self, channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, hidden_channels, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, hidden_channels // 2, 1),
            nn.ReLU(inplace=True),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(hidden_channels // 2, hidden_channels, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, channels, 1),
        )

    def forward(self, features: torch.Tensor, shared_bottleneck: nn.Module) -> torch.Tensor:
        return self.decoder(shared_bottleneck(self.encoder(features)))


class BidirectionalFeatureMapping(nn.Module):
    """B-PFM mapper for the ablation (Table 5, "NF + B-PFM"): features are L2-normalised over channels, then each
    direction is five 1 x 1 convs whose middle one (the bottleneck) is shared by both directions."""

    def __init__(self, channels: int, hidden_channels: int = 1024) -> None:
        super().__init__()
        if hidden_channels < 2:
            msg = f"mapper_hidden_channels must be >= 2, got {hidden_channels}."
            raise ValueError(msg)
        self.shared_bottleneck = nn.Sequential(
            nn.Conv2d(hidden_channels // 2, hidden_channels // 2, 1), nn.ReLU(inplace=True)
        )
        self.source_to_target = _FeatureMappingDirection(channels, hidden_channels)
        self.target_to_source = _FeatureMappingDirection(channels, hidden_channels)

    def forward(
        self, source: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(y, y_hat, z, z_hat)`` in the L2-normalised feature spaces."""
        source = F.normalize(source, dim=1)
        target = F.normalize(target, dim=1)
        source_hat = self.target_to_source(target, self.shared_bottleneck)
        target_hat = self.source_to_target(source, self.shared_bottleneck)
        return source, source_hat, target, target_hat


class NFBMRModel(nn.Module):
    """NF-BMR: frozen SNN, TNF flow and a bidirectional mapper.

    Args:
        input_size: image size ``(H, W)`` the flow is built for (anomaly maps are upsampled to each input's own size).
        backbone, layer, pre_trained, backbone_weights: the SNN (:class:`SourceFeatureExtractor`).
        flow_blocks / flow_hidden_channels / flow_kernel_size / flow_clamp / permutation_seed: the TNF
            (paper: 4 blocks, hidden 1024; kernel not stated, default 3).
        mapper: ``"bmr"`` (paper) or ``"bpfm"`` (ablation).
        mapper_hidden_channels: ``c_latent`` of BMR / hidden width of B-PFM (paper: 1024).
        bottleneck_channels: inner width of the BMR residual blocks (default ``mapper_hidden_channels // 4``).
        residual_blocks: ``n`` BMR blocks each side of the shared one (paper: 2).
        nf_only: no mapper; the flow's ``-log p_Z(z) = ||z||^2 / 2`` per position is the anomaly map (Table 5,
            "NF" row).
        use_nfa_mask / log_nfa_threshold: ``pred_mask`` from the a-contrario NFA test on the TNF latents.
    """

    def __init__(
        self,
        input_size: tuple[int, int],
        backbone: str = PAPER_BACKBONE,
        layer: str = PAPER_LAYER,
        pre_trained: bool = True,
        backbone_weights: str | Path | None = None,
        flow_blocks: int = 4,
        flow_hidden_channels: int = 1024,
        flow_kernel_size: int = 3,
        flow_clamp: float = 2.0,
        permutation_seed: int = 0,
        mapper: Literal["bmr", "bpfm"] = "bmr",
        mapper_hidden_channels: int = 1024,
        bottleneck_channels: int | None = None,
        residual_blocks: int = 2,
        nf_only: bool = False,
        use_nfa_mask: bool = False,
        log_nfa_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        if mapper not in MAPPERS:
            msg = f"mapper must be one of {MAPPERS}, got '{mapper}'."
            raise ValueError(msg)
        self.input_size = tuple(int(size) for size in input_size)
        self.extractor = SourceFeatureExtractor(backbone, layer, pre_trained, backbone_weights)
        channels, feature_size = self.extractor.probe(self.input_size)
        self.channels = channels
        self.feature_size = feature_size
        self.flow = build_target_flow(
            channels,
            feature_size,
            coupling_blocks=flow_blocks,
            hidden_channels=flow_hidden_channels,
            kernel_size=flow_kernel_size,
            clamp=flow_clamp,
            permutation_seed=permutation_seed,
        )
        self.nf_only = nf_only
        self.mapper: nn.Module | None = None
        if not nf_only:
            if mapper == "bmr":
                self.mapper = BidirectionalMappingResidual(
                    channels, mapper_hidden_channels, bottleneck_channels, residual_blocks
                )
            else:
                self.mapper = BidirectionalFeatureMapping(channels, mapper_hidden_channels)
        self.anomaly_map_generator = AnomalyMapGenerator(self.input_size, use_nfa_mask, log_nfa_threshold)

    def train(self, mode: bool = True) -> NFBMRModel:
        super().train(mode)
        self.extractor.train(False)
        return self

    def extract(self, image: torch.Tensor) -> torch.Tensor:
        """Source feature ``y`` (eq. 1)."""
        return self.extractor(image)

    def encode(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target feature ``z = TNF(y)`` (eq. 2) and the per-sample ``log |det dz/dy|``."""
        return self.flow(source)

    def map(
        self, source: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(y, y_hat, z, z_hat)`` of the mapper (eqs. 9-10)."""
        if self.mapper is None:
            msg = "This NF-BMR model has no mapper (nf_only=True)."
            raise RuntimeError(msg)
        return self.mapper(source, target)

    def forward(self, image: torch.Tensor, flow_score: bool = False) -> InferenceBatch:
        """Eval outputs; ``flow_score=True`` scores with the flow likelihood even when a mapper exists."""
        source = self.extract(image)
        target, _ = self.encode(source)
        if self.nf_only or flow_score:
            distance = self.anomaly_map_generator.flow_distance(target)
        else:
            distance = self.anomaly_map_generator.mapping_distance(*self.map(source, target))
        return self.anomaly_map_generator(distance, target, image.shape[-2:])

    def stage_parameters(self) -> dict[str, Sequence[nn.Parameter]]:
        """Trainable parameters per stage: ``{"tnf": [...], "bmr": [...]}`` (empty ``bmr`` with ``nf_only``)."""
        mapper = [] if self.mapper is None else [p for p in self.mapper.parameters() if p.requires_grad]
        return {"tnf": [p for p in self.flow.parameters() if p.requires_grad], "bmr": mapper}
