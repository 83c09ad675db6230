"""The a-contrario NFA mask for exported graphs (ONNX, OpenVINO).

The tree NFA (:func:`anomalib_ext.components.nfa.a_contrario_segmentation`) is data-dependent numpy/scikit-image code
and cannot live in an exported graph. A model that decides its mask with it therefore exports the NFA's *inputs*:

* ``nfa_latent_<l>`` ``[B, C_l, H_l, W_l]``: the latents of every tested scale ``l``;
* ``nfa_null`` ``[B, L, 2]`` float64: per tested scale the null ``(s_l, nu_l)`` of ``||z_l||^2 ~ s_l chi2(nu_l)``;
* ``nfa_settings`` ``[B, 3]`` float64: ``(log_nfa_threshold, clamp_chernoff, exact_tail)`` (the last is 1 for
  ``tail="exact"``, 0 for the Chernoff bound; exports made before it existed have 2 columns and use the bound);

next to ``pred_score`` and ``anomaly_map`` (normalised by the post-processor as usual), and no ``pred_mask`` /
``pred_label``. :class:`NFAInferencer` runs such a graph and applies the NFA step, so that a deployed model gives the
same ``pred_mask`` ``[B, H, W]`` and ``pred_label`` as ``model(x)``. The torch export (``TorchInferencer``) keeps the
whole Lightning module and computes the NFA mask itself.
"""

from __future__ import annotations

import collections
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from anomalib.data import InferenceBatch

from anomalib_ext.components.nfa import a_contrario_segmentation

LATENT_PREFIX = "nfa_latent_"
NULL_OUTPUT = "nfa_null"
SETTINGS_OUTPUT = "nfa_settings"


class _NFAModel(Protocol):
    nfa_scales: list[int]
    anomaly_map_generator: Any

    def null_table(self) -> torch.Tensor: ...


@lru_cache(maxsize=16)
def _outputs_type(scales: tuple[int, ...]) -> type:
    fields = [
        "pred_score",
        "anomaly_map",
        *(f"{LATENT_PREFIX}{scale}" for scale in scales),
        NULL_OUTPUT,
        SETTINGS_OUTPUT,
    ]
    return collections.namedtuple("NFAExportOutputs", fields)  # noqa: PYI024


def nfa_export_outputs(processed: InferenceBatch, latents: list[torch.Tensor], model: _NFAModel) -> tuple:
    """The named outputs of an exported NFA model (see the module docstring); ``model`` is the torch model."""
    batch = latents[0].shape[0]
    null = model.null_table()[model.nfa_scales].to(latents[0].device)
    generator = model.anomaly_map_generator
    settings = torch.tensor(
        [generator.log_nfa_threshold, float(generator.clamp_chernoff), float(generator.tail == "exact")],
        dtype=torch.float64,
        device=null.device,
    )
    return _outputs_type(tuple(model.nfa_scales))(
        processed.pred_score,
        processed.anomaly_map,
        *(latents[scale] for scale in model.nfa_scales),
        null.unsqueeze(0).expand(batch, -1, -1),
        settings.unsqueeze(0).expand(batch, -1),
    )


def apply_nfa(outputs: dict[str, np.ndarray | torch.Tensor]) -> InferenceBatch:
    """``InferenceBatch`` with the NFA ``pred_mask`` ``[B, H, W]`` / ``pred_label`` from an exported graph's outputs."""
    names = sorted(
        (name for name in outputs if name.startswith(LATENT_PREFIX)), key=lambda n: int(n[len(LATENT_PREFIX) :])
    )
    missing = [name for name in ("pred_score", "anomaly_map", NULL_OUTPUT, SETTINGS_OUTPUT) if name not in outputs]
    if not names or missing:
        msg = f"Not an NFA export: outputs {sorted(outputs)} lack {missing or 'the nfa_latent_* outputs'}."
        raise ValueError(msg)
    tensors = {name: torch.as_tensor(np.asarray(value)) for name, value in outputs.items()}
    null = tensors[NULL_OUTPUT][0].double()
    threshold, clamp, *exact = tensors[SETTINGS_OUTPUT][0].tolist()
    anomaly_map = tensors["anomaly_map"]
    _, pred_mask = a_contrario_segmentation(
        [tensors[name] for name in names],
        tuple(anomaly_map.shape[-2:]),
        log_nfa_threshold=threshold,
        clamp_chernoff=bool(clamp),
        null=[tuple(row) for row in null.tolist()],
        tail="exact" if exact and exact[0] else "chernoff",
    )
    return InferenceBatch(
        pred_score=tensors["pred_score"],
        pred_label=pred_mask.flatten(1).any(dim=1),
        anomaly_map=anomaly_map,
        pred_mask=pred_mask,
    )


class NFAInferencer:
    """Runs an exported NFA model (``.onnx`` with onnxruntime, or OpenVINO ``.xml``) and applies the NFA step on its
    outputs.

    Args:
        path: the exported ``model.onnx`` or ``model.xml``.
        device: OpenVINO device (``"CPU"``, ``"GPU"``, ...); ONNX runs on onnxruntime's CPU provider.
        inference_precision: OpenVINO's ``INFERENCE_PRECISION_HINT`` (default ``"f32"``). OpenVINO's CPU plugin
            otherwise runs in bfloat16 on CPUs that support it, which moves the latents, hence ``||z||^2`` and the
            NFA mask (measured on a bfloat16-capable CPU: image scores moved by 0.01-0.03 and the mask changed).

    ``predict(image)`` takes a float image ``[3, H, W]`` or batch ``[B, 3, H, W]`` in [0, 1] (the graph contains the
    pre-processor) and returns an ``InferenceBatch`` like ``model(x)``.
    """

    def __init__(self, path: str | Path, device: str = "CPU", inference_precision: str = "f32") -> None:
        self.path = Path(path)
        if self.path.suffix == ".onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
            input_name = session.get_inputs()[0].name
            names = [output.name for output in session.get_outputs()]
            self._run = lambda image: dict(zip(names, session.run(None, {input_name: image}), strict=True))
        elif self.path.suffix == ".xml":
            import openvino as ov

            core = ov.Core()
            compiled = core.compile_model(
                core.read_model(self.path), device, {"INFERENCE_PRECISION_HINT": inference_precision}
            )
            self._run = lambda image: {output.get_any_name(): value for output, value in compiled(image).items()}
        else:
            msg = f"NFAInferencer reads .onnx or OpenVINO .xml exports, got {self.path.name}."
            raise ValueError(msg)

    def predict(self, image: torch.Tensor | np.ndarray) -> InferenceBatch:
        array = np.asarray(image, dtype=np.float32)
        if array.ndim == 3:
            array = array[None]
        return apply_nfa(self._run(array))
