"""DenseHybridAD variants (Table I: freezing x negative shape) vs stock PaDiM on the embedded Textures dataset.

Pixel metrics as in the paper: AUROC, FPR95 (false-positive rate at 95 % true-positive rate) and AP, computed over all
test pixels from the raw score maps (no post-processing); image AUROC for reference.

Weights: no pretrained DeepLabV3 (nor an ImageNet ResNet-50) exists offline here, so every DenseHybridAD variant starts from
a randomly initialised segmenter unless ``--segmenter-weights`` is given. The method relies on a pretrained segmenter;
random-init numbers measure the pipeline, not the paper's method. PaDiM uses the offline ImageNet EfficientNet-Lite0.

Usage::

    python benchmarks/dense_hybrid_ad.py --categories gravel brick --image-size 64 --steps 40 \
        --output benchmarks/results/dense_hybrid_ad.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from stock_baselines import textures_cpu_padim

from anomalib_ext.data import Textures
from anomalib_ext.models import DenseHybridAD

# name -> (freeze, negative shape); the first four are the rows of the paper's Table I.
VARIANTS = {
    "all/mask": ("all", "mask"),
    "backbone/mask": ("backbone", "mask"),
    "none/rectangle": ("none", "rectangle"),
    "all/rectangle": ("all", "rectangle"),
    "none/mask": ("none", "mask"),
}


def fpr_at_95_tpr(labels: np.ndarray, scores: np.ndarray) -> float:
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(fpr[np.searchsorted(tpr, 0.95, side="left")])


def evaluate(model: torch.nn.Module, datamodule: Textures) -> dict[str, float]:
    """Raw score maps of the torch model on the test split -> pixel AUROC / FPR95 / AP and image AUROC."""
    model.eval()
    pixel_scores, pixel_labels, image_scores, image_labels = [], [], [], []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            images = model.pre_processor.transform(batch.image)
            output = model.model(images)
            size = output.anomaly_map.shape[-2:]
            masks = F.interpolate(batch.gt_mask[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
            pixel_scores.append(output.anomaly_map.reshape(len(images), *size).flatten())
            pixel_labels.append(masks.flatten())
            image_scores.append(output.pred_score.flatten())
            image_labels.append(batch.gt_label.flatten())
    scores, labels = torch.cat(pixel_scores).numpy(), torch.cat(pixel_labels).numpy()
    return {
        "pixel_AUROC": round(100 * roc_auc_score(labels, scores), 2),
        "pixel_FPR95": round(100 * fpr_at_95_tpr(labels, scores), 2),
        "pixel_AP": round(100 * average_precision_score(labels, scores), 2),
        "image_AUROC": round(100 * roc_auc_score(torch.cat(image_labels).numpy(), torch.cat(image_scores).numpy()), 2),
    }


def run(name: str, category: str, args: argparse.Namespace, root: Path, work: Path) -> dict[str, float]:
    seed_everything(args.seed, verbose=False)
    pre_processor = DenseHybridAD.configure_pre_processor((args.image_size, args.image_size))
    datamodule = Textures(
        root=root,
        category=category,
        tile_size=args.image_size,
        num_workers=0,
        train_batch_size=args.batch_size,
        eval_batch_size=8,
        seed=args.seed,
    )
    datamodule.prepare_data()
    datamodule.setup()
    engine_args = {
        "default_root_dir": work / name.replace("/", "_") / category,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
    }
    if name == "Padim":
        model = textures_cpu_padim(pre_processor, visualizer=False)
        engine = Engine(max_epochs=1, **engine_args)
    else:
        freeze, shape = VARIANTS[name]
        model = DenseHybridAD(
            pre_trained=args.segmenter_weights is not None,
            segmenter_weights=args.segmenter_weights,
            freeze=freeze,
            negative_shape=shape,
            negative_source=args.negative_source,
            pre_processor=pre_processor,
            visualizer=False,
        )
        # validation only feeds thresholds/normalisation, which the raw-map metrics here do not use
        engine = Engine(max_steps=args.steps, max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0, **engine_args)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    return {**evaluate(model, datamodule), "fit_s": round(fit_seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", nargs="+", default=["gravel", "brick"])
    parser.add_argument("--models", nargs="+", default=[*VARIANTS, "Padim"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="DenseHybridAD optimiser steps")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument(
        "--segmenter-weights", type=Path, default=None, help="local DeepLabV3-ResNet50 weights (default: random init)"
    )
    parser.add_argument(
        "--negative-source", type=Path, default=None, help="negatives folder (default: procedural shapes)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", type=Path, default=None, help="Textures root (default: a temporary folder)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp) / "Textures"
        results = {}
        for category in args.categories:
            for name in args.models:
                results[f"{name}/{category}"] = run(name, category, args, root, Path(tmp) / "runs")
                print(name, category, json.dumps(results[f"{name}/{category}"]), flush=True)
    columns = ["pixel_AUROC", "pixel_FPR95", "pixel_AP", "image_AUROC", "fit_s"]
    print("| model (freeze/negatives) / category | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for key, row in results.items():
        print(f"| {key} | " + " | ".join(str(row.get(column, "")) for column in columns) + " |")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
