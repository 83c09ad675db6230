"""Patch auto-encoders (AE / VQ-VAE) with reconstruction, one-class SVM and VQ-restoration scoring (Pinon et al. 2023)."""

from .lightning_model import PatchAE, PatchVQVAE
from .loss import CodePriorLoss, PatchAutoencoderLoss
from .torch_model import CodePrior, OneClassSVMHead, PatchAutoencoderModel, PatchDecoder, PatchEncoder, VectorQuantizer

__all__ = [
    "CodePrior",
    "CodePriorLoss",
    "OneClassSVMHead",
    "PatchAE",
    "PatchAutoencoderLoss",
    "PatchAutoencoderModel",
    "PatchDecoder",
    "PatchEncoder",
    "PatchVQVAE",
    "VectorQuantizer",
]
