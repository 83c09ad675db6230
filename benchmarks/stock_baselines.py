"""Stock Anomalib baselines as the benchmarks run them (imported by the scripts in this folder)."""

from __future__ import annotations

from typing import Any

from anomalib.models import Padim
from anomalib.pre_processing import PreProcessor

from anomalib_ext.components.backbones import register_offline_timm_tag


def textures_cpu_padim(pre_processor: PreProcessor, **components: Any) -> Padim:  # noqa: ANN401
    """Stock PaDiM with the settings of ``configs/stock/padim_textures.yaml``: offline ImageNet EfficientNet-Lite0,
    taps ``blocks.1`` + ``blocks.2``, 48 random feature channels; ``components``: evaluator / visualizer etc."""
    return Padim(
        backbone=register_offline_timm_tag(),
        layers=["blocks.1", "blocks.2"],
        n_features=48,
        pre_processor=pre_processor,
        **components,
    )
