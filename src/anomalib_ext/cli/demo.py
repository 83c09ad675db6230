"""Train and test a model on the embedded Textures dataset (offline, CPU), print AUROC and write result images."""

from __future__ import annotations

import argparse
from pathlib import Path

DEMO_MODELS = ("padim",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=DEMO_MODELS, default=DEMO_MODELS[0], help="model to train")
    parser.add_argument("--category", choices=("gravel", "brick"), default="gravel", help="Textures category")
    parser.add_argument("--root", type=Path, default=Path("datasets/Textures"), help="where the dataset is built")
    parser.add_argument("--output", type=Path, default=Path("results/demo"), help="results folder (images, checkpoint)")
    parser.add_argument("--image-size", type=int, default=128, help="input size of the model")
    parser.add_argument("--max-epochs", type=int, default=1, help="training epochs")


def build_model(name: str, image_size: int):  # noqa: ANN201 - returns an AnomalibModule
    """The demo's model with the offline EfficientNet-Lite0 backbone and a ``image_size`` pre-processor."""
    from anomalib.models import Padim
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from anomalib_ext.components.backbones import register_offline_timm_tag

    pre_processor = PreProcessor(
        transform=Compose(
            [Resize((image_size, image_size), antialias=True), Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
        ),
    )
    if name == "padim":
        return Padim(
            backbone=register_offline_timm_tag(),
            layers=["blocks.1", "blocks.2"],
            n_features=48,
            pre_processor=pre_processor,
        )
    msg = f"Unknown demo model {name!r}"
    raise ValueError(msg)


def run(args: argparse.Namespace) -> int:
    from anomalib.engine import Engine

    from anomalib_ext.data import Textures

    datamodule = Textures(
        root=args.root, category=args.category, num_workers=0, train_batch_size=16, eval_batch_size=16
    )
    model = build_model(args.model, args.image_size)
    engine = Engine(default_root_dir=args.output, max_epochs=args.max_epochs, accelerator="cpu", devices=1)
    engine.fit(model=model, datamodule=datamodule)
    results = engine.test(model=model, datamodule=datamodule)[0]
    print(f"\n{args.model} on Textures/{args.category}:")
    for key in ("image_AUROC", "pixel_AUROC"):
        print(f"  {key}: {results[key]:.3f}")
    images = sorted(Path(args.output).rglob("images/**/*.png"))
    print(f"  {len(images)} result images under {images[0].parent.parent if images else args.output}")
    return 0
