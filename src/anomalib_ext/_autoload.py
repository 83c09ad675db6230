"""Interpreter-start hook that makes the stock ``anomalib`` CLI resolve plugin classes by short name.

Anomalib has no plugin entry points: jsonargparse resolves ``--model UFlowNFA`` only among classes that are already
imported. The wheel ships ``anomalib_ext_autoload.pth``, which imports this module at interpreter start. It installs a
one-shot :data:`sys.meta_path` finder that waits for ``anomalib.models`` to finish importing and then imports
:mod:`anomalib_ext.models` and :mod:`anomalib_ext.data`. Nothing heavy happens unless Anomalib itself is imported.

Set ``ANOMALIB_EXT_DISABLE_AUTOLOAD=1`` to switch the hook off. A failing plugin import only emits a warning, so a
broken plugin never breaks stock Anomalib.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not ``typing.TYPE_CHECKING``: importing typing alone costs ~10 ms at every interpreter start
if TYPE_CHECKING:  # the hook runs at every interpreter start: import nothing that is not already loaded
    from importlib.machinery import ModuleSpec
    from types import ModuleType

DISABLE_ENV_VAR = "ANOMALIB_EXT_DISABLE_AUTOLOAD"
TRIGGER_MODULE = "anomalib.models"
PLUGIN_MODULES = ("anomalib_ext.models", "anomalib_ext.data")


def load_plugin() -> None:
    """Import the plugin's models and datamodules; warn instead of raising on failure."""
    import importlib
    import warnings

    for name in PLUGIN_MODULES:
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - a plugin defect must never break stock Anomalib
            warnings.warn(
                f"anomalib-ext: importing {name} failed ({type(error).__name__}: {error}); plugin models are not "
                f"registered with the anomalib CLI. Set {DISABLE_ENV_VAR}=1 to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
            return


def _plugin_import_in_progress() -> bool:
    """True while some ``anomalib_ext`` module is mid-import (it imported Anomalib itself: loading now would be circular)."""
    return any(
        name.startswith("anomalib_ext.") and getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
    )


class _PluginAfterExecLoader:
    """Delegates to the real loader, then loads the plugin once the trigger module is complete."""

    def __init__(self, wrapped: object) -> None:
        self.wrapped = wrapped

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.wrapped.exec_module(module)
        if not _plugin_import_in_progress():
            load_plugin()


class _TriggerFinder:
    """One-shot meta-path finder: intercepts the first import of ``anomalib.models`` and removes itself."""

    def find_spec(self, fullname: str, path: object = None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != TRIGGER_MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in list(sys.meta_path):
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PluginAfterExecLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Install the trigger finder unless disabled or unnecessary."""
    if os.environ.get(DISABLE_ENV_VAR, "").strip().lower() in {"1", "true", "yes", "on"}:
        return
    if TRIGGER_MODULE in sys.modules:  # Anomalib already imported (e.g. hook imported late): load right away.
        load_plugin()
        return
    if not any(isinstance(finder, _TriggerFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TriggerFinder())


install()
