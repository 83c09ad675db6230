"""UFlowNFA's unsupervised NFA mask on the embedded Textures data: chi2 vs calibrated null, scale choices, seeds.

Each (category, seed) model is trained once (the CPU config's settings unless overridden: offline EfficientNet-Lite0,
calibrated null fitted on the held-out ``calibration_fraction`` of the training images); every null / scale choice
is then evaluated on the same trained model and the same test latents. Per variant:

* ``false_regions``: connected components of the NFA mask per normal test image (the NFA < 1 guarantee: <= 1);
* ``hit_rate``: share of defective images whose mask touches the defect; ``defect_iou``: their mean IoU;
* ``nfa_miou``: the paper's per-image mIoU of the NFA mask (``no_detection_miou`` = the value of an empty mask);
* ``nfa_map_oracle``: the mIoU of the ``-log10 NFA`` map at its best test-set threshold (Table 3, "oracle, ours");
* ``likelihood_oracle``: the same for the raw likelihood map (the protocol applied to competitors);
* ``pixel_auroc`` / ``pixel_aupro`` of the likelihood map (the null only moves the threshold: identical per model);
* ``threshold_ceiling``: the largest hit rate that any single global threshold on the likelihood map reaches with at
  most one false region per normal test image (thresholds: 201 quantiles of the normal pixels' values from the 90th
  percentile up), i.e. what a perfect threshold rule could do with this model's map.

Nulls: ``chi2`` (paper), ``calibrated`` (the model's: moment-matched ``s_l chi2(nu_l)`` per scale) and ``position``
(evaluated here only: per-position scale ``s_l(x)`` with one ``nu_l`` per scale, fitted on the same held-out images).
Region PFAs from the paper's Chernoff bound, and for the calibrated null also from the exact chi-square tail
(``calibrated+exact``, the model's ``nfa_tail="exact"``).

With ``--padim`` a stock PaDiM (``configs/stock/padim_textures.yaml`` settings, 128 px) runs on the same data and seed.

Usage::

    python benchmarks/uflow_nfa_calibration.py --categories gravel brick --seeds 0 1 2 \\
        --output benchmarks/results/uflow_nfa_calibration.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from anomalib.data import ImageBatch
from anomalib.engine import Engine
from anomalib.metrics import AUPRO, AUROC
from anomalib.models import Padim
from skimage.measure import label
from stock_baselines import textures_cpu_padim

from anomalib_ext.components.nfa import a_contrario_segmentation
from anomalib_ext.data import Textures
from anomalib_ext.metrics import oracle_miou, per_image_iou
from anomalib_ext.models import UFlowNFA

SCALE_CHOICES = {"all": None, "drop_finest": [1, 2], "coarsest": [2]}


def datamodule(root: Path, category: str, seed: int, batch_size: int) -> Textures:
    return Textures(
        root=root,
        category=category,
        num_workers=0,
        train_batch_size=batch_size,
        eval_batch_size=batch_size,
        seed=seed,
    )


@torch.no_grad()
def test_latents(
    model: UFlowNFA, data: Textures
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents per scale, raw likelihood maps ``[N, H, W]``, gt masks and labels of the whole test split."""
    model.eval()
    latents, maps, masks, labels = [], [], [], []
    for batch in data.test_dataloader():
        image = model.pre_processor.transform(batch.image)
        z, _ = model.model.encode(image)
        predictions, _ = model.model.predict(z, with_nfa=False)
        latents.append(z)
        maps.append(predictions.anomaly_map[:, 0])
        masks.append(batch.gt_mask.bool())
        labels.append(batch.gt_label.bool())
    per_scale = [torch.cat([z[scale] for z in latents]) for scale in range(len(latents[0]))]
    return per_scale, torch.cat(maps), torch.cat(masks), torch.cat(labels)


def oracle(maps: torch.Tensor, masks: torch.Tensor) -> float:
    return float(oracle_miou(maps, masks)[0])


@torch.no_grad()
def position_null(model: UFlowNFA) -> list[tuple[np.ndarray, float]]:
    """Per-position calibration on the model's held-out images: ``s_l(x) = m_l(x) / nu_l`` with ``m_l(x)`` the mean of
    ``||z_l(x)||^2`` at position ``x`` and ``nu_l = 2 / Var(||z_l||^2 / m_l(x))`` (pooled over positions)."""
    model.eval()
    images = torch.stack(list(model._calibration_images.values()))  # noqa: SLF001
    latents, _ = model.model.encode(images)
    null = []
    for latent in latents:
        squared = latent.double().square().sum(dim=1)  # [N, H, W]
        mean = squared.mean(dim=0)
        dof = float(2 / (squared / mean).var())
        null.append(((mean / dof).numpy(), dof))
    return null


