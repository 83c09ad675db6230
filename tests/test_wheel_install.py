"""The built wheel, installed without ``-e`` into a fresh virtualenv, works with the stock ``anomalib`` command.

Reinstalling torch and Anomalib would take minutes, so the fresh environment gets only the wheel
(``pip --python <fresh> install --no-deps``) plus a ``.pth`` line naming this environment's site-packages for the
dependencies. A plain path in a ``.pth`` is only appended to ``sys.path``: the ``.pth`` files of that folder (among them
this checkout's editable install) are not processed, so ``anomalib_ext`` must come from the wheel, which is asserted.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tests.data.dataset_layouts import make_crack500_full

REPOSITORY = Path(__file__).resolve().parents[1]
ANOMALIB_ENTRY_POINT = (  # exactly what the `anomalib` console script of the Anomalib distribution runs
    "import sys; from importlib.metadata import entry_points; "
    "sys.argv[0] = 'anomalib'; sys.exit(next(iter(entry_points(group='console_scripts', name='anomalib'))).load()())"
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("hatchling") is None, reason="building the wheel offline needs hatchling (dev extra)"
)


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A new virtualenv holding only the anomalib-ext wheel; dependencies come from this environment's site-packages."""
    root = tmp_path_factory.mktemp("wheel")
    run = {"check": True, "capture_output": True, "text": True}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", REPOSITORY],
        **run,
    )
    (wheel,) = (root / "dist").glob("anomalib_ext-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], **run)
    python = root / "venv" / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel], **run)
    site_packages = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], **run
        ).stdout.strip()
    )
    (site_packages / "outer_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return {"root": root, "python": python, "site_packages": site_packages}


def _run(fresh_env: dict[str, Path], *command: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env.update(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, (
        f"{command} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def test_plugin_and_configs_come_from_the_wheel(fresh_env: dict[str, Path], tmp_path: Path) -> None:
    python, site_packages = fresh_env["python"], fresh_env["site_packages"]
    located = _run(fresh_env, python, "-c", "import anomalib_ext; print(anomalib_ext.__file__)", cwd=tmp_path)
    assert Path(located.stdout.strip()).is_relative_to(site_packages)
    script = python.with_name("anomalib-ext")
    listing = _run(fresh_env, script, "configs", "list", cwd=tmp_path).stdout
    assert "uflow_nfa " in listing
    assert str(site_packages / "anomalib_ext" / "configs" / "uflow_nfa.yaml") in listing
    _run(fresh_env, script, "configs", "copy", "uflow_nfa", "mine.yaml", cwd=tmp_path)
    assert (tmp_path / "mine.yaml").read_bytes() == (REPOSITORY / "configs" / "uflow_nfa.yaml").read_bytes()


def test_stock_anomalib_train_resolves_plugin(fresh_env: dict[str, Path], tmp_path: Path) -> None:
    root = make_crack500_full(tmp_path / "crack500")
    command = ["train", "--model", "UFlowNFA", "--data", "Crack500", "--data.root", str(root), "--print_config"]
    result = _run(fresh_env, fresh_env["python"], "-c", ANOMALIB_ENTRY_POINT, *command, cwd=tmp_path)
    config = yaml.safe_load(result.stdout)
    assert config["model"]["class_path"] == "anomalib_ext.models.UFlowNFA"
    assert config["data"]["class_path"] == "anomalib_ext.data.Crack500"
    assert config["data"]["init_args"]["root"] == str(root)


def test_stock_anomalib_export_help(fresh_env: dict[str, Path], tmp_path: Path) -> None:
    result = _run(fresh_env, fresh_env["python"], "-c", ANOMALIB_ENTRY_POINT, "export", "--help", cwd=tmp_path)
    assert "--export_type" in result.stdout
