"""U-Flow with the a-contrario NFA tree segmentation (Tailanian et al., 2024)."""

from .lightning_model import NFAVisualizer, UFlowNFA
from .loss import UFlowNFALoss
from .torch_model import UFlowNFAModel

__all__ = ["NFAVisualizer", "UFlowNFA", "UFlowNFALoss", "UFlowNFAModel"]
