"""Dense anomaly maps of the patch auto-encoders without one forward pass per pixel.

The score of a pixel is the score of the patch centred on it (paper section 2.2). With the image reflect-padded by
``P // 2`` on every side, the patch centred on image pixel ``(y, x)`` has its top-left corner at padded ``(y, x)``, and
:meth:`PatchEncoder.dense` gives its latent as the window ``dense[..., y + S*k, x + S*l]`` (``S`` = total encoder stride).

* Reconstruction: the decoded centre pixel depends only on a small block of the patch's latent (5 x 5 for the paper's
  layers), so decoding the whole stride-``S`` latent map of each of the ``S^2`` offsets gives every patch's exact centre
  pixel at once (transposed convolutions are translation-equivariant with step ``S``).
* One-class SVM: ``||z - s||^2 = ||z||^2 + ||s||^2 - 2 <z, s>`` where ``<z, s>`` for all patches is a convolution of the
  dense latent map with the support vector as a kernel dilated by ``S`` (chunked over support vectors).
* Restoration: per patch (the prior is causal with absolute positions), evaluated on a stride-``s`` grid of centres,
  batched in chunks, and linearly interpolated back to full resolution.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812

if TYPE_CHECKING:
    from torch import nn

    from .torch_model import OneClassSVMHead, PatchAutoencoderModel

__all__ = [
    "centre_pixel_reconstruction",
    "dense_restoration_map",
    "grid_positions",
    "linear_interpolation_matrix",
    "ocsvm_decision_map",
    "patch_reconstruction_map",
    "patch_ssim",
    "reflect_pad_for_patches",
]


def reflect_pad_for_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Reflect-pad by ``patch_size // 2`` so that every image pixel is the centre of one full patch."""
    half = patch_size // 2
    return F.pad(images, (half, half, half, half), mode="reflect")


