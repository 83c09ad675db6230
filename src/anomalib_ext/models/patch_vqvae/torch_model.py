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
    gather_patches,
    grid_positions,
    interpolate_grid,
    patch_reconstruction_map,
    patch_ssim,
    reflect_pad_for_patches,
    sample_inverse_cdf,
    uniform_draws,
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

    def indices(self, latents: torch.Tensor, max_elements: int = 1 << 22) -> torch.Tensor:
        """``[B, C, H, W] -> [B, H, W]`` nearest code indices, ``argmin_l ||e_l||^2 - 2 <z, e_l>``.

        Positions are taken in chunks whose ``[chunk, K]`` distance matrix holds at most ``max_elements`` values.
        """
        flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        codebook_norm = self.codebook.pow(2).sum(1)
        # An exported graph takes all positions at once (a shape-dependent number of chunks cannot be traced).
        chunk_size = max(1, max_elements // self.num_codes)
        chunks = [flat] if torch.compiler.is_compiling() else flat.split(chunk_size)
        result = torch.cat([torch.addmm(codebook_norm, chunk, self.codebook.T, alpha=-2).argmin(1) for chunk in chunks])
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
    the input is a start token followed by the codes shifted by one). :meth:`restore` runs the same network one
    position at a time with cached keys and values.
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
        self.num_heads = num_heads
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

    def restore(self, codes: torch.Tensor, uniforms: torch.Tensor, threshold: float) -> torch.Tensor:
        """Sequential restoration in one autoregressive sweep (eval mode: dropout is not applied).

        For ``j = 1..L`` in raster order: ``p_j = p(. | z~_1..z~_{j-1})`` conditioned on the *restored* prefix;
        ``z~_j = z_j`` if ``p_j(z_j) >= threshold``, else ``z~_j`` is drawn from ``p_j`` with ``uniforms[:, j]``
        (inverse CDF). Keys and values of the prefix are cached, so the cost is that of one forward pass.
        """
        count, length = codes.shape
        layers = self.blocks.layers
        dim = self.token_embedding.embedding_dim
        heads, head_dim = self.num_heads, dim // self.num_heads
        dtype = self.head.weight.dtype
        cache_shape = (len(layers), count, heads, length, head_dim)
        keys = torch.empty(cache_shape, dtype=dtype, device=codes.device)
        values = torch.empty_like(keys)
        restored = codes.clone()
        token = torch.full_like(codes[:, 0], self.start_token)
        for position in range(length):
            hidden = self.token_embedding(token) + self.position_embedding[0, position]
            for index, layer in enumerate(layers):
                attention = layer.self_attn
                query, key, value = F.linear(
                    layer.norm1(hidden), attention.in_proj_weight, attention.in_proj_bias
                ).chunk(3, dim=-1)
                keys[index, :, :, position] = key.reshape(count, heads, head_dim)
                values[index, :, :, position] = value.reshape(count, heads, head_dim)
                attended = F.scaled_dot_product_attention(
                    query.reshape(count, heads, 1, head_dim),
                    keys[index, :, :, : position + 1],
                    values[index, :, :, : position + 1],
                )
                hidden = hidden + attention.out_proj(attended.reshape(count, dim))
                hidden = hidden + layer.linear2(layer.activation(layer.linear1(layer.norm2(hidden))))
            probabilities = self.head(self.blocks.norm(hidden)).float().softmax(-1)
            current = codes[:, position]
            improbable = probabilities.gather(1, current[:, None])[:, 0] < threshold
            token = torch.where(improbable, sample_inverse_cdf(probabilities, uniforms[:, position]), current)
            restored[:, position] = token
        return restored


