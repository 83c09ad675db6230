"""The five scorers of Pinon et al. (2023, Table 1) beside stock PaDiM on the embedded Textures dataset, plus CPU speed.

Quality: pixel AUROC, AUPRO (FPR <= 100 %) and AUPRO@30 % FPR (Anomalib's normalised AUPRO with ``fpr_limit=0.3``; a
random map scores 0.15, as in the paper), image AUROC, on the raw score maps of the test split (no post-processing).
One ``PatchAE`` fit (staged: AE epochs + OC-SVM) serves the "AE recons." and "E + SVMu" rows; one ``PatchVQVAE`` fit
(AE epochs + prior epochs) serves "AE discret. recons.", "AE discret. restau." and, with an SVM fitted the same way
the staged fit does (quantised latents of ``svm_patches_per_image`` random training patches), "E discret. + SVMu".
Paper architecture (63 x 63 patches, 5-3-3-3 / 1-1-3-1 / 3-4-12-16, K = 1024); CPU-sized training (fewer patches and
epochs) and a small prior (the paper's 8 x 256 prior does not train in minutes on CPU); restoration in
``single_pass`` mode on a stride-8 grid for the quality table. PaDiM: offline ImageNet EfficientNet-Lite0.

Speed: seconds per 256 x 256 image for every scorer (``--threads`` CPU threads), and the dense shortcuts vs a
brute-force loop over every patch of a small image, with the largest difference of the values.

Usage::

    python benchmarks/patch_vqvae_scorers.py --output benchmarks/results/patch_vqvae_scorers.json
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
from anomalib.metrics.aupro import _AUPRO
from anomalib.models import Padim
from lightning.pytorch import seed_everything
from sklearn.metrics import roc_auc_score
from stock_baselines import textures_cpu_padim

from anomalib_ext.data import Textures
from anomalib_ext.models import PatchAE, PatchVQVAE
from anomalib_ext.models.patch_vqvae.anomaly_map import grid_positions, reflect_pad_for_patches
from anomalib_ext.models.patch_vqvae.torch_model import OneClassSVMHead

ROWS = {  # paper row -> (model, scorer)
    "AE recons.": ("ae", "reconstruction"),
    "AE discret. recons.": ("vq", "reconstruction"),
    "E + SVMu": ("ae", "ocsvm"),
    "E discret. + SVMu": ("vq", "ocsvm"),
    "AE discret. restau.": ("vq", "restoration"),
}


def pixel_metrics(maps: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    scores, truth = maps.flatten().numpy(), masks.flatten().numpy()
    result = {"pixel_AUROC": roc_auc_score(truth, scores)}
    for name, limit in (("pixel_AUPRO", 1.0), ("pixel_AUPRO@30", 0.3)):
        metric = _AUPRO(fpr_limit=limit)
        metric.update(maps[:, 0], masks.int())
        result[name] = float(metric.compute())
    result["image_AUROC"] = roc_auc_score(labels.numpy(), maps.flatten(1).amax(1).numpy())
    return {key: round(value, 3) for key, value in result.items()}


def test_maps(score_fn, datamodule: Textures) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:  # noqa: ANN001
    maps, masks, labels, seconds = [], [], [], 0.0
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            start = time.perf_counter()
            maps.append(score_fn(batch.image))
            seconds += time.perf_counter() - start
            masks.append(F.interpolate(batch.gt_mask[:, None].float(), size=maps[-1].shape[-2:]) > 0.5)
            labels.append(batch.gt_label)
    return torch.cat(maps), torch.cat(masks)[:, 0], torch.cat(labels), seconds / len(torch.cat(labels))


def fit_quantised_svm(model: PatchVQVAE, datamodule: Textures, patches_per_image: int) -> None:
    """What the staged fit's ``ocsvm`` epoch does, on the already trained VQ-VAE."""
    model.model.eval()
    with torch.no_grad():
        latents = torch.cat(
            [
                model.model.patch_latents(model.model.random_patches(batch.image, patches_per_image))
                for batch in datamodule.train_dataloader()
            ]
        )
    model.model.ocsvm = OneClassSVMHead(tuple(latents.shape[1:]))
    model.model.ocsvm.fit(latents, nu=model.svm_nu)