def threshold_ceiling(maps: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, budget: float = 1.0) -> float:
    """Best hit rate of a global threshold on ``maps`` with at most ``budget`` false regions per normal image."""
    normal, defect, defect_masks = maps[~labels].numpy(), maps[labels].numpy(), masks[labels].numpy()
    best = 0.0
    for tau in np.quantile(normal, np.linspace(0.9, 1.0, 201)):
        false_regions = np.mean([label(image > tau, connectivity=1).max() for image in normal])
        if false_regions <= budget:
            hits = np.mean([(image[mask] > tau).any() for image, mask in zip(defect, defect_masks, strict=True)])
            best = max(best, float(hits))
    return best


NULL_VARIANTS = {
    "chi2": ("chi2", "chernoff"),
    "calibrated": ("calibrated", "chernoff"),
    "calibrated+exact": ("calibrated", "exact"),
    "position": ("position", "chernoff"),
}


def nfa_variant(
    model: UFlowNFA, latents, masks, labels, null: str, scales, position=None, tail: str = "chernoff"
) -> dict[str, float]:
    torch_model = model.model
    parameters = {
        "chi2": None,
        "calibrated": [tuple(row) for row in torch_model.null_table().tolist()],
        "position": position,
    }[null]
    generator = torch_model.anomaly_map_generator
    log_nfa, pred = a_contrario_segmentation(
        latents, generator.input_size, generator.log_nfa_threshold, generator.clamp_chernoff, parameters, scales, tail
    )
    iou = per_image_iou(pred, masks)
    normal, defect = ~labels, labels
    regions = [label(mask.numpy(), connectivity=1).max() for mask in pred[normal]]
    hits = (pred & masks).flatten(1).any(dim=1)[defect]
    return {
        "false_regions": float(np.mean(regions)),
        "normal_images_flagged": float(np.mean([r > 0 for r in regions])),
        "hit_rate": float(hits.float().mean()),
        "defect_iou": float(iou[defect].mean()),
        "nfa_miou": float(iou.mean()),
        "nfa_map_oracle": oracle(-log_nfa, masks),
        "no_detection_miou": float(normal.float().mean()),
    }


