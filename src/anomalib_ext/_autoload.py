"""Interpreter-start hook that makes the stock ``anomalib`` CLI resolve plugin classes by short name.

Anomalib has no plugin entry points: jsonargparse resolves ``--model UFlowNFA`` only among classes that are already
imported. The wheel ships ``anomalib_ext_autoload.pth``, which imports this module at interpreter start. It installs a
:data:`sys.meta_path` finder that waits for ``anomalib.models`` and for ``anomalib.cli`` to finish importing (each
once) and then imports those of :mod:`anomalib_ext.models` and :mod:`anomalib_ext.data` not imported yet. Nothing heavy
happens unless Anomalib itself is imported.

The module's ``__loader__`` and ``__spec__.loader`` are the real loader again before the trigger module executes; only
the import system holds the wrapper, so ``importlib.resources``, ``pkgutil.get_data`` and ``get_source`` work.

The order of imports does not matter: when ``anomalib.models`` completes while a plugin module is itself being
imported (user code imported ``anomalib_ext.models`` first), loading now would be circular, so it is skipped and the
second trigger, ``anomalib.cli`` (imported by the ``anomalib`` command before it parses), imports the rest.

Set ``ANOMALIB_EXT_DISABLE_AUTOLOAD=1`` to switch the hook off. A failing plugin import only emits a warning (each
plugin package is imported on its own), so a broken plugin never breaks stock Anomalib.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not ``typing.TYPE_CHECKING``: importing typing alone costs ~10 ms at every interpreter start
if TYPE_CHECKING:  # the hook runs at every interpreter start: import nothing that is not already loaded
    from importlib.machinery import ModuleSpec
    from types import ModuleType

DISABLE_ENV_VAR = "ANOMALIB_EXT_DISABLE_AUTOLOAD"
TRIGGER_MODULES = ("anomalib.models", "anomalib.cli")
PLUGIN_MODULES = ("anomalib_ext.models", "anomalib_ext.data")


def load_plugin() -> None:
    """Import the plugin's models and datamodules not imported yet; warn instead of raising on failure.

    Does nothing while any ``anomalib_ext`` module is mid-import (it imported Anomalib itself: loading now would be
    circular); a later trigger loads the rest.
    """
    import importlib
    import warnings

    if _plugin_import_in_progress():
        return
    for name in PLUGIN_MODULES:
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - a plugin defect must never break stock Anomalib
            warnings.warn(
                f"anomalib-ext: importing {name} failed ({type(error).__name__}: {error}); plugin models are not "
                f"registered with the anomalib CLI. Set {DISABLE_ENV_VAR}=1 to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )


def _plugin_import_in_progress() -> bool:
    """True while some ``anomalib_ext`` module other than this hook is being imported."""
    return any(
        name.startswith("anomalib_ext.")
        and name != __name__
        and getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
    )


class _PluginAfterExecLoader:
    """Delegates to the real loader, puts the real loader back, then loads the plugin once the trigger module is complete.

    Every other attribute (``get_data``, ``get_source``, ``is_package``, ``get_resource_reader``, ...) is forwarded to
    the real loader, so the module behaves as usual even while it executes.
    """

    def __init__(self, wrapped: object) -> None:
        self.wrapped = wrapped

    def __getattr__(self, name: str) -> object:
        if name == "wrapped":  # not set yet (e.g. during copying): no forwarding loop
            raise AttributeError(name)
        return getattr(self.wrapped, name)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__.loader = self.wrapped
        module.__loader__ = self.wrapped
        self.wrapped.exec_module(module)
        load_plugin()


class _TriggerFinder:
    """Meta-path finder that intercepts the first import of each trigger module; removes itself after the last."""

    def __init__(self) -> None:
        self.pending = {name for name in TRIGGER_MODULES if name not in sys.modules}

    def find_spec(self, fullname: str, path: object = None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        if not self.pending and self in sys.meta_path:
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
    if TRIGGER_MODULES[0] in sys.modules:  # Anomalib already imported (e.g. hook imported late): load right away.
        load_plugin()
    if any(isinstance(finder, _TriggerFinder) for finder in sys.meta_path):
        return
    finder = _TriggerFinder()
    if finder.pending:
        sys.meta_path.insert(0, finder)


install()
