"""UFlowNFA vs stock PaDiM on the embedded Textures dataset with offline EfficientNet-Lite0 features.

Reports image AUROC, pixel AUROC, AUPRO, the per-image mIoU of the model's own mask (UFlowNFA: the unsupervised NFA
mask at log10 NFA < 0; PaDiM: its F1-adaptive threshold learnt on the validation split) and the mIoU at the oracle
threshold (best single threshold on the test set). Both models use the same backbone taps (``blocks.1/2/4``, strides
4/8/16, or ``--layers``), input size and data.

Usage::

    python benchmarks/uflow_nfa_quality.py --categories gravel brick --image-size 128 --epochs 8 \
        --output benchmarks/results/uflow_nfa_quality.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from anomalib.engine import Engine
from anomalib.metrics import AUPRO, AUROC, Evaluator
from anomalib.models import Padim

from anomalib_ext.data import Textures
from anomalib_ext.metrics import MIoU, OracleMIoU
from anomalib_ext.models import UFlowNFA

LAYERS = ["blocks.1", "blocks.2", "blocks.4"]


def evaluator() -> Evaluator:
    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
            MIoU(fields=["pred_mask", "gt_mask"], prefix="own_mask_"),
            OracleMIoU(fields=["anomaly_map", "gt_mask"], prefix="oracle_"),
        ],
    )


def build(name: str, image_size: int, layers: list[str]) -> torch.nn.Module:
    pre_processor = UFlowNFA.configure_pre_processor((image_size, image_size))
    if name == "UFlowNFA":
        return UFlowNFA(
            backbone="efficientnet_lite0",
            layers=layers,
            pre_processor=pre_processor,
            evaluator=evaluator(),
            visualizer=False,
        )
    return Padim(
        backbone="efficientnet_lite0.anomalib_ext",
        layers=layers,
        n_features=100,
        pre_processor=pre_processor,
        evaluator=evaluator(),
        visualizer=False,
    )


def run(name: str, category: str, args: argparse.Namespace, root: Path, work: Path) -> dict[str, float]:
    torch.manual_seed(args.seed)
    datamodule = Textures(
        root=root,
        category=category,
        tile_size=128,
        num_workers=0,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        seed=args.seed,
    )
    model = build(name, args.image_size, args.layers)
    epochs = args.epochs if name == "UFlowNFA" else 1
    engine = Engine(
        default_root_dir=work / name / category, max_epochs=epochs, accelerator="cpu", devices=1, logger=False
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    (metrics,) = engine.test(model=model, datamodule=datamodule, verbose=False)
    test_seconds = time.perf_counter() - start
    return {
        **{key: round(float(value), 4) for key, value in metrics.items()},
        "fit_s": round(fit_seconds, 1),
        "test_s": round(test_seconds, 1),
        "epochs": epochs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", nargs="+", default=["gravel", "brick"])
    parser.add_argument("--models", nargs="+", default=["UFlowNFA", "Padim"])
    parser.add_argument("--image-size", type=int, default=128, help="model input size (the tiles are 128 px)")
    parser.add_argument("--layers", nargs="+", default=LAYERS, help="EfficientNet-Lite0 taps for both models")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
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
    columns = ["image_AUROC", "pixel_AUROC", "pixel_AUPRO", "own_mask_MIoU", "oracle_OracleMIoU", "fit_s", "test_s"]
    print("| model/category | " + " | ".join(columns) + " |")
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
