"""Anomaly-detection models of anomalib-ext, resolvable by short name with the stock ``anomalib`` CLI.

Importing this package also registers the timm name ``efficientnet_lite0.anomalib_ext`` (offline ImageNet weights), so
stock Anomalib models such as ``Padim`` can use the offline backbone too.
"""

from anomalib_ext.components.backbones import register_offline_timm_tag

register_offline_timm_tag()

from anomalib_ext.models.dense_hybrid_ad import DenseHybridAD  # noqa: E402
from anomalib_ext.models.msflow import MSFlow  # noqa: E402
from anomalib_ext.models.nfbmr import NFBMR  # noqa: E402
from anomalib_ext.models.patch_vqvae import PatchAE, PatchVQVAE  # noqa: E402
from anomalib_ext.models.uflow_nfa import UFlowNFA  # noqa: E402

__all__: list[str] = ["DenseHybridAD", "MSFlow", "NFBMR", "PatchAE", "PatchVQVAE", "UFlowNFA"]
