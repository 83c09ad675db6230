"""PatchVQVAE at the paper's scale with random weights: sequential restoration speed and peak memory per eval image.

Speed. The paper's prior (8 blocks, 8 heads, d = 256, feed-forward 512, K = 1024, 17 x 17 = 289 codes per patch) with
random weights. "Before" is the previous sequential algorithm, kept here as a reference: re-run the whole prior on
the patches that still have an improbable code, resample the first one, repeat (one full prior pass per resampled
code). "After" is :meth:`CodePrior.restore` (one autoregressive sweep with cached keys and values). Both draw from the
same counter-based uniforms, so the restored codes and the ``1 - SSIM`` scores must be identical. Both are timed on
the same ``--before-patches`` grid patches (the old algorithm is far too slow for a whole image on a CPU); "after" is
also timed on ``--after-patches`` patches in one chunk, and seconds per image are that per-patch time times the
stride-8 grid of a 256² (33² patches) and 1024² (129² patches) image.

Memory. Peak bytes of live tensors while one image (B = 1) is scored at 512² and 1024², for every scorer, measured by
a dispatch-mode tracker of tensor storages (CPU has no allocator statistics; library workspaces are not counted).
"Before" runs the previous OC-SVM code path (kept below) with the same support vectors; for the previous restoration
path the figure is computed from the tensor it built, ``[B, 3, ny, W + P - 1, P, P]`` float32 (too large to run here).
The restoration "after" run uses a coarse grid (about 144 patches, two chunks of 128) because its peak is one chunk's.

Usage::

    python benchmarks/patch_vqvae_restoration_memory.py --output benchmarks/results/patch_vqvae_restoration_memory.json
"""

from __future__ import annotations

import argparse
import json
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from anomalib_ext.models.patch_vqvae.anomaly_map import (
    grid_positions,
    patch_ssim,
    reflect_pad_for_patches,
    sample_inverse_cdf,
    uniform_draws,
)
from anomalib_ext.models.patch_vqvae.torch_model import PatchAutoencoderModel


