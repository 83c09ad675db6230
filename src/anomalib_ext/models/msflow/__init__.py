"""MSFlow with task-specific extractor pre-training (CutPaste / Poisson synthetic anomalies)."""

from .lightning_model import MSFlow
from .torch_model import MSFlowModel

__all__ = ["MSFlow", "MSFlowModel"]
