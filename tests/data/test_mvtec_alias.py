"""``--data MVTec`` (Anomalib 1.x name) behaves as stock ``MVTecAD``."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from anomalib.data import MVTecAD

import anomalib_ext.data.mvtec as mvtec_module
from anomalib_ext.data import MVTec


def test_same_arguments_as_mvtecad() -> None:
    assert inspect.signature(MVTec) == inspect.signature(MVTecAD)
    assert issubclass(MVTec, MVTecAD)


def test_same_samples_and_results_folder_name(textures_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mvtec_module, "_warned", True)
    arguments = {"root": textures_root, "category": "brick", "num_workers": 0, "seed": 0}
    alias, stock = MVTec(**arguments), MVTecAD(**arguments)
    for datamodule in (alias, stock):
        datamodule.setup()
    for split in ("train_data", "val_data", "test_data"):
        assert getattr(alias, split).samples.equals(getattr(stock, split).samples)
    assert alias.name == stock.name == "MVTecAD"  # Engine: <root_dir>/<model>/<datamodule.name>/<category>


def test_warns_once_that_it_is_the_old_name(textures_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mvtec_module, "_warned", False)
    with pytest.warns(FutureWarning, match="old|1.x") as caught:
        MVTec(root=textures_root, category="brick")
        MVTec(root=textures_root, category="gravel")
    assert len([warning for warning in caught if "MVTecAD" in str(warning.message)]) == 1


def test_stock_cli_resolves_mvtec(anomalib_cli) -> None:
    result = anomalib_cli("train", "--model", "Padim", "--data", "MVTec", "--data.category", "carpet", "--print_config")
    data = yaml.safe_load(result.stdout)["data"]
    assert data["class_path"] == "anomalib_ext.data.MVTec"
    stock_defaults = {name: parameter.default for name, parameter in inspect.signature(MVTecAD).parameters.items()}
    assert set(data["init_args"]) == set(stock_defaults)
    assert data["init_args"]["category"] == "carpet"
