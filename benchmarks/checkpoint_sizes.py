"""State-dict sizes of every paper config: total, the pretrained-architecture part, and a slim checkpoint's share.

Builds each paper config with random weights (same shapes as the pretrained ones, see ``paper_scale.py``) and sums the
bytes of its state dict, of the entries inside ``timm``/``torchvision`` modules (the frozen pretrained backbones, for
stock Anomalib models too), and of what a ``slim_checkpoint=True`` checkpoint of a freshly built model keeps (weights
only; the optimiser state that Lightning adds to full checkpoints is not counted).

Usage::

    python benchmarks/checkpoint_sizes.py [--models uflow_nfa,stock/padim_mvtecad]
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_scale import build_model, paper_configs, select  # noqa: E402

from anomalib_ext.components.checkpoint import SlimCheckpointMixin, referenced_tensors  # noqa: E402

MIB = 2**20


def sizes(name: str) -> dict[str, float | str | bool]:
    torch.manual_seed(0)
    model, _ = build_model(name)
    state = model.state_dict()
    pretrained = referenced_tensors(model)

    def size(keys: list[str]) -> int:  # shared tensors (one module under two names) are stored once
        unique = {state[key].data_ptr(): state[key] for key in keys if key in state}
        return sum(tensor.numel() * tensor.element_size() for tensor in unique.values())

    total, inside = size(list(state)), size(list(pretrained))
    return {
        "config": name,
        "model": type(model).__name__,
        "state_mib": total / MIB,
        "pretrained_mib": inside / MIB,
        "slim": isinstance(model, SlimCheckpointMixin),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated config names or substrings (default: all paper configs)")
    args = parser.parse_args()
    print("| config | model | state dict MiB | inside timm/torchvision MiB | slim checkpoint MiB |")
    print("|---|---|---|---|---|")
    for name in select(paper_configs(), args.models):
        row = sizes(name)
        slim = f"{row['state_mib'] - row['pretrained_mib']:.1f}" if row["slim"] else "not offered"
        print(
            f"| {name} | {row['model']} | {row['state_mib']:.1f} | {row['pretrained_mib']:.1f} | {slim} |", flush=True
        )
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
