"""Task-specific pre-training of a feature extractor on synthetic anomalies (Marc et al., EUSIPCO 2024).

The extractor's stages become the encoder of a three-stage U-Net (paper Fig. 2): the decoder upsamples with transposed
convolutions, concatenating the encoder's skip features, and a 1-channel head predicts the synthetic-anomaly mask; the
network is trained with binary cross-entropy. Two tasks make the masks:

* ``cutpaste``: a jittered rectangle of the same normal image pasted elsewhere (CutPaste, Li et al. 2021);
* ``poisson``: defect regions of another image source (a folder of images with masks, e.g. another dataset's test
  defects) seamlessly cloned into the normal image (Poisson image editing, NORMAL_CLONE as in the paper).

The fine-tuned encoder is saved as a complete timm-keyed safetensors file, so any model that accepts
``backbone_weights`` (MSFlow by default) loads it like ImageNet weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from safetensors.torch import save_file
from torch import nn

from anomalib_ext.components.backbones import available_feature_layers, build_timm_model, create_feature_extractor
from anomalib_ext.components.synthetic import IMAGE_SUFFIXES, MaskedImageSource, cut_paste, poisson_clone, read_rgb

PretrainTask = Literal["cutpaste", "poisson"]
PRETRAIN_TASKS = ("cutpaste", "poisson")
ANOMALY_PRIOR = 0.05
SCALE_REDUCTIONS = (4, 8, 16)  # the three encoder stages MSFlow uses: wide_resnet50_2 layer1/2/3


def default_feature_layers(backbone: str) -> list[str]:
    """The backbone's feature taps at strides 4, 8 and 16 (``layer1..3`` for ResNets, ``blocks.1/2/4`` for EfficientNet-Lite0)."""
    import timm

    model = timm.create_model(backbone, pretrained=False, features_only=True)
    taps = {info["reduction"]: info["module"] for info in model.feature_info.info}  # the last tap per stride
    missing = [reduction for reduction in SCALE_REDUCTIONS if reduction not in taps]
    if missing:
        msg = (
            f"Backbone '{backbone}' has no feature tap at stride(s) {missing}; pass `layers` explicitly "
            f"(available: {available_feature_layers(backbone)})."
        )
        raise ValueError(msg)
    return [taps[reduction] for reduction in SCALE_REDUCTIONS]


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv3x3 -> BatchNorm -> ReLU, the U-Net decoder's fusion block after each skip concatenation."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SegmentationUNet(nn.Module):
    """Three-stage U-Net around an existing feature encoder, predicting a 1-channel anomaly logit map.

    Args:
        encoder: module returning a list of feature maps, finest first (a timm ``features_only`` network, e.g. MSFlow's
            extractor); it is shared, not copied, so training this U-Net fine-tunes that encoder in place.
        channels: channels of the encoder's feature maps, finest first.
        reductions: strides of the feature maps, finest first (e.g. 4, 8, 16).
        decoder_channels: widths of the decoder stages, finest first. ``None``: the skip's channel count at every stage
            (the paper does not give the widths).
        head_channels: width before the 1x1 logit head, at full resolution.
    """

    def __init__(
        self,
        encoder: nn.Module,
        channels: Sequence[int],
        reductions: Sequence[int],
        decoder_channels: Sequence[int] | None = None,
        head_channels: int = 32,
    ) -> None:
        super().__init__()
        if len(channels) != len(reductions) or len(channels) < 2:
            msg = f"The U-Net needs >= 2 encoder stages with channels and strides, got {list(channels)} / {list(reductions)}."
            raise ValueError(msg)
        decoder_channels = list(decoder_channels) if decoder_channels is not None else list(channels)
        self.encoder = encoder
        self.upsample = nn.ModuleList()
        self.fuse = nn.ModuleList()
        coarse_channels = channels[-1]
        for stage in reversed(range(len(channels) - 1)):
            ratio = reductions[stage + 1] // reductions[stage]
            self.upsample.append(nn.ConvTranspose2d(coarse_channels, decoder_channels[stage], ratio, stride=ratio))
            self.fuse.append(conv_bn_relu(decoder_channels[stage] + channels[stage], decoder_channels[stage]))
            coarse_channels = decoder_channels[stage]
        self.head = nn.Sequential(
            nn.ConvTranspose2d(coarse_channels, head_channels, reductions[0], stride=reductions[0]),
            nn.ReLU(inplace=True),
            nn.Conv2d(head_channels, 1, 1),
        )
        # Start from the prior odds of a small anomaly (5 % of the pixels) rather than 50 %, so the first steps learn
        # where anomalies are instead of how rare they are (the focal-loss initialisation of Lin et al., 2017).
        nn.init.constant_(self.head[-1].bias, math.log(ANOMALY_PRIOR / (1 - ANOMALY_PRIOR)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Anomaly logits ``[N, 1, H, W]`` at the input resolution."""
        features = list(self.encoder(images))
        decoded = features[-1]
        for upsample, fuse, skip in zip(self.upsample, self.fuse, reversed(features[:-1]), strict=True):
            decoded = upsample(decoded)
            if decoded.shape[-2:] != skip.shape[-2:]:
                decoded = F.interpolate(decoded, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            decoded = fuse(torch.cat([decoded, skip], dim=1))
        logits = self.head(decoded)
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits


def build_segmentation_unet(
    backbone: str,
    layers: Sequence[str] | None = None,
    pre_trained: bool = True,
    backbone_weights: str | Path | None = None,
    decoder_channels: Sequence[int] | None = None,
) -> SegmentationUNet:
    """A :class:`SegmentationUNet` whose encoder is a trainable timm feature network of ``backbone`` (``layers``)."""
    layers = list(layers) if layers is not None else default_feature_layers(backbone)
    extractor = create_feature_extractor(backbone, layers, pre_trained, backbone_weights, requires_grad=True)
    encoder = extractor.feature_extractor
    return SegmentationUNet(encoder, extractor.out_dims, encoder.feature_info.reduction(), decoder_channels)


def freeze_batch_norm_statistics(module: nn.Module) -> None:
    """Put the BatchNorm layers of ``module`` in eval mode: fine-tuning keeps the ImageNet running statistics."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):  # noqa: SLF001
            layer.eval()


def segmentation_loss(
    network: SegmentationUNet, images: torch.Tensor, masks: torch.Tensor, adapt_batch_norm: bool = False
) -> torch.Tensor:
    """Binary cross-entropy between the U-Net's logits and the synthetic-anomaly masks (paper, section II-B).

    ``adapt_batch_norm=False`` keeps the encoder's BatchNorm running statistics (ImageNet's) frozen; ``True`` lets them
    follow the training images (the normal regions dominate every synthetic image, and the paper credits its gain mostly
    to the normal regions), so the flows later see features normalised with the target domain's statistics.
    ``masks`` is ``[N, H, W]`` or ``[N, 1, H, W]``.
    """
    if not adapt_batch_norm:
        freeze_batch_norm_statistics(network.encoder)
    targets = masks.view(masks.shape[0], 1, *masks.shape[-2:]).to(images.dtype)
    return F.binary_cross_entropy_with_logits(network(images), targets)


class SyntheticAnomalyGenerator:
    """CutPaste or Poisson cloning of one image: a :data:`~anomalib_ext.components.data_synthesis.Synthesiser`.

    ``generator(image, rng)`` takes a ``[H, W, 3]`` float image in ``[0, 1]`` and returns its anomalous version and the
    bool mask of the changed region; wrap a dataset with
    :class:`~anomalib_ext.components.data_synthesis.SyntheticAnomalyDataset` to run it in DataLoader workers.

    Args:
        task: ``cutpaste`` or ``poisson``.
        source: folder of images with masks (see :class:`MaskedImageSource`), required for ``poisson``. All pairs are
            read and checked at construction, so a bad folder fails before training starts.
        cutpaste_variant: CutPaste's ``normal`` rectangle or thin ``scar``.
        poisson_mode: ``normal`` (NORMAL_CLONE, paper) or ``mixed`` (MIXED_CLONE).
    """

    def __init__(
        self,
        task: PretrainTask,
        source: str | Path | None = None,
        cutpaste_variant: Literal["normal", "scar"] = "normal",
        poisson_mode: Literal["normal", "mixed"] = "normal",
    ) -> None:
        if task not in PRETRAIN_TASKS:
            msg = f"Unknown pre-training task '{task}'; expected one of {PRETRAIN_TASKS}."
            raise ValueError(msg)
        self.task = task
        self.cutpaste_variant = cutpaste_variant
        self.poisson_mode = poisson_mode
        self.defects: list[tuple[np.ndarray, np.ndarray]] = []
        if task == "poisson":
            if source is None:
                msg = "The 'poisson' pre-training task needs a source folder of defect images with masks (poisson_source)."
                raise ValueError(msg)
            masked_source = MaskedImageSource(source)
            self.defects = [masked_source[index] for index in range(len(masked_source))]

    def random_defect(self, height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A random source defect (image, mask) resized to ``height x width``.

        Source and destination are brought to the same resolution, so defects keep their relative size (both datasets
        are resized to the network input in the paper).
        """
        source_image, source_mask = self.defects[int(rng.integers(len(self.defects)))]
        if source_mask.shape != (height, width):
            source_image = cv2.resize(source_image, (width, height), interpolation=cv2.INTER_AREA)
            source_mask = cv2.resize(source_mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
        return source_image, source_mask

    def synthesise(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One anomalous version of a ``uint8`` RGB image and the mask of its changed region."""
        if self.task == "cutpaste":
            return cut_paste(image, rng, variant=self.cutpaste_variant)
        source_image, source_mask = self.random_defect(*image.shape[:2], rng)
        if not source_mask.any():
            return cut_paste(image, rng, variant=self.cutpaste_variant)  # defect too thin to survive the resize
        return poisson_clone(image, source_image, source_mask, rng, mode=self.poisson_mode)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Anomalous version of a ``[H, W, 3]`` float image in ``[0, 1]`` (changed pixels quantised to 8 bits) and its mask."""
        array = np.ascontiguousarray(np.clip(np.rint(image * 255), 0, 255).astype(np.uint8))
        output, mask = self.synthesise(array, rng)
        return output.astype(np.float32) / 255, mask


def step_schedule_factor(
    epoch: int,
    total_epochs: int,
    warmup_fraction: float = 0.12,
    warmup_start_factor: float = 0.1,
    milestones: Sequence[float] = (0.7, 0.9),
    decay: float = 1 / 3,
) -> float:
    """MSFlow's learning-rate factor at ``epoch`` (0-based) of ``total_epochs``.

    Linear warm-up from ``warmup_start_factor`` over the first ``warmup_fraction`` of training (1e-5 -> 1e-4 over 12 of 100
    epochs in the paper), then ``x decay`` at each milestone fraction (x1/3 at 70 % and 90 %). Milestones that round down to
    epoch 0 (runs shorter than two epochs) are skipped.
    """
    warmup_epochs = math.floor(warmup_fraction * total_epochs)
    if epoch < warmup_epochs:
        return warmup_start_factor + (1 - warmup_start_factor) * epoch / warmup_epochs
    milestone_epochs = [math.floor(fraction * total_epochs) for fraction in milestones]
    return decay ** sum(
        0 < milestone <= epoch for milestone in milestone_epochs
    )  # a run too short for a milestone keeps lr


def save_encoder_weights(
    encoder: nn.Module,
    path: str | Path,
    backbone: str,
    pre_trained: bool = True,
    backbone_weights: str | Path | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Save a complete timm-keyed ``backbone`` state dict whose encoder tensors are the fine-tuned ones.

    Tensors the encoder does not hold (later stages, classifier) come from the weights the encoder started from
    (``pre_trained`` / ``backbone_weights``), so the file loads into the full timm model as well as into any feature
    extractor of it. ``metadata`` is stored in the safetensors header.
    """
    state = build_timm_model(backbone, pre_trained=pre_trained, backbone_weights=backbone_weights).state_dict()
    tuned = encoder.state_dict()
    unknown = [key for key in tuned if key not in state]
    if unknown:
        msg = f"The encoder's tensors {unknown[:5]} are not keys of timm's '{backbone}': is it a '{backbone}' encoder?"
        raise ValueError(msg)
    for key, tensor in tuned.items():
        state[key] = tensor.detach()
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"backbone": backbone, **(metadata or {})}
    save_file({key: tensor.contiguous().cpu() for key, tensor in state.items()}, str(path), metadata=header)
    return path


class NormalImageFolder(torch.utils.data.Dataset):
    """Every image below ``root`` (recursively), resized to ``image_size`` and returned as a ``[3, H, W]`` float in ``[0, 1]``.

    Files whose name ends in ``_mask`` are skipped, so an MVTec ``train/good`` folder or a plain folder both work.
    """

    def __init__(self, root: str | Path, image_size: tuple[int, int]) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            msg = f"Normal-image folder {self.root} does not exist (expected a folder of defect-free images, e.g. <category>/train/good)."
            raise FileNotFoundError(msg)
        self.paths = sorted(
            path
            for path in self.root.rglob("*")
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.stem.endswith("_mask")
        )
        if not self.paths:
            msg = f"No images ({', '.join(IMAGE_SUFFIXES)}) found under {self.root}."
            raise FileNotFoundError(msg)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = read_rgb(self.paths[index])
        image = cv2.resize(image, (self.image_size[1], self.image_size[0]), interpolation=cv2.INTER_AREA)
        return torch.from_numpy(image).permute(2, 0, 1).float() / 255


def pretrain_segmentation(
    network: SegmentationUNet,
    loader: torch.utils.data.DataLoader,
    epochs: int,
    lr: float = 1e-4,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    device: str | torch.device = "cpu",
    adapt_batch_norm: bool = False,
    log_every_epoch: bool = True,
) -> list[float]:
    """Train ``network`` on synthetic anomalies for ``epochs`` with Adam and MSFlow's schedule; return the epoch mean BCEs.

    ``loader`` iterates a :class:`~anomalib_ext.components.data_synthesis.SyntheticAnomalyDataset` and yields ``(images,
    masks)``: anomalous ``[N, 3, H, W]`` images in ``[0, 1]`` made in its workers and their ``[N, H, W]`` masks. The
    images are normalised with ``mean``/``std`` (ImageNet by default) on ``device`` before the network sees them.
    """
    network.to(device).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: step_schedule_factor(epoch, epochs))
    mean_tensor = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_tensor = torch.tensor(std, device=device).view(1, -1, 1, 1)
    history = []
    for epoch in range(epochs):
        loader.dataset.start_epoch(epoch, loader)  # type: ignore[attr-defined]
        total, count = 0.0, 0
        for images, masks in loader:
            images = (images.to(device, non_blocking=True) - mean_tensor) / std_tensor
            loss = segmentation_loss(network, images, masks.to(device, non_blocking=True), adapt_batch_norm)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(images), count + len(images)
        scheduler.step()
        history.append(total / count)
        if log_every_epoch:
            print(f"pre-training epoch {epoch + 1}/{epochs}: BCE {history[-1]:.4f}", flush=True)  # noqa: T201
    return history
