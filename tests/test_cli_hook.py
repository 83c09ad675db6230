"""The stock ``anomalib`` command resolves plugin classes by short name through the interpreter-start hook."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anomalib_ext.data
import anomalib_ext.models

PYTHON = sys.executable


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, check=False)


def test_hook_file_is_installed() -> None:
    site_packages = [Path(path) for path in sys.path if path.endswith("site-packages")]
    assert any((folder / "anomalib_ext_autoload.pth").is_file() for folder in site_packages)


def test_importing_anomalib_models_loads_plugin() -> None:
    code = (
        "import sys, anomalib.models; print('anomalib_ext.models' in sys.modules, 'anomalib_ext.data' in sys.modules)"
    )
    assert _python(code).stdout.split() == ["True", "True"]


def test_environment_variable_disables_hook() -> None:
    code = "import sys, anomalib.models; print('anomalib_ext.models' in sys.modules)"
    assert _python(code, ANOMALIB_EXT_DISABLE_AUTOLOAD="1").stdout.split() == ["False"]


def test_plain_interpreter_start_does_not_import_anomalib() -> None:
    code = "import sys; print(any(name.split('.')[0] in {'anomalib', 'torch'} for name in sys.modules))"
    assert _python(code).stdout.split() == ["False"]


def test_broken_plugin_only_warns() -> None:
    """A plugin that fails to import emits a warning; stock Anomalib still imports and works."""
    code = (
        "import warnings, anomalib_ext._autoload as hook\n"
        "hook.PLUGIN_MODULES = ('anomalib_ext_simulated_missing_module',)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from anomalib.models import Padim\n"
        "print(Padim.__name__, any('anomalib-ext' in str(w.message) for w in caught))"
    )
    result = _python(code)
    assert result.stdout.split() == ["Padim", "True"], result.stderr[-2000:]


def test_public_names_are_exported() -> None:
    for module in (anomalib_ext.models, anomalib_ext.data):
        for name in module.__all__:
            assert getattr(module, name).__module__.startswith(module.__name__)


def test_stock_cli_resolves_plugin_datamodule(anomalib_cli, tiny_textures_args, resize_pre_processor, tmp_path) -> None:
    """``anomalib train --data Textures`` (short name) trains and tests stock PaDiM on the offline backbone."""
    result = anomalib_cli(
        "train",
        "--model",
        "Padim",
        "--model.backbone",
        "efficientnet_lite0.anomalib_ext",
        "--model.layers",
        "[blocks.1, blocks.2]",
        "--model.n_features",
        "16",
        "--model.pre_processor",
        resize_pre_processor(64),
        *tiny_textures_args("brick"),
        "--trainer.max_epochs",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--default_root_dir",
        str(tmp_path / "results"),
    )
    assert "pixel_AUROC" in result.stdout
