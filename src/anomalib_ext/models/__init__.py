"""Anomaly-detection models of anomalib-ext, resolvable by short name with the stock ``anomalib`` CLI."""

__all__: list[str] = []