class OneClassSVMHead(nn.Module):
    """A fitted RBF one-class SVM kept as buffers and evaluated in torch (so it checkpoints and exports).

    ``f(z) = sum_i alpha_i exp(-gamma ||z - s_i||^2) + b`` with scikit-learn's ``OneClassSVM`` support vectors ``s_i``,
    dual coefficients ``alpha_i``, intercept ``b`` and its own ``gamma`` (paper section 3.2, ``gamma="scale"``:
    ``1 / (var(z) dim(z))``, 1 for zero variance). The anomaly score is ``-f(z)``.
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
        self.set_solution(
            support_vectors=torch.from_numpy(svm.support_vectors_).reshape(-1, *self.latent_shape),
            dual_coef=torch.from_numpy(svm.dual_coef_[0]),
            intercept=torch.as_tensor(float(svm.intercept_[0])),
            gamma=torch.as_tensor(float(svm._gamma)),  # noqa: SLF001  (the value libsvm used, "scale" resolved)
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

    def decision(self, latents: torch.Tensor, dilation: int = 1, max_elements: int | None = None) -> torch.Tensor:
        """Decision values ``f(z)`` of every latent window: ``[B, C, H', W'] -> [B, 1, H, W]``, float32.

        A window is ``latents[:, :, y + dilation*k, x + dilation*l]`` (``k, l < m``); on per-patch latents
        ``[N, C, m, m]`` this is ``[N, 1, 1, 1]``. ``||z - s||^2 = ||z||^2 + ||s||^2 - 2<z, s>`` with ``<z, s>`` a
        dilated convolution; support vectors are taken in chunks of ``max_elements // (B*H*W)`` (``None``: all at
        once, as in an exported graph), so each temporary holds at most ``max(max_elements, B*H*W)`` values. Runs in
        float32 even under autocast; the kernel sum nearly cancels the intercept, so it accumulates in float64 (as
        libsvm does).
        """
        with torch.autocast(latents.device.type, enabled=False):
            latents = latents.float()
            vectors = self.support_vectors
            window = torch.ones(1, *vectors.shape[1:], dtype=latents.dtype, device=latents.device)
            latent_norms = F.conv2d(latents.pow(2), window, dilation=dilation)  # [B, 1, H, W]
            batch, _, height, width = latent_norms.shape
            chunk = vectors.shape[0] if max_elements is None else max(1, max_elements // (batch * height * width))
            decision = self.intercept.double().expand(batch, 1, height * width).clone()
            for chunk_vectors, coefs in zip(vectors.split(chunk), self.dual_coef.split(chunk), strict=True):
                kernel = F.conv2d(latents, chunk_vectors, dilation=dilation)  # <z, s>, then in place to exp(-g d^2)
                kernel.mul_(-2).add_(latent_norms).add_(chunk_vectors.pow(2).sum((1, 2, 3))[:, None, None])
                kernel.clamp_min_(0).mul_(-self.gamma).exp_()
                decision += coefs.double()[None, None] @ kernel.flatten(2).double()
            return decision.reshape(batch, 1, height, width).float()

    def decision_function(self, latents: torch.Tensor) -> torch.Tensor:
        """``[N, C, m, m] -> [N]`` decision values (positive inside the support of normal latents)."""
        return self.decision(latents).flatten()

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
        restoration_mode: ``"sequential"`` (each conditional sees the restored prefix; one cached sweep, faithful)
            or ``"single_pass"`` (all improbable codes resampled from the teacher-forced conditionals of the input).
        restoration_stride: restoration is evaluated on a grid of patch centres with this stride, then interpolated.
        restoration_seed: seed of the resampling (identical maps across calls, batches, devices and reloads).
        restoration_chunk_size: patches restored at once (memory: the key/value cache holds
            ``2 * prior_layers * chunk * 289 * prior_dim`` values).
        ssim_data_range: dynamic range of the images for SSIM's constants (1.0 for the default [0, 1] input).
        chunk_elements: OC-SVM dense map: at most this many values per temporary (support-vector chunks are sized
            from ``B * H * W``).
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
        restoration_chunk_size: int = 128,
        ssim_data_range: float = 1.0,
        chunk_elements: int = 1 << 22,
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
        if min(restoration_stride, restoration_chunk_size, chunk_elements) < 1:
            msg = "restoration_stride, restoration_chunk_size and chunk_elements must be positive."
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
        self.restoration_chunk_size = restoration_chunk_size
        self.ssim_data_range = ssim_data_range
        self.chunk_elements = chunk_elements
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
    def random_patches(self, images: torch.Tensor, patches_per_image: int) -> torch.Tensor:
        """``[B, 3, H, W] -> [B * n, 3, P, P]`` patches at uniformly random positions (paper: 1000 per image)."""
        batch, _, height, width = images.shape
        if min(height, width) < self.patch_size:
            msg = (
                f"Training images must be at least {self.patch_size} x {self.patch_size} pixels (the patch size), got "
                f"{height} x {width}: resize them larger in the pre-processor or lower patch_size."
            )
            raise ValueError(msg)
        tops = torch.randint(0, height - self.patch_size + 1, (batch * patches_per_image,), device=images.device)
        lefts = torch.randint(0, width - self.patch_size + 1, (batch * patches_per_image,), device=images.device)
        image = torch.arange(batch, device=images.device).repeat_interleave(patches_per_image)
        return gather_patches(images, image, tops, lefts, self.patch_size).contiguous()

    def quantize(self, latents: torch.Tensor) -> torch.Tensor:
        """Nearest-code replacement (no gradient bookkeeping), identity for the continuous AE."""
        if self.quantizer is None:
            return latents
        return self.quantizer.embed(self.quantizer.indices(latents))

    def reconstruct(
        self, patches: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Training pass: ``(x_hat, codebook loss, commitment loss, code indices)`` (AE: zero losses, no indices)."""
        latents = self.encoder(patches)
        if self.quantizer is None:
            zero = latents.new_zeros(())
            return self.decoder(latents), zero, zero, None
        quantised, indices, codebook_loss, commitment_loss = self.quantizer(latents)
        return self.decoder(quantised), codebook_loss, commitment_loss, indices

    def patch_latents(self, patches: torch.Tensor) -> torch.Tensor:
        """Latents the OC-SVM sees: ``E(x)`` (AE) or its quantisation ``z_q`` (VQ-VAE)."""
        return self.quantize(self.encoder(patches))

    def patch_codes(self, patches: torch.Tensor) -> torch.Tensor:
        """``[N, 3, P, P] -> [N, m*m]`` code indices in raster order (the prior's sequences)."""
        return self.quantizer.indices(self.encoder(patches)).flatten(1)

    # ------------------------------------------------------------------------------------------------- restoration
    def restore_codes(self, codes: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """Resample the codes whose prior probability is below tau (paper section 2.2, "erreur de restauration").

        ``uniforms`` (``[N, m*m]``, in (0, 1)) drive the draws (inverse CDF), one number per position.
        ``sequential``: ``z~_j = z_j`` if ``p(z_j | z~_1..z~_{j-1}) >= tau``, else a draw from that conditional, i.e.
        every conditional sees the already restored prefix (:meth:`CodePrior.restore`, one cached sweep).
        ``single_pass``: every code with ``p(z_j | z_1..z_{j-1}) < tau`` (teacher forcing on the input codes) is
        replaced by a draw from that conditional.
        """
        if self.restoration_mode == "sequential":
            return self.prior.restore(codes, uniforms, self.restoration_threshold)
        probabilities = self.prior(codes).float().softmax(-1)
        improbable = probabilities.gather(-1, codes[..., None])[..., 0] < self.restoration_threshold
        draws = sample_inverse_cdf(probabilities.flatten(0, 1), uniforms.flatten()).reshape(codes.shape)
        return torch.where(improbable, draws, codes)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``[N, m*m]`` code indices -> ``[N, 3, P, P]`` decoded patches."""
        grid = codes.reshape(-1, self.latent_size, self.latent_size)
        return self.decoder(self.quantizer.embed(grid))

    def restoration_scores(self, patches: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``1 - SSIM(x, D(z~_q))`` of ``[N, 3, P, P]`` patches; ``keys`` identify each patch's random numbers."""
        codes = self.patch_codes(patches)
        uniforms = uniform_draws(self.restoration_seed, keys, codes.shape[1])
        restored = self.decode_codes(self.restore_codes(codes, uniforms))
        return 1 - patch_ssim(patches, restored, self.ssim_data_range)

    def restoration_map(self, images: torch.Tensor) -> torch.Tensor:
        """Restoration scores on a stride-``restoration_stride`` grid of centres, interpolated to ``[B, 1, H, W]``.

        Patches are gathered, encoded and restored ``restoration_chunk_size`` at a time. The random numbers of a
        patch depend only on ``restoration_seed`` and its centre ``(y, x)``, so an image's map does not depend on its
        batch neighbours, the batch size, the chunking or how the data is sharded.
        """
        if self.restoration_mode == "sequential" and torch.compiler.is_compiling():
            msg = "Restoration cannot be compiled or exported (data-dependent sampling loop)."
            raise RuntimeError(msg)
        batch, _, height, width = images.shape
        padded = reflect_pad_for_patches(images, self.patch_size)
        rows = grid_positions(height, self.restoration_stride, images.device)
        cols = grid_positions(width, self.restoration_stride, images.device)
        row_index = rows.repeat_interleave(cols.numel()).repeat(batch)
        col_index = cols.repeat(rows.numel() * batch)
        image_index = torch.arange(batch, device=images.device).repeat_interleave(rows.numel() * cols.numel())
        scores = torch.cat(
            [
                self.restoration_scores(
                    gather_patches(padded, image_chunk, row_chunk, col_chunk, self.patch_size),
                    row_chunk * width + col_chunk,
                )
                for image_chunk, row_chunk, col_chunk in zip(
                    image_index.split(self.restoration_chunk_size),
                    row_index.split(self.restoration_chunk_size),
                    col_index.split(self.restoration_chunk_size),
                    strict=True,
                )
            ]
        )
        return interpolate_grid(scores.reshape(batch, rows.numel(), cols.numel()), rows, cols, (height, width))

    # ------------------------------------------------------------------------------------------------------ scoring
    def anomaly_map(self, images: torch.Tensor, scorer: str | None = None) -> torch.Tensor:
        """Dense ``[B, 1, H, W]`` anomaly map of ``images`` (any size) with ``scorer`` (default: this model's).

        Raises:
            RuntimeError: in training mode (BatchNorm would use batch statistics and the prior dropout), or for the
                ``ocsvm`` scorer before the SVM is fitted.
        """
        scorer = scorer or self.scorer
        if any(module.training for module in self.modules()):
            msg = "Dense anomaly maps need eval mode (BatchNorm running statistics, no dropout): call .eval() first."
            raise RuntimeError(msg)
        if scorer == "restoration":
            return self.restoration_map(images)
        if scorer == "ocsvm" and (self.ocsvm is None or not self.ocsvm.is_fitted):
            msg = "The one-class SVM is not fitted yet (it is fitted in the last epoch of `fit`)."
            raise RuntimeError(msg)
        latents = self.quantize(self.encoder.dense(reflect_pad_for_patches(images, self.patch_size)))
        if scorer == "ocsvm":
            max_elements = None if torch.compiler.is_compiling() else self.chunk_elements
            return -self.ocsvm.decision(latents, self.encoder.total_stride, max_elements)
        reconstruction = centre_pixel_reconstruction(
            self.decoder, latents, self.patch_size, self.latent_size, self.encoder.total_stride, images.shape[-2:]
        )
        return patch_reconstruction_map(images, reconstruction)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...] | InferenceBatch:
        """Training: ``reconstruct`` of patches. Eval: ``InferenceBatch`` of images."""
        if self.training:
            return self.reconstruct(images)
        anomaly_map = self.anomaly_map(images)
        return InferenceBatch(pred_score=anomaly_map.flatten(1).amax(1), anomaly_map=anomaly_map)
