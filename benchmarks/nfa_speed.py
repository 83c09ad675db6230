"""Speed of the vectorised tree NFA (``anomalib_ext.components.nfa``) vs a straightforward Python implementation.

The straightforward implementation (``tests/components/nfa_reference.py``: explicit per-node pixel sets, dictionaries of
children, node-by-node prune/merge) is the correctness reference: every timed image's masks and log10 NFA maps must be
identical between the two, else the script fails.

Cases (per image, output 256 x 256):
* ``paper``: MS-CaiT latents, 816 x 28^2 + 192 x 14^2 (target <= 30 ms per image);
* ``resnet``: ResNet-sized latents, 64 x 64^2 + 128 x 32^2 + 256 x 16^2 (target >= 5x faster than the reference).
Latents are N(0, 1) (the null hypothesis) and, for every other image, with a planted shifted region so that the
masks compared are not all empty.

Usage::

    python benchmarks/nfa_speed.py --images 20 --reference-images 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "components"))

from nfa_reference import reference_segmentation  # noqa: E402

from anomalib_ext.components.nfa import a_contrario_segmentation  # noqa: E402

CASES = {
    "paper": [(816, 28), (192, 14)],
    "resnet": [(64, 64), (128, 32), (256, 16)],
}
PLANTED_SHIFT = {"paper": 0.8, "resnet": 2.0}  # detectable: few channels need a stronger shift
OUTPUT_SIZE = (256, 256)


def make_latents(case: str, index: int, generator: torch.Generator) -> list[torch.Tensor]:
    latents = [torch.randn(1, channels, size, size, generator=generator) for channels, size in CASES[case]]
    if index % 2 == 1:  # a planted anomaly covering about 1/16 of the image at every scale
        for latent in latents:
            size = latent.shape[-1]
            latent[..., size // 4 : size // 2, size // 4 : size // 2] += PLANTED_SHIFT[case]
    return latents


def time_call(function, latents: list[torch.Tensor]) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:  # noqa: ANN001
    start = time.perf_counter()
    result = function(latents, OUTPUT_SIZE)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20, help="images timed with the vectorised implementation")
    parser.add_argument("--reference-images", type=int, default=5, help="of those, images also run by the reference")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    a_contrario_segmentation(make_latents("paper", 0, generator), OUTPUT_SIZE)  # warm-up (imports, N_tests cache)

    print(
        f"| case | latents | vectorised ms/image, median (min), {args.images} images | reference ms/image, median (min), "
        f"{args.reference_images} images | speed-up (medians) | detected pixels (planted images) | masks identical |"
    )
    print("|---|---|---|---|---|---|---|")
    for case, shapes in CASES.items():
        fast_times, reference_times, detected = [], [], []
        identical = True
        for index in range(args.images):
            latents = make_latents(case, index, generator)
            seconds, (log_nfa, mask) = time_call(a_contrario_segmentation, latents)
            fast_times.append(seconds)
            if index % 2 == 1:
                detected.append(int(mask.sum()))
            if index < args.reference_images:
                seconds, (reference_log_nfa, reference_mask) = time_call(reference_segmentation, latents)
                reference_times.append(seconds)
                identical &= torch.equal(mask, reference_mask) and torch.allclose(log_nfa, reference_log_nfa)
        fast, reference = statistics.median(fast_times) * 1e3, statistics.median(reference_times) * 1e3
        latents_text = " + ".join(f"{c}x{s}^2" for c, s in shapes)
        print(
            f"| {case} | {latents_text} | {fast:.1f} ({min(fast_times) * 1e3:.1f}) | {reference:.1f} "
            f"({min(reference_times) * 1e3:.1f}) | {reference / fast:.1f}x | "
            f"{statistics.mean(detected):.0f} | {identical} |",
            flush=True,
        )
        if not identical:
            raise SystemExit(f"{case}: the vectorised NFA differs from the straightforward reference")


if __name__ == "__main__":
    main()
