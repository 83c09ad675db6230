"""Pure tensor functions behind the dense anomaly maps of the patch auto-encoders (no model state).

The score of a pixel is the score of the patch centred on it (paper section 2.2). With the image reflect-padded by
``P // 2`` on every side, the patch centred on image pixel ``(y, x)`` has its top-left corner at padded ``(y, x)``, and
:meth:`PatchEncoder.dense` gives its latent as the window ``dense[..., y + S*k, x + S*l]`` (``S`` = total encoder stride).

* Reconstruction: the decoded centre pixel depends only on a small block of the patch's latent (5 x 5 for the paper's
  layers), so decoding the whole stride-``S`` latent map of each of the ``S^2`` offsets gives every patch's exact centre
  pixel at once (transposed convolutions are translation-equivariant with step ``S``).
* One-class SVM: see :meth:`OneClassSVMHead.decision` (dilated convolutions with the support vectors as kernels).
* Restoration: per patch on a stride-``s`` grid of centres (:meth:`PatchAutoencoderModel.restoration_map`); the
  helpers here gather the patches of one chunk, draw its random numbers and interpolate the grid back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812

__all__ = [
    "centre_pixel_reconstruction",
    "gather_patches",
    "grid_positions",
    "interpolate_grid",
    "linear_interpolation_matrix",
    "patch_reconstruction_map",
    "patch_ssim",
    "reflect_indices",
    "reflect_pad_for_patches",
    "sample_inverse_cdf",
    "uniform_draws",
]

_MASK32 = 0xFFFFFFFF
_HASH_MULTIPLIER = 0x45D9F3B  # < 2**31: products of 32-bit values stay inside int64


def reflect_indices(size: int | torch.SymInt, half: int, device: torch.device | None = None) -> torch.Tensor:
    """Indices ``-half .. size - 1 + half`` mirrored into ``[0, size)`` (reflection without repeating the edge).

    Repeated mirroring, so any ``size >= 1`` works (``F.pad(mode="reflect")`` needs ``half < size``); equal to it
    whenever that holds. Pure tensor arithmetic, so an exported graph keeps the size dynamic.
    """
    positions = torch.arange(-half, size + half, device=device)
    period = (torch.ones((), dtype=torch.long, device=device) * (2 * (size - 1))).clamp_min(1)
    return (size - 1) - (torch.remainder(positions, period) - (size - 1)).abs()


def reflect_pad_for_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Reflect-pad by ``patch_size // 2`` so that every image pixel is the centre of one full patch (any image size)."""
    half = patch_size // 2
    rows = reflect_indices(images.shape[-2], half, images.device)
    cols = reflect_indices(images.shape[-1], half, images.device)
    return images.index_select(-2, rows).index_select(-1, cols)


def centre_pixel_reconstruction(
    decode: Callable[[torch.Tensor], torch.Tensor],
    dense_latents: torch.Tensor,
    patch_size: int,
    latent_size: int,
    stride: int,
    image_size: tuple[int, int],
) -> torch.Tensor:
    """Decoded centre pixels ``[B, 3, H, W]`` of all patches from the dense latent map (exact, see module docstring).

    Every offset ``(a, b)`` decodes the same number of patches, ``(ceil(H / S) + 1) x (ceil(W / S) + 1)`` (the latent
    map is zero-padded at the end: those latents reach only centres beyond the image, which are cropped), so the ``S^2``
    results interleave by a reshape. Positions are picked with index tensors rather than shape-dependent slices, so
    an exported graph keeps height and width dynamic.
    """
    height, width = image_size
    # One spare row/column of centres keeps these sizes >= 2 (torch.export specialises sizes 0 and 1).
    rows, cols = (height + stride - 1) // stride + 1, (width + stride - 1) // stride + 1
    dense_latents = F.pad(dense_latents, (0, 2 * stride - 1, 0, 2 * stride - 1))
    device = dense_latents.device
    window_rows = torch.arange(rows + latent_size - 1, device=device) * stride
    window_cols = torch.arange(cols + latent_size - 1, device=device) * stride
    centre_rows = torch.arange(rows, device=device) * stride + patch_size // 2
    centre_cols = torch.arange(cols, device=device) * stride + patch_size // 2
    offsets = []
    for row_offset in range(stride):
        for col_offset in range(stride):
            latents = dense_latents.index_select(-2, window_rows + row_offset).index_select(
                -1, window_cols + col_offset
            )
            offsets.append(decode(latents).index_select(-2, centre_rows).index_select(-1, centre_cols))
    batch, channels = offsets[0].shape[:2]
    interleaved = torch.stack(offsets, 2).reshape(batch, channels, stride, stride, rows, cols)
    interleaved = interleaved.permute(0, 1, 4, 2, 5, 3).reshape(batch, channels, rows * stride, cols * stride)
    return interleaved.index_select(-2, torch.arange(height, device=device)).index_select(
        -1, torch.arange(width, device=device)
    )


