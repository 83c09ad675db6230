"""U-Flow with the a-contrario NFA segmentation: torch model (Tailanian et al., 2024).

Phase 1, features: MS-CaiT (two independently pre-trained CaiT transformers, Sec. 3.1) or any timm CNN with >= 2
scales whose strides double from one scale to the next (each followed by a trainable ``LayerNorm([C, H, W])``).
Phase 2, the U-shaped normalizing flow (Sec. 3.2, Fig. 2): FrEIA graph, coarsest scale first; each stage is
``flow_steps`` Glow-style ``AllInOneBlock`` steps (subnet Conv-ReLU-Conv, kernels alternating 3 and 1, hidden width =
input channels, affine clamp, hard permutation); half of a stage's output is that scale's latent, the other half is
upsampled invertibly (i-RevNet pixel shuffle) and concatenated to the next finer scale.
Phase 3, the likelihood anomaly map (eq. 2) and phase 4, the NFA segmentation
(:func:`anomalib_ext.components.nfa.a_contrario_segmentation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from anomalib.data import InferenceBatch
from anomalib.models.components.flow import AllInOneBlock
from anomalib.models.image.uflow.torch_model import AffineCouplingSubnet
from FrEIA import framework as ff
from FrEIA import modules as fm
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_ext.components.backbones import build_timm_model, create_feature_extractor
from anomalib_ext.components.nfa import NFA_TAILS, select_scales

from .anomaly_map import AnomalyMapGenerator

MCAIT = "mcait"
MCAIT_INPUT_SIZE = (448, 448)


class MSCaiTFeatureExtractor(nn.Module):
    """MS-CaiT (paper Sec. 3.1): ``cait_m48_448`` blocks 0..40 on the 448 px image (768 x 28 x 28) and
    ``cait_s24_224`` blocks 0..20 on the image resized to 224 px (384 x 14 x 14), each with its final norm.

    Frozen and always in eval mode. Weights: ``backbone_weights`` = two local timm-keyed files (M48, S24), else the
    timm hub when ``pre_trained``, else random init.
    """

    def __init__(
        self,
        pre_trained: bool = True,
        backbone_weights: Sequence[str | Path] | None = None,
        models: tuple[str, str] = ("cait_m48_448", "cait_s24_224"),
        num_blocks: tuple[int, int] = (41, 21),
    ) -> None:
        super().__init__()
        weights = list(backbone_weights) if backbone_weights is not None else [None, None]
        if len(weights) != 2:
            msg = (
                "MS-CaiT needs two weight files, one per CaiT (cait_m48_448, cait_s24_224); "
                f"got {len(weights)}: {weights}."
            )
            raise ValueError(msg)
        self.extractors = nn.ModuleList(
            build_timm_model(name, pre_trained=pre_trained, backbone_weights=weight)
            for name, weight in zip(models, weights, strict=True)
        )
        for name, extractor, blocks in zip(models, self.extractors, num_blocks, strict=True):
            if len(extractor.blocks) < blocks:
                msg = f"MS-CaiT uses blocks 0..{blocks - 1} of {name}, but this model has only {len(extractor.blocks)}."
                raise ValueError(msg)
        self.num_blocks = num_blocks
        self.input_sizes = [extractor.patch_embed.img_size for extractor in self.extractors]
        self.channels = [extractor.embed_dim for extractor in self.extractors]
        self.scale_factors = [
            MCAIT_INPUT_SIZE[0] // (size[0] // extractor.patch_embed.patch_size[0])
            for size, extractor in zip(self.input_sizes, self.extractors, strict=True)
        ]
        self.requires_grad_(False)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        self.extractors.eval()
        features = []
        for extractor, size, blocks in zip(self.extractors, self.input_sizes, self.num_blocks, strict=True):
            x = (
                image
                if tuple(image.shape[-2:]) == tuple(size)
                else F.interpolate(
                    image,
                    size=tuple(size),
                    mode="bicubic",
                    align_corners=True,
                )
            )
            tokens = extractor.pos_drop(extractor.patch_embed(x) + extractor.pos_embed)
            for block in extractor.blocks[:blocks]:
                tokens = block(tokens)
            tokens = extractor.norm(tokens)
            grid = extractor.patch_embed.grid_size
            features.append(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid))
        return features


CNN_TAP_STRIDES = ((8, 16, 32), (4, 8, 16))


def default_cnn_layers(backbone: str) -> list[str]:
    """Feature taps at strides 8, 16, 32 (e.g. EfficientNet ``blocks.2/4/6``, ResNet ``layer2..4``), else 4, 8, 16.

    The deeper taps give latents with enough channels for the NFA to detect anything (measured with
    EfficientNet-Lite0 in docs/benchmarks.md: strides 4/8/16 give 30/30/56-channel latents that it never passes).
    """
    info = timm.create_model(backbone, pretrained=False, features_only=True).feature_info
    by_stride = {stride: module for stride, module in zip(info.reduction(), info.module_name(), strict=True)}
    for strides in CNN_TAP_STRIDES:
        if all(stride in by_stride for stride in strides):
            return [by_stride[stride] for stride in strides]
    msg = (
        f"Backbone {backbone!r} has no feature taps at strides 8/16/32 or 4/8/16 (available: {by_stride}); pass layers."
    )
    raise ValueError(msg)


class CNNFeatureExtractor(nn.Module):
    """Frozen timm CNN taps (via the project's offline-first backbone component) + trainable ``LayerNorm([C, H, W])``.

    The CNN's parameters have ``requires_grad=False`` (they never reach the optimiser or DDP's gradient reducer).
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str],
        input_size: tuple[int, int],
        pre_trained: bool = True,
        backbone_weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        if len(layers) < 2:
            msg = f"U-Flow needs at least 2 feature scales, got layers={list(layers)}."
            raise ValueError(msg)
        self.extractor = create_feature_extractor(backbone, layers, pre_trained, backbone_weights)
        self.extractor.requires_grad_(False)
        self.layers = list(layers)
        info = self.extractor.feature_extractor.feature_info
        self.channels = list(info.channels())
        self.scale_factors = list(info.reduction())
        if any(b != 2 * a for a, b in zip(self.scale_factors, self.scale_factors[1:], strict=False)):
            msg = (
                f"The U-shaped flow upsamples by 2 between scales: layers {self.layers} have strides "
                f"{self.scale_factors}; choose layers whose strides double (e.g. 4, 8, 16)."
            )
            raise ValueError(msg)
        for stride in self.scale_factors:
            if input_size[0] % stride or input_size[1] % stride:
                msg = f"Input size {input_size} must be divisible by every feature stride {self.scale_factors}."
                raise ValueError(msg)
        self.norms = nn.ModuleList(
            nn.LayerNorm([channels, input_size[0] // stride, input_size[1] // stride])
            for channels, stride in zip(self.channels, self.scale_factors, strict=True)
        )

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        self.extractor.eval()
        features = self.extractor(image)
        return [norm(features[layer]) for norm, layer in zip(self.norms, self.layers, strict=True)]


def build_u_flow(
    channels: Sequence[int],
    sizes: Sequence[tuple[int, int]],
    flow_steps: int,
    affine_clamp: float,
    subnet_channels_ratio: float,
    permute_soft: bool,
) -> ff.GraphINN:
    """U-shaped FrEIA graph over scales given finest first; outputs one latent per scale, finest first."""
    inputs = [
        ff.InputNode(c, h, w, name=f"features_{i}") for i, (c, (h, w)) in enumerate(zip(channels, sizes, strict=True))
    ]

    def stage(node: ff.Node, scale: int) -> list[ff.Node]:
        steps = []
        for step in range(flow_steps):
            node = ff.Node(
                node,
                AllInOneBlock,
                {
                    "subnet_constructor": AffineCouplingSubnet(3 if step % 2 == 0 else 1, subnet_channels_ratio),
                    "affine_clamping": affine_clamp,
                    "permute_soft": permute_soft,
                },
                name=f"scale{scale}_step{step}",
            )
            steps.append(node)
        return steps

    nodes: list[ff.Node] = []
    outputs: list[ff.OutputNode] = []
    current: ff.Node = inputs[-1]
    for scale in reversed(range(1, len(inputs))):
        steps = stage(current, scale)
        volume = steps[-1].output_dims[0][0]
        to_upsample = volume // 8 * 4  # a multiple of 4 channels for the pixel shuffle, about half of the volume
        split = ff.Node(
            steps[-1], fm.Split, {"section_sizes": (to_upsample, volume - to_upsample), "dim": 0}, name=f"split{scale}"
        )
        outputs.append(ff.OutputNode(split.out1, name=f"latent{scale}"))
        upsample = ff.Node(split.out0, fm.IRevNetUpsampling, {}, name=f"upsample{scale}")
        current = ff.Node([inputs[scale - 1].out0, upsample.out0], fm.Concat, {"dim": 0}, name=f"concat{scale - 1}")
        nodes.extend([*steps, split, upsample, current])
    steps = stage(current, 0)
    nodes.extend(steps)
    outputs.append(ff.OutputNode(steps[-1], name="latent0"))
    return ff.GraphINN(inputs + nodes + outputs[::-1])


NFA_NULLS = ("chi2", "calibrated")


class UFlowNFAModel(nn.Module):
    """U-Flow feature extractor + U-shaped flow + likelihood map + NFA segmentation.

    Training mode returns ``(latents, log_jacobian)``; eval mode returns
    ``InferenceBatch(pred_score, pred_label, anomaly_map, pred_mask)`` with the likelihood map of eq. 2, its max,
    the NFA mask (``log10 NFA < log_nfa_threshold``) and ``pred_label = mask has a pixel``. While exporting
    (``torch.compiler.is_exporting()``) the NFA step, which runs in numpy/scikit-image, is left out and
    ``pred_mask`` / ``pred_label`` are ``None``.

    The NFA null per latent scale, ``||z_l||^2 ~ s_l chi2(nu_l)``, is held in the buffers ``null_scale`` /
    ``null_dof`` (saved in checkpoints): ``nfa_null="chi2"`` uses ``s = 1, nu = C_l`` (the paper);
    ``nfa_null="calibrated"`` uses the values set by :meth:`set_calibration` once ``null_calibrated`` is true, and the
    ``chi2`` null before that. ``nfa_scales`` (indices, finest scale first) selects the scales tested; ``nfa_tail``
    the region PFA (``"chernoff"``: the paper's bound; ``"exact"``: the exact chi-square tail).
    """

    def __init__(
        self,
        input_size: tuple[int, int],
        backbone: str = MCAIT,
        layers: Sequence[str] | None = None,
        pre_trained: bool = True,
        backbone_weights: str | Path | Sequence[str | Path] | None = None,
        flow_steps: int = 4,
        affine_clamp: float = 2.0,
        affine_subnet_channels_ratio: float = 1.0,
        permute_soft: bool = False,
        log_nfa_threshold: float = 0.0,
        clamp_chernoff: bool = True,
        nfa_null: str = "chi2",
        nfa_scales: Sequence[int] | None = None,
        nfa_tail: str = "chernoff",
    ) -> None:
        super().__init__()
        if nfa_tail not in NFA_TAILS:
            msg = f"nfa_tail must be one of {tuple(NFA_TAILS)}, got {nfa_tail!r}."
            raise ValueError(msg)
        if nfa_null not in NFA_NULLS:
            msg = f"nfa_null must be one of {NFA_NULLS}, got {nfa_null!r}."
            raise ValueError(msg)
        self.nfa_null = nfa_null
        self.input_size = tuple(int(s) for s in input_size)
        self.feature_extractor: MSCaiTFeatureExtractor | CNNFeatureExtractor
        if backbone == MCAIT:
            if self.input_size != MCAIT_INPUT_SIZE:
                msg = f"MS-CaiT works on {MCAIT_INPUT_SIZE} images (fixed position embeddings); got input size {self.input_size}."
                raise ValueError(msg)
            if isinstance(backbone_weights, (str, Path)):
                msg = "backbone='mcait' takes two weight files (cait_m48_448, cait_s24_224) as a list."
                raise ValueError(msg)
            self.feature_extractor = MSCaiTFeatureExtractor(pre_trained, backbone_weights)
        else:
            if backbone_weights is not None and not isinstance(backbone_weights, (str, Path)):
                msg = f"backbone='{backbone}' takes one weights file, got {backbone_weights}."
                raise ValueError(msg)
            layers = list(layers) if layers is not None else default_cnn_layers(backbone)
            self.feature_extractor = CNNFeatureExtractor(
                backbone, layers, self.input_size, pre_trained, backbone_weights
            )
        channels = self.feature_extractor.channels
        sizes = [(self.input_size[0] // s, self.input_size[1] // s) for s in self.feature_extractor.scale_factors]
        self.flow = build_u_flow(channels, sizes, flow_steps, affine_clamp, affine_subnet_channels_ratio, permute_soft)
        self.latent_shapes = [tuple(int(d) for d in shape) for shape in self.flow.global_out_shapes]
        count = len(self.latent_shapes)
        self.nfa_scales = select_scales(count, nfa_scales)
        latent_channels = torch.tensor([shape[0] for shape in self.latent_shapes], dtype=torch.float64)
        self.register_buffer("null_scale", torch.ones(count, dtype=torch.float64))
        self.register_buffer("null_dof", latent_channels)
        self.register_buffer("null_calibrated", torch.tensor(False))
        self.anomaly_map_generator = AnomalyMapGenerator(self.input_size, log_nfa_threshold, clamp_chernoff, nfa_tail)

    def set_calibration(self, scale: torch.Tensor, dof: torch.Tensor) -> None:
        """Store a calibrated null ``s_l chi2(nu_l)`` per latent scale (used when ``nfa_null="calibrated"``)."""
        self.null_scale.copy_(scale)
        self.null_dof.copy_(dof)
        self.null_calibrated.fill_(True)

    def uses_calibrated_null(self) -> bool:
        return self.nfa_null == "calibrated" and bool(self.null_calibrated)

    def null_table(self) -> torch.Tensor:
        """The null in use, ``[L, 2]`` float64 rows ``(s_l, nu_l)`` (``(1, C_l)`` for the ``chi2`` null; traceable)."""
        channels = self.null_dof.new_tensor([shape[0] for shape in self.latent_shapes])
        chi2 = torch.stack([torch.ones_like(channels), channels], dim=-1)
        if self.nfa_null != "calibrated":
            return chi2
        return torch.where(self.null_calibrated, torch.stack([self.null_scale, self.null_dof], dim=-1), chi2)

    def nfa_null_parameters(self) -> list[tuple[float, float]] | None:
        """``(s_l, nu_l)`` per scale for the NFA, or ``None`` for the paper's ``chi2(C_l)``."""
        if not self.uses_calibrated_null():
            return None
        return [tuple(row) for row in self.null_table().tolist()]

    def encode(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Latents per scale (finest first) and the log-determinant of the flow's Jacobian per image."""
        features = self.feature_extractor(image)
        latents, log_jacobian = self.flow(features)
        if isinstance(latents, torch.Tensor):
            latents = [latents]
        return list(latents), log_jacobian

    def forward(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor] | InferenceBatch:
        latents, log_jacobian = self.encode(image)
        if self.training:
            return latents, log_jacobian
        return self.predict(latents)[0]

    def predict(self, latents: list[torch.Tensor], with_nfa: bool = True) -> tuple[InferenceBatch, torch.Tensor | None]:
        """Eval outputs from latents, plus the ``log10 NFA`` map ``[B, H, W]`` (``None`` while exporting or without NFA)."""
        anomaly_map = self.anomaly_map_generator(latents)
        pred_score = torch.amax(anomaly_map, dim=(-2, -1)).flatten()
        if not with_nfa or torch.compiler.is_exporting():
            return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map), None
        log_nfa, pred_mask = self.anomaly_map_generator.segment(latents, self.nfa_null_parameters(), self.nfa_scales)
        pred_label = pred_mask.flatten(1).any(dim=1)
        return InferenceBatch(
            pred_score=pred_score, pred_label=pred_label, anomaly_map=anomaly_map, pred_mask=pred_mask
        ), log_nfa
