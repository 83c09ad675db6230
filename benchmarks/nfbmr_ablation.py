"""NF-BMR ablation (paper Table 5 rows "NF", "NF + B-PFM", "NF + BMR") beside stock PaDiM, on the embedded Textures data.

All models use the offline ImageNet EfficientNet-Lite0 and the same 128 px input; each is trained and tested with the
stock Anomalib engine, and the script reports Anomalib's image and pixel AUROC plus the wall time of fit + test.

* NF-BMR variants: SNN = Lite0 ``blocks.4`` (112 channels, stride 16, 8 x 8 map), CPU widths (TNF hidden 128, mapper
  hidden 128, bottleneck 32, n = 2), ``--tnf-epochs`` + ``--bmr-epochs`` epochs, batch 4, Adam lr 1e-3 for both stages
  (the paper's 2e-4 / 3e-4 are meant for 300 + 300 epochs; with a few epochs the flow barely leaves its identity start).
* PaDiM: stock ``anomalib.models.Padim`` on ``efficientnet_lite0.anomalib_ext`` taps ``blocks.1`` + ``blocks.2``
  (strides 4/8), 48 random channels, as ``configs/stock/padim_textures.yaml``.

The CPU settings (tap, input size, widths, epochs, learning rate) are options, and ``--seeds`` repeats every run with
several seeds (mean ± std), so the same script serves the CPU sweep of docs/benchmarks.md. Command used there::

    python benchmarks/nfbmr_ablation.py --categories gravel brick --output nfbmr_ablation.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from anomalib.engine import Engine
from anomalib.models import Padim
from lightning.pytorch import seed_everything
from stock_baselines import textures_cpu_padim

from anomalib_ext.data import Textures
from anomalib_ext.models import NFBMR

VARIANTS = {"NF only": {"nf_only": True}, "NF + B-PFM": {"mapper": "bpfm"}, "NF + BMR (n=2)": {"mapper": "bmr"}}


def run(model: torch.nn.Module, datamodule: Textures, max_epochs: int, workdir: Path) -> dict[str, float]:
    """Fit and test ``model``; validation only at the last epoch (it sets the post-processor's statistics)."""
    engine = Engine(
        default_root_dir=workdir,
        max_epochs=max_epochs,
        check_val_every_n_epoch=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    (metrics,) = engine.test(model=model, datamodule=datamodule, verbose=False)
    return {
        "image_AUROC": float(metrics["image_AUROC"]),
        "pixel_AUROC": float(metrics["pixel_AUROC"]),
        "seconds": time.perf_counter() - start,
    }


def _options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--root", type=Path, default=Path("./datasets/Textures"), help="Textures root (built if missing)"
    )
    parser.add_argument("--categories", nargs="+", default=["gravel", "brick"])
    parser.add_argument("--variants", nargs="+", default=[*VARIANTS, "PaDiM (stock)"], help="rows to run")
    parser.add_argument("--image-size", type=int, default=128, help="tile and input size (px)")
    parser.add_argument("--layer", default="blocks.4", help="EfficientNet-Lite0 tap of the SNN")
    parser.add_argument("--flow-hidden", type=int, default=128)
    parser.add_argument("--mapper-hidden", type=int, default=128)
    parser.add_argument("--bottleneck", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of both stages")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tnf-epochs", type=int, default=6)
    parser.add_argument("--bmr-epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the results")
    return parser.parse_args()


def _model(name: str, args: argparse.Namespace, size: tuple[int, int]) -> torch.nn.Module:
    if name == "PaDiM (stock)":
        return textures_cpu_padim(Padim.configure_pre_processor(size), visualizer=False)
    return NFBMR(
        backbone="efficientnet_lite0",
        layer=args.layer,
        flow_hidden_channels=args.flow_hidden,
        mapper_hidden_channels=args.mapper_hidden,
        bottleneck_channels=args.bottleneck,
        residual_blocks=2,
        tnf_lr=args.lr,
        bmr_lr=args.lr,
        tnf_epochs=args.tnf_epochs,
        bmr_epochs=args.bmr_epochs,
        **VARIANTS[name],
        pre_processor=NFBMR.configure_pre_processor(size),
        visualizer=False,
    )


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> None:
    args = _options()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("anomalib").setLevel(logging.ERROR)
    size = (args.image_size, args.image_size)

    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for category in args.categories:
            datamodule = Textures(
                root=args.root,
                category=category,
                tile_size=args.image_size,
                train_batch_size=args.batch_size,
                eval_batch_size=16,
                num_workers=0,
            )
            results[category] = {}
            for name in args.variants:
                results[category][name] = []
                for seed in args.seeds if name != "PaDiM (stock)" else args.seeds[:1]:
                    seed_everything(seed, verbose=False)
                    model = _model(name, args, size)
                    epochs = model.total_epochs if isinstance(model, NFBMR) else 1
                    row = run(model, datamodule, epochs, Path(workdir) / category / name / str(seed))
                    results[category][name].append({**row, "seed": seed})
                    print(category, name, seed, row, flush=True)

    print(f"\nsettings: {vars(args)}")
    print(
        "\n| model | "
        + " | ".join(f"{c} image AUROC | {c} pixel AUROC | {c} fit+test s" for c in args.categories)
        + " |"
    )
    print("|---|" + "---|---|---|" * len(args.categories))
    for name in args.variants:
        cells = []
        for category in args.categories:
            rows = results[category][name]
            cells += [_cell([row[key] for row in rows]) for key in ("image_AUROC", "pixel_AUROC")]
            cells.append(f"{np.mean([row['seconds'] for row in rows]):.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.output:
        args.output.write_text(json.dumps({"settings": vars(args), "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
