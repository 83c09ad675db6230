"""Memory of one PatchVQVAE prior training step at the paper config (random codes, random weights).

The paper-scale dry run (``paper_scale.py``) stops ``patch_vqvae_carpet`` above its memory limit in the prior stage;
this isolates that step: one forward and backward of the paper prior (8 layers, 8 heads, d = 256) on
``prior_batch_size`` random code sequences of the auto-encoder's latent grid. Peak resident memory as in
``paper_scale.py`` (run it with ``MALLOC_MMAP_THRESHOLD_=65536``). Needs about 12 GiB of free RAM.

Usage::

    MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 python benchmarks/patch_vqvae_prior_memory.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_scale import MemoryProbe, build_model  # noqa: E402


def main() -> None:
    model, _ = build_model("patch_vqvae_carpet")
    network = model.model
    codes = torch.randint(0, network.quantizer.num_codes, (model.prior_batch_size, network.latent_size**2))
    print(f"prior: {model.prior_batch_size} sequences of {network.latent_size}x{network.latent_size} codes")
    probe = MemoryProbe("cpu")
    probe.begin()
    network.prior.train()
    loss = model.prior_loss(network.prior(codes), codes)
    print("forward", probe.end())
    loss.backward()
    print("forward + backward", probe.end())


if __name__ == "__main__":
    main()
