"""Paper-scale smoke tests (``slow``): every paper config builds with random weights and runs one forward at its size.

Skipped by default (``-m "not slow"`` in ``pyproject.toml``); run them with ``.ci/run --slow tests/test_paper_scale.py``
or ``python -m pytest -m slow tests/test_paper_scale.py -n 0``. Batch 1, on the GPU when there is one, the model's own
test-time forward (for the memory-bank stock models, which need a fit first, the training-mode feature extraction).
The timings and memory of the full dry run come from ``benchmarks/paper_scale.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from anomalib.models.components import MemoryBankMixin

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "paper_scale.py"


def paper_scale() -> ModuleType:
    """The benchmark module (``benchmarks/`` is not a package)."""
    if "paper_scale" not in sys.modules:
        spec = importlib.util.spec_from_file_location("paper_scale", BENCHMARK)
        module = importlib.util.module_from_spec(spec)
        sys.modules["paper_scale"] = module
        spec.loader.exec_module(module)
    return sys.modules["paper_scale"]


# VQ restoration at 1024 x 1024 with stride 8 restores 16384 patches sequentially with the 8-layer prior: hours on a
# CPU (see docs/benchmarks.md, "Paper-scale dry run"), so that forward runs where a GPU is present.
CPU_INFEASIBLE = "PatchVQVAE restoration at 1024 px (16384 sequential patch restorations) needs a GPU"


@pytest.mark.slow
@pytest.mark.parametrize("name", paper_scale().paper_configs())
def test_paper_config_forward(name: str, tmp_path: Path) -> None:
    bench = paper_scale()
    torch.manual_seed(0)
    model, _ = bench.build_model(name, work_dir=tmp_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and getattr(model.model, "scorer", None) == "restoration":
        pytest.skip(CPU_INFEASIBLE)
    model.to(device)
    height, width = bench.input_size(model)
    image = torch.rand(1, 3, height, width, device=device)
    memory_bank = isinstance(model, MemoryBankMixin)
    model.model.train(memory_bank)
    with torch.no_grad():
        output = model.model(image)
    if memory_bank:
        assert torch.isfinite(output).all()
        return
    anomaly_map = output.anomaly_map
    assert anomaly_map.shape[0] == 1
    assert anomaly_map.shape[-2:] == (height, width)
    assert torch.isfinite(anomaly_map).all()
    assert torch.isfinite(output.pred_score).all()
