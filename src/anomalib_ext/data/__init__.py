"""Datamodules of anomalib-ext, resolvable by short name with the stock ``anomalib`` CLI."""

from anomalib_ext.data.beantech import BeanTech
from anomalib_ext.data.crack500 import Crack500
from anomalib_ext.data.dagm import DAGM
from anomalib_ext.data.mvtec import MVTec
from anomalib_ext.data.textures import Textures

__all__ = ["BeanTech", "Crack500", "DAGM", "MVTec", "Textures"]
