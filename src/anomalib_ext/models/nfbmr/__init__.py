"""NF-BMR: normalizing-flow bidirectional mapping residual network (Zhang et al., CMC 2024)."""

from .lightning_model import NFBMR
from .loss import BidirectionalMappingLoss, FlowNLLLoss
from .torch_model import NFBMRModel

__all__ = ["NFBMR", "BidirectionalMappingLoss", "FlowNLLLoss", "NFBMRModel"]
