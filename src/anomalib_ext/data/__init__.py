"""Datamodules of anomalib-ext, resolvable by short name with the stock ``anomalib`` CLI."""

from anomalib_ext.data.textures import Textures

__all__ = ["Textures"]