def brute_force(model, image: torch.Tensor, scorer: str) -> torch.Tensor:  # noqa: ANN001
    """One encoder/decoder (or prior) pass per patch, no dense shortcut: ``[1, 1, H, W]`` (restoration: the grid).

    Restoration draws random codes: the draws of a patch depend only on the seed and its centre, so the per-patch loop
    sees the same random numbers as the dense scorer and the values can be compared exactly.
    """
    size = model.patch_size
    height, width = image.shape[-2:]
    padded = reflect_pad_for_patches(image, size)
    stride = model.restoration_stride if scorer == "restoration" else 1
    rows = grid_positions(height, stride) if scorer == "restoration" else torch.arange(height)
    cols = grid_positions(width, stride) if scorer == "restoration" else torch.arange(width)
    if scorer == "restoration":
        scores = [
            model.restoration_scores(
                padded[:, :, row : row + size, col : col + size], torch.tensor([row * width + col])
            )
            for row in rows.tolist()
            for col in cols.tolist()
        ]
        return torch.cat(scores).reshape(1, 1, rows.numel(), cols.numel())
    scores = []
    for row in rows.tolist():
        patches = torch.stack([padded[0, :, row : row + size, col : col + size] for col in cols.tolist()])
        if scorer == "reconstruction":
            centre = model.decoder(model.patch_latents(patches))[:, :, size // 2, size // 2]
            scores.append((patches[:, :, size // 2, size // 2] - centre).pow(2).sum(1))
        else:
            scores.append(-model.ocsvm.decision_function(model.patch_latents(patches)))
    return torch.stack(scores)[None, None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="gravel")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--num-train", type=int, default=24)
    parser.add_argument("--num-test-normal", type=int, default=6)
    parser.add_argument("--num-test-defect", type=int, default=12)
    parser.add_argument("--patches-per-image", type=int, default=300)
    parser.add_argument("--ae-epochs", type=int, default=4)
    parser.add_argument("--prior-epochs", type=int, default=3)
    parser.add_argument("--svm-patches-per-image", type=int, default=40)
    parser.add_argument("--speed-size", type=int, default=256)
    parser.add_argument("--sequential-size", type=int, default=64)
    parser.add_argument("--sequential-stride", type=int, default=32)
    parser.add_argument("--brute-force-size", type=int, default=72)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed, verbose=False)
    results: dict = {"args": vars(args) | {"output": str(args.output)}, "quality": {}, "speed_s_per_image": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        datamodule = Textures(
            root=work / "Textures",
            category=args.category,
            tile_size=args.image_size,
            num_train=args.num_train,
            num_test_normal=args.num_test_normal,
            num_test_defect=args.num_test_defect,
            train_batch_size=8,
            eval_batch_size=6,
            num_workers=0,
            seed=args.seed,
        )
        datamodule.prepare_data()
        datamodule.setup()
        training = {
            "patches_per_image": args.patches_per_image,
            "ae_epochs": args.ae_epochs,
            "visualizer": False,
            "svm_patches_per_image": args.svm_patches_per_image,
        }
        prior = {
            "prior_epochs": args.prior_epochs,
            "prior_dim": 64,
            "prior_layers": 2,
            "prior_heads": 4,
            "prior_feedforward": 128,
            "restoration_mode": "single_pass",
            "restoration_stride": 8,
        }
        models = {
            "ae": PatchAE(scorer="ocsvm", **training),
            "vq": PatchVQVAE(scorer="restoration", **training, **prior),
        }
        fit_seconds = {}
        for name, model in models.items():
            engine = Engine(
                default_root_dir=work / name, accelerator="cpu", devices=1, logger=False, limit_val_batches=0
            )
            start = time.perf_counter()
            engine.fit(model=model, datamodule=datamodule)
            fit_seconds[name] = time.perf_counter() - start
        start = time.perf_counter()
        fit_quantised_svm(models["vq"], datamodule, args.svm_patches_per_image)
        fit_seconds["vq"] += time.perf_counter() - start
        for model in models.values():
            model.eval()
        for row, (name, scorer) in ROWS.items():
            maps, masks, labels, seconds = test_maps(
                lambda x, m=models[name], s=scorer: m.model.anomaly_map(x, s), datamodule
            )
            results["quality"][row] = {**pixel_metrics(maps, masks, labels), "test_s_per_image": round(seconds, 2)}
            print(row, results["quality"][row], flush=True)  # noqa: T201
        results["fit_s"] = {name: round(value, 1) for name, value in fit_seconds.items()}

        padim = textures_cpu_padim(Padim.configure_pre_processor((args.image_size, args.image_size)), visualizer=False)
        engine = Engine(
            default_root_dir=work / "padim",
            accelerator="cpu",
            devices=1,
            logger=False,
            max_epochs=1,
            limit_val_batches=0,
        )
        engine.fit(model=padim, datamodule=datamodule)
        padim.eval()
        maps, masks, labels, seconds = test_maps(
            lambda x: padim.model(padim.pre_processor.transform(x)).anomaly_map, datamodule
        )
        results["quality"]["PaDiM (EfficientNet-Lite0)"] = {
            **pixel_metrics(maps, masks, labels),
            "test_s_per_image": round(seconds, 2),
        }
        print("PaDiM", results["quality"]["PaDiM (EfficientNet-Lite0)"], flush=True)  # noqa: T201

        image = torch.rand(1, 3, args.speed_size, args.speed_size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            for row, (name, scorer) in ROWS.items():
                model = models[name].model
                start = time.perf_counter()
                model.anomaly_map(image, scorer)
                results["speed_s_per_image"][row] = round(time.perf_counter() - start, 2)
            vq = models["vq"].model
            # Sequential re-conditioning costs one prior pass per resampled code: timed on a few patches only.
            crop = image[..., : args.sequential_size, : args.sequential_size]
            vq.restoration_mode, vq.restoration_stride = "sequential", args.sequential_stride
            count = grid_positions(args.sequential_size, args.sequential_stride).numel() ** 2
            start = time.perf_counter()
            vq.anomaly_map(crop, "restoration")
            results["speed_s_per_image"]["AE discret. restau. sequential, s per patch"] = round(
                (time.perf_counter() - start) / count, 3
            )
            results["speed_s_per_image"]["AE discret. restau. single_pass, s per patch"] = round(
                results["speed_s_per_image"]["AE discret. restau."] / grid_positions(args.speed_size, 8).numel() ** 2, 4
            )
            vq.restoration_mode, vq.restoration_stride = "single_pass", 8
            test_batch = next(iter(datamodule.test_dataloader())).image
            codes = vq.patch_codes(vq.random_patches(test_batch, 50))
            probabilities = vq.prior(codes).softmax(-1).gather(-1, codes[..., None])[..., 0]
            results["improbable_code_fraction_test"] = round(
                float((probabilities < vq.restoration_threshold).float().mean()), 3
            )
            start = time.perf_counter()
            padim.model(padim.pre_processor.transform(image))
            results["speed_s_per_image"]["PaDiM (resized to the model input)"] = round(time.perf_counter() - start, 2)
            print("speed", results["speed_s_per_image"], flush=True)  # noqa: T201

            small = image[..., : args.brute_force_size, : args.brute_force_size]
            results["dense_vs_brute_force"] = {}
            for row, (name, scorer) in ROWS.items():
                model = models[name].model
                start = time.perf_counter()
                dense = model.anomaly_map(small, scorer)
                dense_seconds = time.perf_counter() - start
                start = time.perf_counter()
                reference = brute_force(model, small, scorer)
                brute_seconds = time.perf_counter() - start
                if scorer == "restoration":  # compare on the evaluated grid; the rest is interpolated
                    rows = grid_positions(small.shape[-2], model.restoration_stride)
                    cols = grid_positions(small.shape[-1], model.restoration_stride)
                    dense = dense[..., rows, :][..., cols]
                results["dense_vs_brute_force"][row] = {
                    "dense_s": round(dense_seconds, 3),
                    "brute_force_s": round(brute_seconds, 3),
                    "max_abs_diff": float((dense - reference).abs().max()),
                    "max_abs_value": float(reference.abs().max()),
                }
            print("dense vs brute force", results["dense_vs_brute_force"], flush=True)  # noqa: T201
    text = json.dumps(results, indent=2)
    print(text)  # noqa: T201
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
