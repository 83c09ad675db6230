"""``anomalib-ext pretrain``: fine-tune a backbone on synthetic anomalies and write it as a ``backbone_weights`` file.

Example::

    anomalib-ext pretrain --task poisson --normal-images datasets/MVTecAD/tile/train/good \\
        --poisson-source datasets/MVTecAD/wood --backbone wide_resnet50_2.tv_in1k --backbone-weights wrn50_tv.safetensors \\
        --output tile_poisson_wrn50.safetensors
    anomalib train --model MSFlow --model.backbone_weights tile_poisson_wrn50.safetensors --data MVTecAD --data.category tile
"""

from __future__ import annotations

import argparse
import sys

TASKS = ("cutpaste", "poisson")  # anomalib_ext.components.task_pretraining.PRETRAIN_TASKS, kept import-free for --help


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``pretrain`` sub-command."""
    parser.description = (
        "Task-specific pre-training (U-Net on CutPaste / Poisson synthetic anomalies); writes the encoder weights."
    )
    parser.add_argument("--task", choices=TASKS, required=True, help="synthetic-anomaly task")
    parser.add_argument(
        "--normal-images", required=True, help="folder of defect-free training images (searched recursively)"
    )
    parser.add_argument("--output", required=True, help="weights file to write (.safetensors, timm keys)")
    parser.add_argument(
        "--poisson-source", help="folder of defect images with masks (MVTec category, images/+masks/, <stem>_mask)"
    )
    parser.add_argument(
        "--backbone",
        default="wide_resnet50_2.tv_in1k",
        help="timm CNN (default: wide_resnet50_2.tv_in1k, torchvision's ImageNet weights as MSFlow)",
    )
    parser.add_argument(
        "--layers", nargs="+", help="three encoder taps, finest first (default: the stride 4/8/16 taps)"
    )
    parser.add_argument("--backbone-weights", help="local timm-keyed weights to start from (offline)")
    parser.add_argument("--no-pre-trained", action="store_true", help="start from random weights instead of ImageNet")
    parser.add_argument("--decoder-channels", type=int, nargs="+", help="U-Net decoder widths, finest first")
    parser.add_argument("--image-size", type=int, default=512, help="square input size (default: 512, paper)")
    parser.add_argument("--epochs", type=int, default=400, help="training epochs (default: 400, paper)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (MSFlow schedule)")
    parser.add_argument("--cutpaste-variant", choices=("normal", "scar"), default="normal")
    parser.add_argument("--poisson-mode", choices=("normal", "mixed"), default="normal")
    parser.add_argument(
        "--adapt-batch-norm",
        action="store_true",
        help="let the encoder's BatchNorm statistics follow the training images (default: keep ImageNet's)",
    )
    parser.add_argument(
        "--num-workers", type=int, default=2, help="DataLoader workers, where the synthetic anomalies are made"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    """Pre-train and write the weights file; a usage problem is reported on stderr with exit code 2."""
    import torch

    from anomalib_ext.components.data_synthesis import SyntheticAnomalyDataset
    from anomalib_ext.components.task_pretraining import (
        NormalImageFolder,
        SyntheticAnomalyGenerator,
        build_segmentation_unet,
        pretrain_segmentation,
        save_encoder_weights,
    )

    if args.task == "poisson" and not args.poisson_source:
        print("error: --task poisson needs --poisson-source (a folder of defect images with masks)", file=sys.stderr)  # noqa: T201
        return 2
    if args.epochs < 1:
        print(f"error: --epochs must be >= 1, got {args.epochs}", file=sys.stderr)  # noqa: T201
        return 2
    torch.manual_seed(args.seed)
    try:
        generator = SyntheticAnomalyGenerator(
            args.task,
            source=args.poisson_source,
            cutpaste_variant=args.cutpaste_variant,
            poisson_mode=args.poisson_mode,
        )
        images = NormalImageFolder(args.normal_images, (args.image_size, args.image_size))
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)  # noqa: T201
        return 2
    network = build_segmentation_unet(
        args.backbone,
        layers=args.layers,
        pre_trained=not args.no_pre_trained,
        backbone_weights=args.backbone_weights,
        decoder_channels=args.decoder_channels,
    )
    dataset = SyntheticAnomalyDataset(images, generator, seed=args.seed)  # synthesis runs in the DataLoader workers
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.num_workers,
        drop_last=len(dataset) > args.batch_size,
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    history = pretrain_segmentation(
        network, loader, args.epochs, lr=args.lr, device=device, adapt_batch_norm=args.adapt_batch_norm
    )
    path = save_encoder_weights(
        network.encoder.cpu(),
        args.output,
        backbone=args.backbone,
        pre_trained=not args.no_pre_trained,
        backbone_weights=args.backbone_weights,
        metadata={"task": args.task, "epochs": str(args.epochs), "final_bce": f"{history[-1]:.6f}"},
    )
    print(f"wrote {path} (backbone {args.backbone}, task {args.task}, final BCE {history[-1]:.4f})")  # noqa: T201
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the sub-command on its own: ``python -m anomalib_ext.cli.pretrain``."""
    parser = argparse.ArgumentParser(prog="anomalib-ext pretrain")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
