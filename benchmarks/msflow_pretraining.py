"""MSFlow without / with CutPaste / with Poisson task pre-training vs stock PaDiM on the embedded Textures dataset.

Pixel AUROC and AUPRO (FPR <= 30 %) on the test split for both MSFlow maps (``add`` and ``mul``: the model is fitted once
and tested once per map), plus image AUROC, with the offline ImageNet EfficientNet-Lite0
(taps blocks.1/2/4, strides 4/8/16) for every model. The Poisson source of one category is the other category's test
defects (MVTec AD layout), as the paper clones another dataset's defects. Every model sees the same pre-processor.

    python benchmarks/msflow_pretraining.py --categories gravel --seeds 0 1 2 --output results.json

Prints a Markdown table (mean ± sample standard deviation over the seeds); ``--output`` also writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from anomalib.engine import Engine
from anomalib.metrics import AUPRO, AUROC, Evaluator
from anomalib.models import Padim
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import seed_everything

from anomalib_ext.components.backbones import register_offline_timm_tag
from anomalib_ext.data import Textures
from anomalib_ext.models import MSFlow

LAYERS = ["blocks.1", "blocks.2", "blocks.4"]
VARIANTS = ("none", "cutpaste", "poisson", "padim")
MAPS = ("add", "mul")
CATEGORIES = ("gravel", "brick")


def evaluator() -> Evaluator:
    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", fpr_limit=0.3),
        ],
    )


def build_model(variant: str, args: argparse.Namespace, poisson_source: Path, pre_processor: PreProcessor) -> object:
    if variant == "padim":
        return Padim(
            backbone=register_offline_timm_tag(),
            layers=LAYERS,
            pre_trained=True,
            n_features=args.padim_features,
            pre_processor=pre_processor,
            evaluator=evaluator(),
        )
    return MSFlow(
        backbone="efficientnet_lite0",
        layers=LAYERS,
        lr=args.flow_lr,
        pretrain_task=variant,
        pretrain_epochs=args.pretrain_epochs,
        pretrain_lr=args.pretrain_lr,
        poisson_source=str(poisson_source) if variant == "poisson" else None,
        pre_processor=pre_processor,
        evaluator=evaluator(),
    )


def datamodule(category: str, args: argparse.Namespace, seed: int = 0) -> Textures:
    return Textures(
        root=args.root,
        category=category,
        tile_size=args.tile_size,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=0,
        seed=seed,
    )


def run_one(variant: str, category: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    seed_everything(seed, workers=True)
    other = next(name for name in CATEGORIES if name != category)
    pre_processor = MSFlow.configure_pre_processor((args.image_size, args.image_size))
    model = build_model(variant, args, Path(args.root) / other, pre_processor)
    if variant == "padim":
        epochs = 1
    elif variant == "none":
        epochs = args.flow_epochs
    else:
        epochs = args.pretrain_epochs + args.flow_epochs
    engine = Engine(
        max_epochs=epochs,
        check_val_every_n_epoch=epochs,  # one validation at the end (post-processor statistics)
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=Path(args.work_dir) / f"{variant}_{category}_{seed}",
    )
    start = time.perf_counter()
    data = datamodule(category, args, seed)
    engine.fit(model, datamodule=data)
    result = {"variant": variant, "category": category, "seed": seed}
    for name in MAPS if variant != "padim" else ("add",):
        if variant != "padim":
            model.model.anomaly_map_generator.mode = name
        metrics = engine.test(model, datamodule=data, verbose=False)[0]
        result |= {
            f"{name}_pixel_AUROC": float(metrics["pixel_AUROC"]),
            f"{name}_pixel_AUPRO": float(metrics["pixel_AUPRO"]),
            "image_AUROC": float(metrics["image_AUROC"]),
        }
    if variant == "padim":  # one map: report it in both columns
        result |= {"mul_pixel_AUROC": result["add_pixel_AUROC"], "mul_pixel_AUPRO": result["add_pixel_AUPRO"]}
    return result | {"seconds": time.perf_counter() - start}


def table(results: list[dict], categories: list[str]) -> str:
    names = {
        "none": "MSFlow (no pre-training)",
        "cutpaste": "MSFlow + CutPaste",
        "poisson": "MSFlow + Poisson",
        "padim": "PaDiM (stock)",
    }

    def mean(key: str, rows: list[dict]) -> str:
        numbers = [100 * r[key] for r in rows]
        spread = f" ± {statistics.stdev(numbers):.1f}" if len(numbers) > 1 else ""
        return f"{statistics.mean(numbers):.1f}{spread}"

    lines = [
        "| model | category | `add` pixel AUROC / AUPRO | `mul` pixel AUROC / AUPRO | image AUROC | fit+test s |",
        "|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        for category in categories:
            rows = [r for r in results if r["variant"] == variant and r["category"] == category]
            if not rows:
                continue
            cells = [f"{mean(f'{m}_pixel_AUROC', rows)} / {mean(f'{m}_pixel_AUPRO', rows)}" for m in MAPS]
            seconds = sum(r["seconds"] for r in rows) / len(rows)
            lines.append(
                f"| {names[variant]} | {category} | {' | '.join(cells)} | {mean('image_AUROC', rows)} | {seconds:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="./datasets/Textures")
    parser.add_argument("--work-dir", default="/tmp/msflow_pretraining_benchmark")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=CATEGORIES)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tile-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--flow-epochs", type=int, default=10)
    parser.add_argument("--flow-lr", type=float, default=1e-3, help="paper: 1e-4 over 100 epochs")
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--pretrain-lr", type=float, default=3e-4, help="paper: 1e-4 over 400 epochs")
    parser.add_argument("--padim-features", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", help="JSON file for the raw numbers")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("anomalib").setLevel(logging.ERROR)
    for category in CATEGORIES:  # each category's Poisson source is the other category: build both first
        datamodule(category, args).prepare_data()
    results = []
    start = time.perf_counter()
    for category in args.categories:
        for seed in args.seeds:
            for variant in args.variants:
                results.append(run_one(variant, category, seed, args))
                print(json.dumps(results[-1]), flush=True)  # noqa: T201
    report = table(results, args.categories)
    print(report)  # noqa: T201
    total = time.perf_counter() - start
    print(f"total {total:.0f} s on {platform.node()} ({torch.get_num_threads()} torch thread(s))")  # noqa: T201
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"args": vars(args), "results": results, "total_s": total}, indent=2))


if __name__ == "__main__":
    main()