def patch_reconstruction_map(images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Squared error of each patch's centre pixel, summed over colour channels: ``[B, 1, H, W]``."""
    return (images - reconstruction).pow(2).sum(1, keepdim=True)


def patch_ssim(first: torch.Tensor, second: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM (Wang et al. 2004) of each patch pair with a uniform window as large as the patch: ``[N]``, float32.

    The paper uses a 63 x 63 window on 63 x 63 patches, i.e. one window per patch; channels are averaged. Computed in
    float32 even under autocast (the constants ``c1 = 1e-4`` vanish in half precision).
    """
    with torch.autocast(first.device.type, enabled=False):
        first, second = first.float(), second.float()
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


def gather_patches(
    padded: torch.Tensor, image: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int
) -> torch.Tensor:
    """``[n, C, size, size]`` windows of ``padded[image]`` with top-left corners ``(top, left)`` (one chunk only)."""
    offsets = torch.arange(size, device=padded.device)
    rows = (top[:, None] + offsets)[:, :, None]  # [n, P, 1]
    cols = (left[:, None] + offsets)[:, None, :]  # [n, 1, P]
    return padded.permute(0, 2, 3, 1)[image[:, None, None], rows, cols].permute(0, 3, 1, 2)


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


def interpolate_grid(grid: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, ny, nx]`` values at ``rows x cols`` -> ``[B, 1, H, W]`` (separable piecewise-linear interpolation)."""
    row_weights = linear_interpolation_matrix(rows, size[0])
    col_weights = linear_interpolation_matrix(cols, size[1])
    return (row_weights @ grid.float() @ col_weights.T)[:, None]


def _mix32(values: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply) on int64 tensors holding values in ``[0, 2**32)``."""
    values = values & _MASK32
    for _ in range(2):
        values = ((values ^ (values >> 16)) * _HASH_MULTIPLIER) & _MASK32
    return values ^ (values >> 16)


def uniform_draws(seed: int, keys: torch.Tensor, length: int) -> torch.Tensor:
    """Counter-based uniforms in ``(0, 1)``: ``[n, length]`` from a hash of ``(seed, key, position)``.

    The number used for position ``j`` of the patch with key ``k`` depends on nothing else: not on the batch, the
    chunking, the device or the order in which patches are processed.
    """
    base = _mix32(_mix32(torch.full_like(keys, seed, dtype=torch.long)) + keys.long())
    positions = torch.arange(length, device=keys.device)
    bits = _mix32(base[:, None] + positions) >> 8  # 24 random bits
    return (bits.float() + 0.5) / float(1 << 24)


def sample_inverse_cdf(probabilities: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one index per row of ``[n, K]`` ``probabilities`` with the given ``[n]`` uniforms (inverse CDF)."""
    cdf = probabilities.float().cumsum(-1)
    draws = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None].contiguous(), right=True)[:, 0]
    return draws.clamp_max(probabilities.shape[-1] - 1)
