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


def test_anomalib_models_keeps_its_real_loader() -> None:
    """With the hook on, ``anomalib.models`` serves its resources and source as without it (issue 15, item 2)."""
    code = (
        "import importlib.resources, pkgutil, sys, anomalib.models as m\n"
        "loader = m.__spec__.loader\n"
        "print('anomalib_ext.models' in sys.modules, m.__loader__ is loader, type(loader).__name__)\n"
        "print(len([p for p in importlib.resources.files('anomalib.models').iterdir() if p.name == '__init__.py']))\n"
        "print(pkgutil.get_data('anomalib.models', '__init__.py') is not None, loader.is_package('anomalib.models'))\n"
        "print('import' in loader.get_source('anomalib.models'))"
    )
    result = _python(code)
    assert result.stdout.split() == ["True", "True", "SourceFileLoader", "1", "True", "True", "True"], result.stderr


def test_one_failing_plugin_package_does_not_stop_the_other() -> None:
    code = (
        "import sys, warnings, anomalib_ext._autoload as hook\n"
        "hook.PLUGIN_MODULES = ('anomalib_ext_simulated_missing_module', 'anomalib_ext.data')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import anomalib.models\n"
        "print('anomalib_ext.data' in sys.modules, any('simulated_missing' in str(w.message) for w in caught))"
    )
    result = _python(code)
    assert result.stdout.split() == ["True", "True"], result.stderr[-2000:]


def _unwritable(tmp_path: Path) -> Path:
    """A path below a regular file: no process (not even root) can create it."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    return blocker / "cache"


def test_import_and_cli_help_write_nothing(tmp_path: Path) -> None:
    """Importing the plugin and ``anomalib train --print_config`` write nothing of the plugin's to the home folder.

    Stock dependencies still write their own caches there (matplotlib's font list, OpenVINO's telemetry id); the test
    checks that no weights file and nothing named after the plugin appears.
    """
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "TORCH_HOME": str(home / ".torch")}
    env = {**os.environ, **env}
    env.pop("ANOMALIB_EXT_CACHE_DIR", None)
    code = (
        "import anomalib_ext.models, anomalib_ext.data, timm; print(timm.is_model('efficientnet_lite0.anomalib_ext'))"
    )
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert result.stdout.split() == ["True"], result.stderr[-2000:]
    anomalib = str(Path(PYTHON).with_name("anomalib"))
    command = [anomalib, "train", "--model", "UFlowNFA", "--data", "Textures", "--print_config"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    written = [path for path in home.rglob("*") if path.is_file()]
    assert [path for path in written if "anomalib" in str(path) or path.suffix in {".safetensors", ".pth"}] == []


def test_unwritable_cache_keeps_plugin_classes(tmp_path: Path) -> None:
    """A cache folder that cannot be created does not make plugin models or datamodules disappear (item 3)."""
    anomalib = str(Path(PYTHON).with_name("anomalib"))
    env = {**os.environ, "ANOMALIB_EXT_CACHE_DIR": str(_unwritable(tmp_path))}
    command = [anomalib, "train", "--model", "UFlowNFA", "--data", "Crack500", "--data.root", "x", "--print_config"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "class_path: anomalib_ext.models.UFlowNFA" in result.stdout
    assert "class_path: anomalib_ext.data.Crack500" in result.stdout


def test_importing_plugin_models_first_still_registers_datamodules(tmp_path: Path) -> None:
    """User code that imports ``anomalib_ext.models`` before the CLI parses still gets ``--data Crack500`` (item 4)."""
    code = (
        "import sys, anomalib_ext.models\n"
        "from anomalib.cli.cli import main\n"
        "sys.argv = ['anomalib', 'train', '--model', 'UFlowNFA', '--data', 'Crack500', '--data.root', 'x',"
        " '--print_config']\n"
        "main()"
    )
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "class_path: anomalib_ext.data.Crack500" in result.stdout


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
