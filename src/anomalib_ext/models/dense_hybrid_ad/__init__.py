"""DenseHybridAD: hybrid generative/discriminative dense anomaly detection with mask-shaped negatives."""

from .lightning_model import DenseHybridAD
from .loss import DenseHybridLoss
from .negatives import NegativePaster
from .torch_model import DenseHybridADModel

__all__ = ["DenseHybridAD", "DenseHybridADModel", "DenseHybridLoss", "NegativePaster"]
