"""anomalib-ext: published anomaly-detection methods and industrial datamodules as Anomalib 2.7 plugins.

This top-level module is deliberately import-light: the interpreter-start hook (``_autoload``) imports it on every
Python start. Models live in :mod:`anomalib_ext.models`, datamodules in :mod:`anomalib_ext.data`.
"""

__version__ = "0.1.0"