def centre_pixel_reconstruction(
    decoder: nn.Module, dense_latents: torch.Tensor, patch_size: int, stride: int, image_size: tuple[int, int]
) -> torch.Tensor:
    """Decoded centre pixels ``[B, 3, H, W]`` of all patches from the dense latent map (exact, see module docstring)."""
    height, width = image_size
    latent_size = (dense_latents.shape[-1] - width) // stride + 1
    centre = patch_size // 2
    result = dense_latents.new_empty(dense_latents.shape[0], 3, height, width)
    for row_offset in range(min(stride, height)):
        rows = -(-(height - row_offset) // stride)
        for col_offset in range(min(stride, width)):
            cols = -(-(width - col_offset) // stride)
            latents = dense_latents[
                ..., row_offset::stride, col_offset::stride
            ][..., : rows + latent_size - 1, : cols + latent_size - 1]
            decoded = decoder(latents)
            result[..., row_offset::stride, col_offset::stride] = decoded[
                ..., centre::stride, centre::stride
            ][..., :rows, :cols]
    return result


def patch_reconstruction_map(images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Squared error of each patch's centre pixel, summed over colour channels: ``[B, 1, H, W]``."""
    return (images - reconstruction).pow(2).sum(1, keepdim=True)


def ocsvm_decision_map(
    dense_latents: torch.Tensor, svm: OneClassSVMHead, stride: int, chunk_size: int
) -> torch.Tensor:
    """One-class SVM decision value ``f(z)`` of every patch latent, ``[B, 1, H, W]`` (chunked over support vectors)."""
    support_vectors = svm.support_vectors
    window = torch.ones(1, *support_vectors.shape[1:], dtype=dense_latents.dtype, device=dense_latents.device)
    latent_norms = F.conv2d(dense_latents.pow(2), window, dilation=stride)
    # The kernel sum nearly cancels the intercept: accumulate in float64 (as libsvm does).
    decision = latent_norms.double() * 0 + svm.intercept.double()
    for vectors, coefs in zip(support_vectors.split(chunk_size), svm.dual_coef.split(chunk_size), strict=True):
        products = F.conv2d(dense_latents, vectors, dilation=stride)
        squared = (latent_norms + vectors.pow(2).sum((1, 2, 3))[:, None, None] - 2 * products).clamp_min(0)
        kernel = torch.exp(-svm.gamma * squared).double()
        decision = decision + torch.einsum("bkhw,k->bhw", kernel, coefs.double())[:, None]
    return decision.to(dense_latents.dtype)


def patch_ssim(first: torch.Tensor, second: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM (Wang et al. 2004) of each patch pair with a uniform window as large as the patch: ``[N]``.

    The paper uses a 63 x 63 window on 63 x 63 patches, i.e. one window per patch; channels are averaged.
    """
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mean_first, mean_second = first.mean((-2, -1)), second.mean((-2, -1))
    centred_first = first - mean_first[..., None, None]
    centred_second = second - mean_second[..., None, None]
    var_first, var_second = centred_first.pow(2).mean((-2, -1)), centred_second.pow(2).mean((-2, -1))
    covariance = (centred_first * centred_second).mean((-2, -1))
    ssim = ((2 * mean_first * mean_second + c1) * (2 * covariance + c2)) / (
        (mean_first.pow(2) + mean_second.pow(2) + c1) * (var_first + var_second + c2)
    )
    return ssim.mean(1)


def grid_positions(size: int, stride: int, device: torch.device | None = None) -> torch.Tensor:
    """``0, s, 2s, ...`` plus the last pixel, the centres where restoration is evaluated along one axis."""
    positions = torch.arange(0, size, stride, device=device)
    if positions[-1] != size - 1:
        positions = torch.cat([positions, positions.new_tensor([size - 1])])
    return positions


def linear_interpolation_matrix(positions: torch.Tensor, size: int) -> torch.Tensor:
    """``[size, n]`` weights of piecewise-linear interpolation from values at sorted ``positions`` to every pixel."""
    count = positions.numel()
    if count == 1:
        return torch.ones(size, 1, device=positions.device)
    pixels = torch.arange(size, device=positions.device)
    left = (torch.searchsorted(positions, pixels, right=True) - 1).clamp(0, count - 2)
    fraction = (pixels - positions[left]).float() / (positions[left + 1] - positions[left]).float()
    weights = torch.zeros(size, count, device=positions.device)
    weights[pixels, left] = 1 - fraction
    weights[pixels, left + 1] += fraction
    return weights


def dense_restoration_map(
    model: PatchAutoencoderModel, images: torch.Tensor, padded: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """``1 - SSIM(x, D(z~_q))`` on a stride-``s`` grid of patch centres, interpolated to ``[B, 1, H, W]``."""
    batch, _, height, width = images.shape
    stride, size, latent = model.encoder.total_stride, model.patch_size, model.latent_size
    rows = grid_positions(height, model.restoration_stride, images.device)
    cols = grid_positions(width, model.restoration_stride, images.device)
    offsets = torch.arange(latent, device=images.device) * stride
    indices = model.quantizer.indices(model.encoder.dense(padded))
    codes = indices[:, (rows[:, None] + offsets)[:, None, :, None], (cols[:, None] + offsets)[None, :, None, :]]
    codes = codes.reshape(-1, latent * latent)  # [B * ny * nx, m * m], raster order per patch
    patches = padded.unfold(2, size, 1).unfold(3, size, 1)[:, :, rows][:, :, :, cols]  # [B, 3, ny, nx, P, P]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, size, size)
    scores = torch.cat([
        1 - patch_ssim(patch_chunk, model.decode_codes(model.restore_codes(code_chunk, generator)), model.ssim_data_range)
        for patch_chunk, code_chunk in zip(patches.split(model.chunk_size), codes.split(model.chunk_size), strict=True)
    ])
    grid = scores.reshape(batch, rows.numel(), cols.numel())
    row_weights = linear_interpolation_matrix(rows, height)
    col_weights = linear_interpolation_matrix(cols, width)
    return (row_weights @ grid @ col_weights.T)[:, None]
