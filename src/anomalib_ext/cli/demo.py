"""Train and test a model on the embedded Textures dataset (offline, CPU), print AUROC and write result images."""

from __future__ import annotations

import argparse
from pathlib import Path

# Default training epochs per demo model (CPU-sized: a few minutes on 2 cores).
DEMO_EPOCHS = {"uflow_nfa": 30, "padim": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=sorted(DEMO_EPOCHS), default="uflow_nfa", help="model to train")
    parser.add_argument("--category", choices=("gravel", "brick"), default="gravel", help="Textures category")
    parser.add_argument("--root", type=Path, default=Path("datasets/Textures"), help="where the dataset is built")
    parser.add_argument("--output", type=Path, default=Path("results/demo"), help="results folder (images, checkpoint)")
    parser.add_argument("--image-size", type=int, default=128, help="input size of the model")
    parser.add_argument("--max-epochs", type=int, default=None, help="training epochs (default: per model)")


def build_model(name: str, image_size: int):  # noqa: ANN201 - returns an AnomalibModule
    """The demo's model on the offline EfficientNet-Lite0 ImageNet backbone with an ``image_size`` pre-processor."""
    from anomalib.models import Padim
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from anomalib_ext.components.backbones import register_offline_timm_tag
    from anomalib_ext.models import UFlowNFA

    transform = Compose(
        [Resize((image_size, image_size), antialias=True), Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])],
    )
    if name == "uflow_nfa":
        return UFlowNFA(
            backbone="efficientnet_lite0",
            layers=["blocks.1", "blocks.2", "blocks.4"],
            pre_processor=PreProcessor(transform=transform),
        )
    if name == "padim":
        return Padim(
            backbone=register_offline_timm_tag(),
            layers=["blocks.1", "blocks.2"],
            n_features=48,
            pre_processor=PreProcessor(transform=transform),
        )
    msg = f"Unknown demo model {name!r}; choose one of {sorted(DEMO_EPOCHS)}."
    raise ValueError(msg)


def run(args: argparse.Namespace) -> int:
    from anomalib.engine import Engine

    from anomalib_ext.data import Textures

    datamodule = Textures(root=args.root, category=args.category, num_workers=0, train_batch_size=8, eval_batch_size=8)
    model = build_model(args.model, args.image_size)
    epochs = args.max_epochs or DEMO_EPOCHS[args.model]
    engine = Engine(default_root_dir=args.output, max_epochs=epochs, accelerator="cpu", devices=1)
    engine.fit(model=model, datamodule=datamodule)
    results = engine.test(model=model, datamodule=datamodule)[0]
    print(f"\n{args.model} on Textures/{args.category} ({epochs} epochs):")
    for key in ("image_AUROC", "pixel_AUROC"):
        print(f"  {key}: {results[key]:.3f}")
    images = sorted(Path(args.output).rglob("images/**/*.png"))
    where = images[0].parent.parent if images else args.output
    print(f"  {len(images)} result images (input, anomaly map, predicted mask) under {where}")
    return 0
