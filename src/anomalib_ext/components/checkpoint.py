"""Opt-in slim checkpoints: frozen pretrained weights are referenced, not stored.

A model that mixes in :class:`SlimCheckpointMixin` and takes a constructor argument ``slim_checkpoint: bool = False``
(it reaches the mixin through ``self.hparams``, which Anomalib saves) writes, when the argument is ``True``, checkpoints
without the tensors that its constructor rebuilds identically from its hyper-parameters: the weights and buffers inside
a ``timm`` or ``torchvision`` architecture (e.g. an ImageNet backbone from the hub or a local weights file) that training
left unchanged.

Unchanged is checked, not assumed: each candidate's SHA-256 is taken before training starts (or before a checkpoint is
loaded) and compared when saving, so tensors that changed (an extractor fine-tuned by task pre-training, trained heads,
BatchNorm statistics updated in train mode) stay in the checkpoint. The checkpoint lists every
dropped tensor with its SHA-256 under :data:`REFERENCED_WEIGHTS_KEY`; loading takes these tensors from the freshly
built model, checks their hashes and then loads strictly as usual. A model rebuilt with other weights (random
initialisation, another ``backbone_weights`` file) fails to load with a clear error instead of silently differing.

A checkpoint that stores every tensor (the default, or a slim one in which nothing stayed unchanged) needs no weight
source to reload: its hyper-parameters are saved with the model's :attr:`SlimCheckpointMixin.weight_sources` set to
values that build the same architecture without loading anything (``pre_trained=False``, no weights file), and the
original values are kept under :data:`WEIGHT_SOURCES_KEY`. ``load_from_checkpoint`` then works offline and without the
weights files the model was trained from (no hub download of, e.g., a WideResNet-50 only to overwrite it).
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import torch
from torch import nn

REFERENCED_WEIGHTS_KEY = "anomalib_ext_referenced_weights"
WEIGHT_SOURCES_KEY = "anomalib_ext_weight_sources"
PRETRAINED_PACKAGES = ("timm", "torchvision")

__all__ = [
    "REFERENCED_WEIGHTS_KEY",
    "WEIGHT_SOURCES_KEY",
    "SlimCheckpointMixin",
    "referenced_tensors",
    "tensor_digest",
]


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def referenced_tensors(module: nn.Module, prefix: str = "", inside: bool = False) -> dict[str, torch.Tensor]:
    """Persistent state-dict entries of ``module`` inside a ``timm``/``torchvision`` architecture (or an fx-traced cut).

    These are the candidates for referencing: built by the constructor from hyper-parameters (architecture and weights
    source). Whether one is referenced depends on whether it still equals the constructed tensor, not on
    ``requires_grad``: several extractors (Anomalib's ``TimmFeatureExtractor``) keep ``requires_grad=True`` on weights
    they never update. Shared modules appear under every name the state dict uses.
    """
    inside = (
        inside
        or type(module).__module__.split(".")[0] in PRETRAINED_PACKAGES
        or isinstance(module, torch.fx.GraphModule)  # a traced cut of a timm model (NF-BMR's extractor)
    )
    found: dict[str, torch.Tensor] = {}
    if inside:
        found.update({prefix + name: p for name, p in module._parameters.items() if p is not None})  # noqa: SLF001
        found.update(
            {
                prefix + name: buffer
                for name, buffer in module._buffers.items()  # noqa: SLF001
                if buffer is not None and name not in module._non_persistent_buffers_set  # noqa: SLF001
            }
        )
    for name, child in module._modules.items():  # noqa: SLF001
        if child is not None:
            found.update(referenced_tensors(child, f"{prefix}{name}.", inside))
    return found


class SlimCheckpointMixin:
    """Lightning hooks for slim checkpoints; place it before ``AnomalibModule`` in the bases.

    Slim (tensors referenced) when ``self.hparams["slim_checkpoint"]`` is true. Checkpoints that store every tensor
    have their weight sources replaced by :attr:`weight_sources` in the saved hyper-parameters (see the module
    docstring).
    """

    #: Hyper-parameters that name pretrained weights loaded at construction, with the values that build the same
    #: architecture without loading any (a model with other weight arguments extends it).
    weight_sources: ClassVar[dict[str, Any]] = {"pre_trained": False, "backbone_weights": None}
    _constructed_digests: dict[str, str] | None = None

    @property
    def slim_checkpoint(self) -> bool:
        return bool(self.hparams.get("slim_checkpoint", False))  # type: ignore[attr-defined]

    def _remember_constructed_weights(self) -> None:
        """Hashes of the referable tensors as the constructor built them (taken once per object)."""
        if self._constructed_digests is None:
            tensors = referenced_tensors(self)  # type: ignore[arg-type]
            self._constructed_digests = {key: tensor_digest(tensor) for key, tensor in tensors.items()}

    def on_train_start(self) -> None:
        if self.slim_checkpoint:
            self._remember_constructed_weights()
        super().on_train_start()  # type: ignore[misc]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop the referable tensors that still equal the constructed ones and list them with their hashes (slim),
        or, when every tensor is stored, save weight-free sources in the hyper-parameters."""
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        if self.slim_checkpoint:
            self._reference_unchanged_weights(checkpoint)
        if not checkpoint.get(REFERENCED_WEIGHTS_KEY):
            self._save_weight_free_sources(checkpoint)

    def _save_weight_free_sources(self, checkpoint: dict[str, Any]) -> None:
        hyper_parameters = checkpoint.get("hyper_parameters")
        if hyper_parameters is None:
            return
        sources = {name: value for name, value in self.weight_sources.items() if name in hyper_parameters}
        checkpoint[WEIGHT_SOURCES_KEY] = {name: hyper_parameters[name] for name in sources}
        hyper_parameters.update(sources)

    def _reference_unchanged_weights(self, checkpoint: dict[str, Any]) -> None:
        self._remember_constructed_weights()
        state = checkpoint["state_dict"]
        referenced = {}
        for key, tensor in referenced_tensors(self).items():  # type: ignore[arg-type]
            digest = tensor_digest(tensor)
            if key in state and digest == self._constructed_digests.get(key):  # type: ignore[union-attr]
                referenced[key] = digest
                del state[key]
        checkpoint[REFERENCED_WEIGHTS_KEY] = referenced

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Put the referenced tensors back from this model (freshly built), after checking their hashes."""
        referenced = checkpoint.get(REFERENCED_WEIGHTS_KEY)
        if referenced or self.slim_checkpoint:
            self._remember_constructed_weights()  # the weights are still the constructor's here
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        if not referenced:
            return
        own = self.state_dict()  # type: ignore[attr-defined]
        missing = [key for key in referenced if key not in own]
        differing = [key for key in referenced if key in own and tensor_digest(own[key]) != referenced[key]]
        if missing or differing:
            msg = (
                f"This slim checkpoint references {len(referenced)} frozen tensors that the model rebuilds from its "
                f"hyper-parameters, but {len(missing)} are missing and {len(differing)} differ "
                f"(first: {(missing + differing)[:3]}). Build the model with the same pretrained weights "
                "(pre_trained / backbone_weights) as when the checkpoint was saved."
            )
            raise RuntimeError(msg)
        state = checkpoint["state_dict"]
        for key in referenced:
            state[key] = own[key]
