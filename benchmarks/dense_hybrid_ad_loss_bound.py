"""DenseHybridAD loss over 2,000 Adam steps per freezing mode, with and without the density anchor (issue: bounded loss).

Same synthetic setup as ``tests/models/dense_hybrid_ad/test_loss.py``: torchvision's DeepLabV3 head (ASPP, 3x3 conv,
BN-ReLU-Conv, K = 21) and DenseHybridAD's freezing, outlier head and teacher, on a two-conv backbone instead of the
ResNet-50 (2,000 ResNet-50 steps per mode do not fit a shared 2-core CPU), one fixed batch of two 16 px noise images
with a pasted bright rectangle as the negative, Adam on every trainable parameter of the mode, model in train mode.
Reports the loss at a few steps, its minimum and the analytic lower bound of the anchored loss. A run without the
anchor stops early once its loss is below ``--stop-below`` (it has diverged; the table says at which step).

Command used for docs/benchmarks.md::

    python benchmarks/dense_hybrid_ad_loss_bound.py --steps 2000 --output dense_hybrid_ad_loss_bound.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# the harness of the test it extends (same model, batch and schedules), importable from any working directory
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.models.dense_hybrid_ad.test_loss import SCHEDULES, small_deeplabv3, train_on_pasted_batch  # noqa: E402

from anomalib_ext.models.dense_hybrid_ad import torch_model  # noqa: E402
from anomalib_ext.models.dense_hybrid_ad.loss import DenseHybridLoss  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--stop-below", type=float, default=-100.0, help="early stop of a diverging run")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch_model.deeplabv3_resnet50 = small_deeplabv3  # the stand-in backbone (see the module docstring)
    marks = sorted({0, args.steps // 4, args.steps // 2, 3 * args.steps // 4, args.steps - 1})
    results = {}
    for freeze, (_, lr) in SCHEDULES.items():
        for name, loss_fn in (
            ("anchored (default)", DenseHybridLoss()),
            ("no density anchor", DenseHybridLoss(density_anchor=0)),
        ):
            start = time.perf_counter()
            losses = train_on_pasted_batch(freeze, loss_fn, args.steps, lr, stop_below=args.stop_below)
            results[f"{freeze} / {name}"] = {
                "lr": lr,
                "bound": loss_fn.lower_bound,
                "steps_run": len(losses),
                "at_steps": {step + 1: losses[step] if step < len(losses) else float("nan") for step in marks},
                "min": min(losses),
                "seconds": time.perf_counter() - start,
            }
            print(freeze, name, results[f"{freeze} / {name}"], flush=True)
    header = " | ".join(f"step {step + 1}" for step in marks)
    print(f"\n| freeze / loss | Adam lr | {header} | steps run | min | lower bound |")
    print("|---|---|" + "---|" * (len(marks) + 3))
    for key, row in results.items():
        cells = " | ".join("stopped" if value != value else f"{value:.4g}" for value in row["at_steps"].values())
        print(f"| {key} | {row['lr']} | {cells} | {row['steps_run']} | {row['min']:.4g} | {row['bound']:.4g} |")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