def restore_before(model: PatchAutoencoderModel, codes: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The previous sequential algorithm (one full prior pass per resampled code), with the same draws."""
    codes = codes.clone()
    resume_from = torch.zeros(codes.shape[0], dtype=torch.long)
    active = torch.arange(codes.shape[0])
    positions = torch.arange(codes.shape[1])
    while active.numel():
        probabilities = model.prior(codes[active]).softmax(-1)
        observed = probabilities.gather(-1, codes[active, :, None])[..., 0]
        improbable = (observed < model.restoration_threshold) & (positions >= resume_from[active, None])
        has_improbable = improbable.any(1)
        if not has_improbable.any():
            break
        rows = has_improbable.nonzero()[:, 0]
        first = improbable[rows].float().argmax(1)
        codes[active[rows], first] = sample_inverse_cdf(probabilities[rows, first], uniforms[active[rows], first])
        resume_from[active[rows]] = first + 1
        active = active[rows]
    return codes


def ocsvm_map_before(dense_latents: torch.Tensor, svm, stride: int, chunk_size: int = 256) -> torch.Tensor:  # noqa: ANN001
    """The previous OC-SVM dense map (fixed chunks of support vectors, several ``[B, chunk, H, W]`` temporaries)."""
    support_vectors = svm.support_vectors
    window = torch.ones(1, *support_vectors.shape[1:], dtype=dense_latents.dtype)
    latent_norms = F.conv2d(dense_latents.pow(2), window, dilation=stride)
    decision = latent_norms.double() * 0 + svm.intercept.double()
    for vectors, coefs in zip(support_vectors.split(chunk_size), svm.dual_coef.split(chunk_size), strict=True):
        products = F.conv2d(dense_latents, vectors, dilation=stride)
        squared = (latent_norms + vectors.pow(2).sum((1, 2, 3))[:, None, None] - 2 * products).clamp_min(0)
        kernel = torch.exp(-svm.gamma * squared).double()
        decision = decision + torch.einsum("bkhw,k->bhw", kernel, coefs.double())[:, None]
    return -decision.to(dense_latents.dtype)


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the block and still referenced (views share their storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.references: dict[int, list[int]] = {}  # storage pointer -> [reference count, bytes]

    def _release(self, key: int) -> None:
        entry = self.references[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.references[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        result = func(*args, **(kwargs or {}))
        aliasing = any(output.alias_info is not None for output in func._schema.returns)  # noqa: SLF001
        for tensor in pytree.tree_leaves(result):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in self.references:
                if aliasing:  # a view of a tensor created outside the block
                    continue
                self.references[key] = [0, storage.nbytes()]
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self.references[key][0] += 1
            weakref.finalize(tensor, self._release, key)
        return result


def peak_bytes(function) -> int:  # noqa: ANN001
    with torch.no_grad(), PeakTensorMemory() as tracker:
        function()
    return tracker.peak


def speed(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = PatchAutoencoderModel(quantized=True, scorer="restoration").eval()  # paper sizes, random weights
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    padded = reflect_pad_for_patches(image, model.patch_size)
    rows, cols = grid_positions(256, 8), grid_positions(256, 8)
    centres = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)
    count = max(args.before_patches, args.after_patches)
    chosen = centres[torch.randperm(centres.shape[0], generator=torch.Generator().manual_seed(2))[:count]]
    patches = torch.stack([padded[0, :, y : y + 63, x : x + 63] for y, x in chosen.tolist()])
    keys = chosen[:, 0] * 256 + chosen[:, 1]
    result: dict = {}
    with torch.no_grad():
        codes = model.patch_codes(patches)
        uniforms = uniform_draws(model.restoration_seed, keys, codes.shape[1])
        probabilities = model.prior(codes).softmax(-1).gather(-1, codes[..., None])[..., 0]
        result["improbable_fraction_teacher_forced"] = round(float((probabilities < 0.05).float().mean()), 3)
        few = slice(0, args.before_patches)
        start = time.perf_counter()
        before = restore_before(model, codes[few], uniforms[few])
        before_seconds = time.perf_counter() - start
        start = time.perf_counter()
        after = model.restore_codes(codes[few], uniforms[few])
        after_seconds = time.perf_counter() - start
        scores = [1 - patch_ssim(patches[few], model.decode_codes(restored)) for restored in (before, after)]
        start = time.perf_counter()
        model.restore_codes(codes[: args.after_patches], uniforms[: args.after_patches])
        after_per_patch = (time.perf_counter() - start) / args.after_patches
    per_image = {f"{size}x{size}": grid_positions(size, 8).numel() ** 2 for size in (256, 1024)}
    result |= {
        "before_s_per_patch": round(before_seconds / args.before_patches, 3),
        "after_s_per_patch_same_patches": round(after_seconds / args.before_patches, 4),
        "ratio_same_patches": round(before_seconds / after_seconds, 1),
        "identical_codes": bool(torch.equal(before, after)),
        "resampled_fraction": round(float((after != codes[few]).float().mean()), 3),
        "max_abs_score_difference": float((scores[0] - scores[1]).abs().max()),
        "after_s_per_patch_one_chunk": round(after_per_patch, 4),
        "s_per_image_stride8": {
            name: {"before": round(before_seconds / args.before_patches * n, 0), "after": round(after_per_patch * n, 1)}
            for name, n in per_image.items()
        },
    }
    return result


def memory(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    result: dict = {}
    models = {
        "ae": PatchAutoencoderModel(quantized=False, scorer="ocsvm").eval(),
        "vq": PatchAutoencoderModel(quantized=True, scorer="ocsvm").eval(),
    }
    with torch.no_grad():
        for model in models.values():  # about --support-vectors support vectors (nu = 0.5 of twice as many latents)
            latents = model.patch_latents(torch.rand(2 * args.support_vectors, 3, 63, 63))
            model.ocsvm.fit(latents, nu=0.5)
            result.setdefault("support_vectors", {})[model.quantized] = model.ocsvm.support_vectors.shape[0]
    restoration = PatchAutoencoderModel(quantized=True, scorer="restoration").eval()
    for size in (512, 1024):
        image = torch.rand(1, 3, size, size)
        row: dict = {}
        for name, model in models.items():
            label = "AE" if name == "ae" else "VQ-AE"
            after = peak_bytes(lambda m=model, x=image: m.anomaly_map(x, "reconstruction"))
            row[f"{label} recons."] = {"after": after}

            def before_ocsvm(m: PatchAutoencoderModel = model, x: torch.Tensor = image) -> None:
                dense = m.quantize(m.encoder.dense(reflect_pad_for_patches(x, 63)))
                ocsvm_map_before(dense, m.ocsvm, 3)

            row[f"{label} + OC-SVM"] = {
                "before": peak_bytes(before_ocsvm),
                "after": peak_bytes(lambda m=model, x=image: m.anomaly_map(x, "ocsvm")),
            }
        ny = grid_positions(size, 8).numel()
        restoration.restoration_stride = -(-size // 11)  # 12 x 12 grid: 144 patches, chunks of 128
        row["VQ restoration"] = {
            "before (from shapes)": 3 * ny * (size + 62) * 63 * 63 * 4,
            "after": peak_bytes(lambda x=image: restoration.anomaly_map(x)),
        }
        for scorer in row.values():
            for key in scorer:
                scorer[key] = round(scorer[key] / 2**20, 1)  # MiB
        result[f"{size}x{size}"] = row
        print(size, row, flush=True)  # noqa: T201
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before-patches", type=int, default=4)
    parser.add_argument("--after-patches", type=int, default=128)
    parser.add_argument("--support-vectors", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {"args": {key: str(value) for key, value in vars(args).items()}}
    if not args.skip_speed:
        results["restoration_speed"] = speed(args)
        print(results["restoration_speed"], flush=True)  # noqa: T201
    results["peak_memory_MiB_per_image"] = memory(args)
    text = json.dumps(results, indent=2)
    print(text)  # noqa: T201
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