def pixel_metrics(maps: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    batch = ImageBatch(
        image=torch.zeros(maps.shape[0], 3, *maps.shape[-2:]), anomaly_map=maps, gt_mask=masks, gt_label=labels
    )
    auroc, aupro = AUROC(fields=["anomaly_map", "gt_mask"]), AUPRO(fields=["anomaly_map", "gt_mask"])
    auroc.update(batch)
    aupro.update(batch)
    return {"pixel_auroc": float(auroc.compute()), "pixel_aupro": float(aupro.compute())}


def run_uflow(category: str, seed: int, args: argparse.Namespace, root: Path, work: Path) -> dict:
    torch.manual_seed(seed)
    data = datamodule(root, category, seed, args.batch_size)
    model = UFlowNFA(
        backbone="efficientnet_lite0",
        layers=args.layers,
        nfa_null="calibrated",
        calibration_fraction=args.calibration_fraction,
        lr=args.lr,
        pre_processor=UFlowNFA.configure_pre_processor((args.image_size, args.image_size)),
        evaluator=False,
        visualizer=False,
    )
    engine = Engine(
        default_root_dir=work,
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=data)
    fit_seconds = time.perf_counter() - start
    latents, maps, masks, labels = test_latents(model, data)
    position = position_null(model)
    result = {
        "position_null": {
            "dof": [round(dof, 3) for _, dof in position],
            "scale_max_over_median": [round(float(s.max() / np.median(s)), 2) for s, _ in position],
        },
        "fit_s": round(fit_seconds, 1),
        "null": {"scale": model.model.null_scale.tolist(), "dof": model.model.null_dof.tolist()},
        "latent_shapes": model.model.latent_shapes,
        "likelihood_oracle": oracle(maps, masks),
        "threshold_ceiling": threshold_ceiling(maps, masks, labels),
        **pixel_metrics(maps, masks, labels),
    }
    for variant, (null, tail) in NULL_VARIANTS.items():
        for name, scales in SCALE_CHOICES.items():
            result[f"{variant}/{name}"] = nfa_variant(model, latents, masks, labels, null, scales, position, tail)
    return result


def run_padim(category: str, seed: int, args: argparse.Namespace, root: Path, work: Path) -> dict:
    torch.manual_seed(seed)
    data = datamodule(root, category, seed, args.batch_size)
    model = textures_cpu_padim(
        Padim.configure_pre_processor((args.padim_image_size, args.padim_image_size)), evaluator=False, visualizer=False
    )
    engine = Engine(
        default_root_dir=work, max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False
    )
    engine.fit(model=model, datamodule=data)
    model.eval()
    maps, masks, labels = [], [], []
    with torch.no_grad():
        for batch in data.test_dataloader():
            maps.append(model.model(model.pre_processor.transform(batch.image)).anomaly_map[:, 0])
            masks.append(batch.gt_mask.bool())
            labels.append(batch.gt_label.bool())
    return pixel_metrics(torch.cat(maps), torch.cat(masks), torch.cat(labels))


def summarise(results: dict) -> dict:
    """mean and std over seeds of every numeric leaf, per category."""
    summary = {}
    for category, per_seed in results.items():
        rows = list(per_seed.values())

        def leaves(row, prefix=""):
            for key, value in row.items():
                if isinstance(value, dict) and key not in ("null", "position_null"):
                    yield from leaves(value, f"{prefix}{key}/")
                elif isinstance(value, (int, float)):
                    yield f"{prefix}{key}", value

        keys = [key for key, _ in leaves(rows[0])]
        summary[category] = {}
        for key in keys:
            values = [dict(leaves(row))[key] for row in rows]
            summary[category][key] = (
                round(statistics.mean(values), 4),
                round(statistics.pstdev(values), 4) if len(values) > 1 else 0.0,
            )
    return summary


def markdown(summary: dict) -> str:
    """Table rows ``mean ± std`` per category and null/scale variant."""

    def cell(values: tuple[float, float]) -> str:
        return f"{values[0]:.3f} ± {values[1]:.3f}"

    columns = ["false_regions", "hit_rate", "defect_iou", "nfa_miou", "nfa_map_oracle"]
    lines = [
        "| category | null / scales | false regions per normal image | defects hit | defect IoU | NFA mIoU | "
        "−log10 NFA map oracle mIoU |",
        "|---" * 7 + "|",
    ]
    for category, row in summary.items():
        variants = sorted({key.rsplit("/", 1)[0] for key in row if key.count("/") == 2})
        for variant in variants:
            cells = " | ".join(cell(row[f"{variant}/{column}"]) for column in columns)
            lines.append(f"| {category} | {variant} | {cells} |")
    lines += [
        "",
        "| category | pixel AUROC | pixel AUPRO | likelihood oracle mIoU | threshold ceiling (hits) | PaDiM pixel AUROC | "
        "PaDiM AUPRO | fit (s) |",
        "|---" * 8 + "|",
    ]
    for category, row in summary.items():
        padim = [cell(row[key]) if key in row else "" for key in ("padim/pixel_auroc", "padim/pixel_aupro")]
        lines.append(
            f"| {category} | {cell(row['pixel_auroc'])} | {cell(row['pixel_aupro'])} | {cell(row['likelihood_oracle'])} | "
            f"{cell(row['threshold_ceiling'])} | {padim[0]} | {padim[1]} | {cell(row['fit_s'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", nargs="+", default=["gravel", "brick"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--padim-image-size", type=int, default=128, help="PaDiM's CPU config: 128 px")
    parser.add_argument("--layers", nargs="+", default=["blocks.2", "blocks.4", "blocks.6"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--calibration-fraction", type=float, default=0.2)
    parser.add_argument("--padim", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--tables", nargs="+", type=Path, default=None, help="only print tables of saved outputs")
    args = parser.parse_args()
    if args.tables:
        results = {k: v for path in args.tables for k, v in json.loads(path.read_text())["results"].items()}
        print(markdown(summarise(results)))
        return
    torch.set_num_threads(args.threads)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "Textures"
        for category in args.categories:
            results[category] = {}
            for seed in args.seeds:
                row = run_uflow(category, seed, args, root, Path(tmp) / "runs")
                if args.padim:
                    row["padim"] = run_padim(category, seed, args, root, Path(tmp) / "padim")
                results[category][seed] = row
                print(category, seed, json.dumps(row), flush=True)
    summary = summarise(results)
    print(markdown(summary))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "summary": summary}, indent=1
            )
        )


if __name__ == "__main__":
    main()
