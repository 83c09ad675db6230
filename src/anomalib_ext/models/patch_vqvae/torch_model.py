"""Patch auto-encoders (continuous and vector-quantised), the code-index prior and the one-class SVM head.

Pinon, Trombetta, Lartizien: "Détection d'anomalies dans l'espace image ou l'espace latent d'auto-encodeurs par patch
pour l'analyse d'images industrielles", GRETSI 2023 (section 3.2 for the architecture).

Every module here works on single patches (training) *and* densely on whole images (inference): the encoder has only
valid convolutions, so running it with stride 1 and dilations equal to the accumulated stride (the "à trous" form) gives,
at every pixel, the latent of the patch whose top-left corner is that pixel. See :mod:`.anomaly_map` for the dense
scorers built on top.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from torch import nn

from .anomaly_map import (
    centre_pixel_reconstruction,
    dense_restoration_map,
    ocsvm_decision_map,
    patch_reconstruction_map,
    reflect_pad_for_patches,
)

__all__ = [
    "SCORERS",
    "CodePrior",
    "OneClassSVMHead",
    "PatchAutoencoderModel",
    "PatchDecoder",
    "PatchEncoder",
    "VectorQuantizer",
    "check_patch_geometry",
]

PAPER_KERNEL_SIZES = (5, 3, 3, 3)
PAPER_STRIDES = (1, 1, 3, 1)
PAPER_CHANNELS = (3, 4, 12, 16)
PAPER_PATCH_SIZE = 63
SCORERS = ("reconstruction", "ocsvm", "restoration")


def _conv_output_size(size: int, kernel_sizes: Sequence[int], strides: Sequence[int]) -> int:
    for kernel, stride in zip(kernel_sizes, strides, strict=True):
        size = (size - kernel) // stride + 1
    return size


def centre_dependency(patch_size: int, kernel_sizes: Sequence[int], strides: Sequence[int]) -> tuple[int, int]:
    """Latent index range ``[first, last]`` (per axis) that the decoded centre pixel of a patch depends on.

    A transposed convolution output ``o`` reads the inputs ``i`` with ``0 <= o - stride * i < kernel``; walking the
    decoder backwards from the centre pixel gives the range (paper geometry: latent rows/columns 6..10, a 5 x 5 block).
    """
    first = last = patch_size // 2
    # Walking back from the output, the decoder's last layer mirrors the encoder's first one.
    for kernel, stride in zip(kernel_sizes, strides, strict=True):
        first, last = math.ceil((first - kernel + 1) / stride), last // stride
    return first, last


def check_patch_geometry(patch_size: int, kernel_sizes: Sequence[int], strides: Sequence[int]) -> int:
    """Validate that patches of ``patch_size`` encode without remainder and decode back exactly; returns the latent size.

    Raises:
        ValueError: for an even patch size, a size that the strided convolutions do not tile exactly, or one whose
            centre pixel would depend on latents outside the patch's own latent window.
    """
    if patch_size % 2 == 0:
        msg = f"patch_size must be odd (a patch has a centre pixel), got {patch_size}."
        raise ValueError(msg)
    latent_size = _conv_output_size(patch_size, kernel_sizes, strides)
    size = latent_size
    for kernel, stride in zip(reversed(kernel_sizes), reversed(strides), strict=True):
        size = (size - 1) * stride + kernel
    first, last = centre_dependency(patch_size, kernel_sizes, strides)
    if latent_size < 1 or size != patch_size or first < 0 or last >= latent_size:
        msg = (
            f"patch_size={patch_size} does not fit kernels {tuple(kernel_sizes)} / strides {tuple(strides)}: the decoder "
            f"must give back exactly the patch and its centre pixel must depend only on the patch's latents "
            f"(paper: 63; with the paper's layers any 27 + 6k works)."
        )
        raise ValueError(msg)
    return latent_size


class PatchEncoder(nn.Module):
    """Paper encoder: conv blocks without padding, each ``Conv -> GELU -> BatchNorm`` (section 3.2)."""

    def __init__(self, kernel_sizes: Sequence[int], strides: Sequence[int], channels: Sequence[int]) -> None:
        super().__init__()
        self.strides = tuple(strides)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        in_channels = 3
        for kernel, stride, out_channels in zip(kernel_sizes, strides, channels, strict=True):
            self.convs.append(nn.Conv2d(in_channels, out_channels, kernel, stride=stride))
            self.norms.append(nn.BatchNorm2d(out_channels))
            in_channels = out_channels

    @property
    def total_stride(self) -> int:
        return math.prod(self.strides)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """``[N, 3, P, P] -> [N, C, m, m]`` latents ``z = E(x)``."""
        for conv, norm in zip(self.convs, self.norms, strict=True):
            patches = norm(F.gelu(conv(patches)))
        return patches

    def dense(self, image: torch.Tensor) -> torch.Tensor:
        """À-trous form: ``[B, 3, H, W] -> [B, C, H', W']`` with ``dense[..., t + S*k, u + S*l] = E(patch at (t, u))[k, l]``.

        Every convolution runs with stride 1 and dilation equal to the product of the strides before it, so a single
        pass gives the latents of all patches, at every stride-1 offset (exact in eval mode: BatchNorm is affine).
        """
        dilation = 1
        for conv, norm in zip(self.convs, self.norms, strict=True):
            image = norm(F.gelu(F.conv2d(image, conv.weight, conv.bias, stride=1, dilation=dilation)))
            dilation *= conv.stride[0]
        return image


class PatchDecoder(nn.Module):
    """The encoder's mirror: transposed convolutions, ``GELU -> BatchNorm`` after all but the last (linear output)."""

    def __init__(self, kernel_sizes: Sequence[int], strides: Sequence[int], channels: Sequence[int]) -> None:
        super().__init__()
        in_channels = list(reversed(channels))
        out_channels = [*list(reversed(channels))[1:], 3]
        self.convs = nn.ModuleList(
            nn.ConvTranspose2d(c_in, c_out, kernel, stride=stride)
            for c_in, c_out, kernel, stride in zip(
                in_channels, out_channels, reversed(kernel_sizes), reversed(strides), strict=True
            )
        )
        self.norms = nn.ModuleList(nn.BatchNorm2d(c_out) for c_out in out_channels[:-1])

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """``x_hat = D(z)``; on a whole latent map it decodes every stride-``S`` patch at once (see anomaly_map)."""
        for conv, norm in zip(self.convs[:-1], self.norms, strict=True):
            latents = norm(F.gelu(conv(latents)))
        return self.convs[-1](latents)


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation (van den Oord et al. 2017) with straight-through gradients.

    ``z_q^j = e^k, k = argmin_l ||z^j - e^l||^2``; the codebook and commitment terms of the paper's discrete loss are
    returned by :meth:`forward` (``||sg[z] - z_q||^2`` and ``||z - sg[z_q]||^2``, means over elements).
    """

    def __init__(self, num_codes: int, code_dim: int) -> None:
        super().__init__()
        # Unit-variance init matches the BatchNorm-ed latents, so every code starts inside the data (fewer dead codes).
        self.codebook = nn.Parameter(torch.randn(num_codes, code_dim))

    @property
    def num_codes(self) -> int:
        return self.codebook.shape[0]

    def indices(self, latents: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
        """``[B, C, H, W] -> [B, H, W]`` nearest code indices (chunked over positions)."""
        flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        codebook_norm = self.codebook.pow(2).sum(1)
        result = torch.cat([
            (codebook_norm - 2 * chunk @ self.codebook.T).argmin(1) for chunk in flat.split(chunk_size)
        ]) if flat.numel() else flat.new_zeros(0, dtype=torch.long)
        return result.reshape(latents.shape[0], *latents.shape[2:])

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """``[B, H, W]`` indices -> ``[B, C, H, W]`` code vectors."""
        return self.codebook[indices].permute(0, 3, 1, 2)

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(z_q with straight-through gradient, indices, codebook loss, commitment loss)``."""
        indices = self.indices(latents)
        quantised = self.embed(indices)
        codebook_loss = F.mse_loss(quantised, latents.detach())
        commitment_loss = F.mse_loss(latents, quantised.detach())
        straight_through = latents + (quantised - latents).detach()
        return straight_through, indices, codebook_loss, commitment_loss


