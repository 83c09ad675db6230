"""Train and test a model on the embedded Textures dataset (offline, CPU); print what it finds and write result images."""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

# Default training epochs per demo model (CPU-sized: a few minutes on 2 cores).
DEMO_EPOCHS = {"msflow_cutpaste": 16, "padim": 1, "uflow_nfa": 20}
DEMO_IMAGE_SIZE = {"msflow_cutpaste": 128, "padim": 128, "uflow_nfa": 256}  # as each model's Textures CPU config
MSFLOW_PRETRAIN_EPOCHS = 6  # of the 16: U-Net pre-training on CutPaste anomalies, then 10 flow epochs
METRIC_MEANINGS = (
    "image AUROC: how well the image score ranks defective above normal tiles (1 = perfect, 0.5 = chance); "
    "pixel AUROC: the same for the pixels of the anomaly map; defects found: defective test tiles whose predicted "
    "mask overlaps the true defect; false alarms: normal test tiles with any predicted defect pixel; pixel F1: overlap "
    "of predicted and true defect pixels over the whole test set (1 = perfect)."
)
# Warnings that this demo's setting triggers and that say nothing about the result (the demo runs on CPU with
# num_workers=0, without a logger, on a frozen pre-trained backbone; PaDiM has no optimiser). `--verbose` shows them.
QUIET_WARNINGS = (
    r".*does not have many workers.*",
    r".*logger=True.*but have no logger configured.*",
    r".*module\(s\) in eval mode.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*Importing from timm\.models\.layers is deprecated.*",
    r".*anomalib\.models\.components\.dinov2 package is deprecated.*",
    r".*`training_step` returned `None`.*",
    r".*`LightningModule.configure_optimizers` returned `None`.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        choices=sorted(DEMO_EPOCHS),
        default="msflow_cutpaste",
        help="model to train (default: MSFlow with CutPaste extractor pre-training)",
    )
    parser.add_argument("--category", choices=("brick", "gravel"), default="brick", help="Textures category")
    parser.add_argument("--root", type=Path, default=Path("datasets/Textures"), help="where the dataset is built")
    parser.add_argument("--output", type=Path, default=Path("results/demo"), help="results folder (images, checkpoint)")
    parser.add_argument(
        "--image-size", type=int, default=None, help="input size of the model (default: per model, as its CPU config)"
    )
    parser.add_argument("--max-epochs", type=int, default=None, help="training epochs (default: per model)")
    parser.add_argument(
        "--mask",
        choices=("nfa", "threshold"),
        default=None,
        help="msflow_cutpaste's mask: its a-contrario NFA mask (default, uses no labels) or Anomalib's F1-optimal "
        "threshold (tuned on the test split); uflow_nfa always uses its NFA mask, padim a threshold",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--verbose", action="store_true", help="show every warning and Lightning's info messages")


def build_model(name: str, image_size: int, nfa_mask: bool = True):  # noqa: ANN201 - returns an AnomalibModule
    """The demo's model on the offline EfficientNet-Lite0 ImageNet backbone with an ``image_size`` pre-processor;
    ``nfa_mask``: MSFlow's ``pred_mask`` from the a-contrario NFA test instead of a threshold."""
    from anomalib.models import Padim
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from anomalib_ext.components.backbones import register_offline_timm_tag
    from anomalib_ext.models import MSFlow, UFlowNFA

    transform = Compose(
        [Resize((image_size, image_size), antialias=True), Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])],
    )
    taps = ["blocks.1", "blocks.2", "blocks.4"]
    if name == "msflow_cutpaste":  # as configs/msflow_cutpaste_textures_cpu.yaml
        return MSFlow(
            backbone="efficientnet_lite0",
            layers=taps,
            lr=1e-3,
            pretrain_task="cutpaste",
            pretrain_epochs=MSFLOW_PRETRAIN_EPOCHS,
            pretrain_lr=3e-4,
            use_nfa_mask=nfa_mask,
            pre_processor=PreProcessor(transform=transform),
        )
    if name == "uflow_nfa":
        return UFlowNFA(  # as configs/uflow_nfa_textures_cpu.yaml: calibrated null, coarsest scale tested
            backbone="efficientnet_lite0",
            layers=["blocks.2", "blocks.4", "blocks.6"],
            nfa_null="calibrated",
            nfa_scales=[-1],
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


@dataclass
class MaskCounts:
    """What the evaluated ``pred_mask`` finds on the test set."""

    defective: int = 0
    found: int = 0
    normal: int = 0
    false_alarms: int = 0
    true_pixels: int = 0
    false_pixels: int = 0
    missed_pixels: int = 0

    @property
    def pixel_f1(self) -> float:
        denominator = 2 * self.true_pixels + self.false_pixels + self.missed_pixels
        return 2 * self.true_pixels / denominator if denominator else 0.0


def _mask_counter(counts: MaskCounts):  # noqa: ANN202 - a Lightning callback
    from lightning.pytorch.callbacks import Callback

    class MaskCounter(Callback):
        """Counts, per test image, whether the evaluated mask overlaps the ground-truth defect. Batches are read at the
        end of the epoch, after Anomalib's post-processor has added ``pred_mask`` to them in place."""

        def __init__(self) -> None:
            self.batches: list = []

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, ARG002
            self.batches.append(outputs)

        def on_test_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001, ARG002
            for outputs in self.batches:
                if outputs.pred_mask is None or outputs.gt_mask is None:
                    continue
                for label, predicted, truth in zip(outputs.gt_label, outputs.pred_mask, outputs.gt_mask, strict=True):
                    truth = truth.bool().reshape(truth.shape[-2:])
                    predicted = predicted.bool().reshape(truth.shape)
                    if bool(label):
                        counts.defective += 1
                        counts.found += int(bool((predicted & truth).any()))
                    else:
                        counts.normal += 1
                        counts.false_alarms += int(bool(predicted.any()))
                    counts.true_pixels += int((predicted & truth).sum())
                    counts.false_pixels += int((predicted & ~truth).sum())
                    counts.missed_pixels += int((~predicted & truth).sum())
            self.batches = []

    return MaskCounter()


def _quiet() -> None:
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning", "anomalib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # timm warns that the classifier head's weights are unused when PaDiM loads the offline ImageNet weights into a
    # features-only backbone: expected, as the head is not part of a feature extractor.
    logging.getLogger("timm.models._builder").setLevel(logging.ERROR)


def run(args: argparse.Namespace) -> int:
    if not args.verbose:
        _quiet()
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_ext.data import Textures

    if not args.verbose:
        _quiet()  # again: importing Lightning resets its loggers to INFO

    epochs = args.max_epochs or DEMO_EPOCHS[args.model]
    if args.model == "msflow_cutpaste" and epochs <= MSFLOW_PRETRAIN_EPOCHS:
        msg = f"--max-epochs must exceed the {MSFLOW_PRETRAIN_EPOCHS} CutPaste pre-training epochs of msflow_cutpaste."
        raise SystemExit(msg)
    seed_everything(args.seed, verbose=False)
    datamodule = Textures(root=args.root, category=args.category, num_workers=0, train_batch_size=8, eval_batch_size=8)
    nfa_mask = args.model == "uflow_nfa" or (args.model == "msflow_cutpaste" and args.mask != "threshold")
    model = build_model(args.model, args.image_size or DEMO_IMAGE_SIZE[args.model], nfa_mask=nfa_mask)
    counts = MaskCounts()
    engine = Engine(
        default_root_dir=args.output,
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_model_summary=args.verbose,
        callbacks=[_mask_counter(counts)],
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    results = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    seconds = time.perf_counter() - start
    print(
        f"\n{args.model} on Textures/{args.category} ({epochs} epochs, fit + test {seconds:.0f} s, seed {args.seed}):"
    )
    print(
        f"  image AUROC {results['image_AUROC']:.3f} | pixel AUROC {results['pixel_AUROC']:.3f} | "
        f"defects found {counts.found}/{counts.defective} | false alarms {counts.false_alarms}/{counts.normal} | "
        f"pixel F1 {counts.pixel_f1:.3f}"
    )
    print(f"  Meaning: {METRIC_MEANINGS}")
    if nfa_mask:
        print(
            "  Mask: the model's unsupervised a-contrario NFA mask (regions whose -log10 NFA > 0, i.e. fewer than one "
            "such detection expected by chance in a normal image; no labels used)."
            + (
                " The '-log10 NFA' panel of each result image shows that significance map; an empty panel means "
                "nothing was significant on that tile."
                if args.model == "uflow_nfa"
                else ""
            )
        )
    else:
        print(
            "  Mask: the anomaly map thresholded at Anomalib's F1-optimal threshold, learnt on the validation split, "
            "which for this dataset (Anomalib's default) is the test split itself: an optimistic reference, tuned on "
            "the test labels."
        )
    where = Path(engine.trainer.default_root_dir) / "images"  # this run's versioned results folder
    images = sorted(where.rglob("*.png"))
    print(
        f"  Result images: {len(images)} PNGs (input, ground truth, anomaly map, predicted mask) under {where}/ "
        f"(one subfolder per defect type, normal tiles in 'good')"
    )
    return 0