class CodePrior(nn.Module):
    """Autoregressive Transformer decoder over a patch's code indices in raster order (paper: 8 blocks, 8 heads,
    d = 256, feed-forward 512, causal).

    ``forward(codes)`` gives the logits of ``p(z_q^j | z_q^1..z_q^{j-1})`` for every position ``j`` (teacher forcing:
    the input is a start token followed by the codes shifted by one).
    """

    def __init__(
        self,
        num_codes: int,
        sequence_length: int,
        dim: int = 256,
        num_layers: int = 8,
        num_heads: int = 8,
        feedforward_dim: int = 512,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.start_token = num_codes
        self.token_embedding = nn.Embedding(num_codes + 1, dim)
        self.position_embedding = nn.Parameter(torch.zeros(1, sequence_length, dim))
        nn.init.normal_(self.position_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim, num_heads, feedforward_dim, dropout=dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_codes)
        self.register_buffer(
            "causal_mask", nn.Transformer.generate_square_subsequent_mask(sequence_length), persistent=False
        )

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """``[N, L]`` code indices -> ``[N, L, K]`` next-code logits."""
        inputs = torch.cat([torch.full_like(codes[:, :1], self.start_token), codes[:, :-1]], dim=1)
        hidden = self.token_embedding(inputs) + self.position_embedding[:, : codes.shape[1]]
        length = codes.shape[1]
        hidden = self.blocks(hidden, mask=self.causal_mask[:length, :length], is_causal=True)
        return self.head(hidden)


class OneClassSVMHead(nn.Module):
    """A fitted RBF one-class SVM kept as buffers and evaluated in torch (so it checkpoints and exports).

    ``f(z) = sum_i alpha_i exp(-gamma ||z - s_i||^2) + b`` with sklearn's ``OneClassSVM`` support vectors ``s_i``, dual
    coefficients ``alpha_i`` and intercept ``b``; ``gamma = 1 / (var(z) dim(z))`` (paper section 3.2, ``gamma="scale"``).
    The anomaly score is ``-f(z)``.
    """

    def __init__(self, latent_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.latent_shape = latent_shape
        self.register_buffer("support_vectors", torch.zeros(0, *latent_shape))
        self.register_buffer("dual_coef", torch.zeros(0))
        self.register_buffer("intercept", torch.zeros(()))
        self.register_buffer("gamma", torch.zeros(()))

    @property
    def is_fitted(self) -> bool:
        return self.support_vectors.shape[0] > 0

    def fit(self, latents: torch.Tensor, nu: float = 0.03) -> None:
        """Fit on ``[N, C, m, m]`` training latents with scikit-learn (libsvm) and store the solution."""
        from sklearn.svm import OneClassSVM  # noqa: PLC0415

        features = latents.detach().reshape(latents.shape[0], -1).double().cpu().numpy()
        svm = OneClassSVM(kernel="rbf", nu=nu, gamma="scale").fit(features)
        gamma = 1.0 / (features.shape[1] * features.var())
        self.set_solution(
            support_vectors=torch.from_numpy(svm.support_vectors_).reshape(-1, *self.latent_shape),
            dual_coef=torch.from_numpy(svm.dual_coef_[0]),
            intercept=torch.as_tensor(float(svm.intercept_[0])),
            gamma=torch.as_tensor(float(gamma)),
        )

    def set_solution(
        self, support_vectors: torch.Tensor, dual_coef: torch.Tensor, intercept: torch.Tensor, gamma: torch.Tensor
    ) -> None:
        device = self.gamma.device
        self.support_vectors = support_vectors.float().to(device)
        self.dual_coef = dual_coef.float().to(device)
        self.intercept = intercept.float().to(device)
        self.gamma = gamma.float().to(device)

    def solution(self) -> dict[str, torch.Tensor]:
        return {
            "support_vectors": self.support_vectors,
            "dual_coef": self.dual_coef,
            "intercept": self.intercept,
            "gamma": self.gamma,
        }

    def decision_function(self, latents: torch.Tensor) -> torch.Tensor:
        """``[N, C, m, m] -> [N]`` decision values ``f(z)`` (positive inside the support of normal latents)."""
        flat = latents.reshape(latents.shape[0], -1)
        vectors = self.support_vectors.reshape(self.support_vectors.shape[0], -1)
        squared = torch.cdist(flat, vectors).pow(2)
        # The kernel sum nearly cancels the intercept: accumulate in float64 (as libsvm does).
        kernel = torch.exp(-self.gamma * squared).double()
        return (kernel @ self.dual_coef.double() + self.intercept.double()).to(latents.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        # The number of support vectors is only known after the fit: take the stored shapes before copying.
        for name in ("support_vectors", "dual_coef"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.gamma.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PatchAutoencoderModel(nn.Module):
    """Patch AE or VQ-VAE with its scorers (paper Table 1).

    Args:
        quantized: VQ-VAE (``True``) or continuous AE.
        scorer: ``"reconstruction"`` (squared error of the centre pixel), ``"ocsvm"`` (one-class SVM on the patch
            latents, quantised ones for the VQ-VAE) or ``"restoration"`` (VQ-VAE only: ``1 - SSIM(x, D(z~_q))``).
        patch_size: square patch side (paper: 63).
        kernel_sizes, strides, channels: encoder layers (paper: 5-3-3-3, 1-1-3-1, 3-4-12-16); the decoder mirrors them.
        num_codes: codebook size K (paper: 1024).
        prior_dim, prior_layers, prior_heads, prior_feedforward, prior_dropout: the code prior (paper: 256, 8, 8, 512).
        restoration_threshold: resample codes with prior probability below tau (paper: 0.05).
        restoration_mode: ``"sequential"`` (re-condition on the restored prefix after every resampled code, faithful)
            or ``"single_pass"`` (resample all improbable codes from one teacher-forced pass, cheaper).
        restoration_stride: restoration is evaluated on a grid of patch centres with this stride, then interpolated.
        restoration_seed: seed of the resampling generator (identical maps across calls and checkpoint reloads).
        ssim_data_range: dynamic range of the images for SSIM's constants (1.0 for the default [0, 1] input).
        chunk_size: patches (restoration) / support vectors (OC-SVM) scored at once.
    """

    def __init__(
        self,
        quantized: bool,
        scorer: str = "reconstruction",
        patch_size: int = PAPER_PATCH_SIZE,
        kernel_sizes: Sequence[int] = PAPER_KERNEL_SIZES,
        strides: Sequence[int] = PAPER_STRIDES,
        channels: Sequence[int] = PAPER_CHANNELS,
        num_codes: int = 1024,
        prior_dim: int = 256,
        prior_layers: int = 8,
        prior_heads: int = 8,
        prior_feedforward: int = 512,
        prior_dropout: float = 0.1,
        restoration_threshold: float = 0.05,
        restoration_mode: str = "sequential",
        restoration_stride: int = 8,
        restoration_seed: int = 0,
        ssim_data_range: float = 1.0,
        chunk_size: int = 256,
    ) -> None:
        super().__init__()
        if scorer not in SCORERS:
            msg = f"Unknown scorer {scorer!r}; choose one of {SCORERS}."
            raise ValueError(msg)
        if scorer == "restoration" and not quantized:
            msg = "The restoration scorer needs the discrete latent space: use PatchVQVAE, not PatchAE."
            raise ValueError(msg)
        if restoration_mode not in {"sequential", "single_pass"}:
            msg = f"restoration_mode must be 'sequential' or 'single_pass', got {restoration_mode!r}."
            raise ValueError(msg)
        if not 0.0 < restoration_threshold < 1.0:
            msg = f"restoration_threshold must lie in (0, 1), got {restoration_threshold}."
            raise ValueError(msg)
        if restoration_stride < 1 or chunk_size < 1:
            msg = "restoration_stride and chunk_size must be positive."
            raise ValueError(msg)
        if len({len(kernel_sizes), len(strides), len(channels)}) != 1:
            msg = "kernel_sizes, strides and channels must have the same length (one entry per encoder block)."
            raise ValueError(msg)
        self.latent_size = check_patch_geometry(patch_size, kernel_sizes, strides)
        self.patch_size = patch_size
        self.quantized = quantized
        self.scorer = scorer
        self.restoration_threshold = restoration_threshold
        self.restoration_mode = restoration_mode
        self.restoration_stride = restoration_stride
        self.restoration_seed = restoration_seed
        self.ssim_data_range = ssim_data_range
        self.chunk_size = chunk_size
        self.encoder = PatchEncoder(kernel_sizes, strides, channels)
        self.decoder = PatchDecoder(kernel_sizes, strides, channels)
        latent_shape = (channels[-1], self.latent_size, self.latent_size)
        self.quantizer = VectorQuantizer(num_codes, channels[-1]) if quantized else None
        self.prior = (
            CodePrior(
                num_codes,
                self.latent_size**2,
                dim=prior_dim,
                num_layers=prior_layers,
                num_heads=prior_heads,
                feedforward_dim=prior_feedforward,
                dropout=prior_dropout,
            )
            if quantized and scorer == "restoration"
            else None
        )
        self.ocsvm = OneClassSVMHead(latent_shape) if scorer == "ocsvm" else None

    # ----------------------------------------------------------------------------------------------------- patches
    def check_image_size(self, height: int, width: int) -> None:
        if min(height, width) < self.patch_size:
            msg = (
                f"Images must be at least {self.patch_size} x {self.patch_size} pixels (the patch size), got "
                f"{height} x {width}: resize them larger in the pre-processor or lower patch_size."
            )
            raise ValueError(msg)

    def random_patches(self, images: torch.Tensor, patches_per_image: int) -> torch.Tensor:
        """``[B, 3, H, W] -> [B * n, 3, P, P]`` patches at uniformly random positions (paper: 1000 per image)."""
        batch, channels, height, width = images.shape
        self.check_image_size(height, width)
        size = self.patch_size
        tops = torch.randint(0, height - size + 1, (batch, patches_per_image), device=images.device)
        lefts = torch.randint(0, width - size + 1, (batch, patches_per_image), device=images.device)
        offsets = torch.arange(size, device=images.device)
        rows = (tops[..., None] + offsets)[..., :, None]  # [B, n, P, 1]
        cols = (lefts[..., None] + offsets)[..., None, :]  # [B, n, 1, P]
        batch_index = torch.arange(batch, device=images.device)[:, None, None, None]
        patches = images.permute(0, 2, 3, 1)[batch_index, rows, cols]  # [B, n, P, P, C]
        return patches.reshape(-1, size, size, channels).permute(0, 3, 1, 2).contiguous()

    def quantize(self, latents: torch.Tensor) -> torch.Tensor:
        """Nearest-code replacement (no gradient bookkeeping), identity for the continuous AE."""
        if self.quantizer is None:
            return latents
        return self.quantizer.embed(self.quantizer.indices(latents))

    def reconstruct(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: ``(x_hat, codebook loss, commitment loss)`` (losses are 0 for the continuous AE)."""
        latents = self.encoder(patches)
        if self.quantizer is None:
            zero = latents.new_zeros(())
            return self.decoder(latents), zero, zero
        quantised, _, codebook_loss, commitment_loss = self.quantizer(latents)
        return self.decoder(quantised), codebook_loss, commitment_loss

    def patch_latents(self, patches: torch.Tensor) -> torch.Tensor:
        """Latents the OC-SVM sees: ``E(x)`` (AE) or its quantisation ``z_q`` (VQ-VAE)."""
        return self.quantize(self.encoder(patches))

    def patch_codes(self, patches: torch.Tensor) -> torch.Tensor:
        """``[N, 3, P, P] -> [N, m*m]`` code indices in raster order (the prior's sequences)."""
        return self.quantizer.indices(self.encoder(patches)).flatten(1)

    # ------------------------------------------------------------------------------------------------- restoration
    def restore_codes(self, codes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Resample the codes whose prior probability is below tau (paper section 2.2, "erreur de restauration").

        ``sequential``: walk the sequence in raster order; at the first remaining position whose code has probability
        ``< tau`` given the (already restored) prefix, draw a new code from that conditional, then recompute the
        conditionals after it. Patches are processed together; each pass re-runs the causal prior only on patches that
        still have an improbable code. ``single_pass``: every improbable code is drawn from the teacher-forced
        conditionals of the original sequence.
        """
        codes = codes.clone()
        resume_from = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
        active = torch.arange(codes.shape[0], device=codes.device)
        positions = torch.arange(codes.shape[1], device=codes.device)
        while active.numel():
            probabilities = self.prior(codes[active]).softmax(-1)
            observed = probabilities.gather(-1, codes[active, :, None])[..., 0]
            improbable = (observed < self.restoration_threshold) & (positions >= resume_from[active, None])
            if self.restoration_mode == "single_pass":
                rows, cols = improbable.nonzero(as_tuple=True)
                if rows.numel():
                    draws = torch.multinomial(probabilities[rows, cols], 1, generator=generator)[:, 0]
                    codes[active[rows], cols] = draws
                break
            has_improbable = improbable.any(1)
            if not has_improbable.any():
                break
            rows = has_improbable.nonzero()[:, 0]
            first = improbable[rows].float().argmax(1)
            draws = torch.multinomial(probabilities[rows, first], 1, generator=generator)[:, 0]
            codes[active[rows], first] = draws
            resume_from[active[rows]] = first + 1
            active = active[rows]
        return codes

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``[N, m*m]`` code indices -> ``[N, 3, P, P]`` decoded patches."""
        grid = codes.reshape(-1, self.latent_size, self.latent_size)
        return self.decoder(self.quantizer.embed(grid))

    # ------------------------------------------------------------------------------------------------------ scoring
    def anomaly_map(self, images: torch.Tensor, scorer: str | None = None) -> torch.Tensor:
        """Dense ``[B, 1, H, W]`` anomaly map of ``images`` with ``scorer`` (default: this model's)."""
        scorer = scorer or self.scorer
        self.check_image_size(*images.shape[-2:])
        padded = reflect_pad_for_patches(images, self.patch_size)
        if scorer == "restoration":
            generator = None
            if not torch.compiler.is_compiling():
                generator = torch.Generator(device=images.device).manual_seed(self.restoration_seed)
            return dense_restoration_map(self, images, padded, generator)
        latents = self.encoder.dense(padded)
        if scorer == "ocsvm":
            if self.ocsvm is None or not self.ocsvm.is_fitted:
                msg = "The one-class SVM is not fitted yet (it is fitted in the last epoch of `fit`)."
                raise RuntimeError(msg)
            return -ocsvm_decision_map(self.quantize(latents), self.ocsvm, self.encoder.total_stride, self.chunk_size)
        reconstruction = centre_pixel_reconstruction(self.decoder, self.quantize(latents), self.patch_size,
                                                     self.encoder.total_stride, images.shape[-2:])
        return patch_reconstruction_map(images, reconstruction)

    def forward(self, images: torch.Tensor) -> torch.Tensor | InferenceBatch:
        """Training: ``(x_hat, codebook loss, commitment loss)`` of patches. Eval: ``InferenceBatch`` of images."""
        if self.training:
            return self.reconstruct(images)
        anomaly_map = self.anomaly_map(images)
        return InferenceBatch(pred_score=anomaly_map.flatten(1).amax(1), anomaly_map=anomaly_map)

