"""Each datamodule runs a 1-epoch Padim train + test by short name in the stock ``anomalib`` CLI; data configs are valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import anomalib_ext.data
from tests.data.dataset_layouts import make_beantech, make_crack500_full, make_dagm

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"

PADIM_TINY = [
    "--model",
    "Padim",
    "--model.backbone",
    "resnet18",
    "--model.pre_trained",
    "false",
    "--model.layers",
    "[layer1, layer2]",
]
DATASETS = {
    "Crack500": (make_crack500_full, ["--data.num_train_images", "3"], "Crack500"),
    "DAGM": (make_dagm, ["--data.category", "Class1"], "DAGM/Class1"),
    "BeanTech": (make_beantech, ["--data.category", "03"], "BeanTech/03"),
}


@pytest.mark.parametrize("name", list(DATASETS))
def test_stock_cli_trains_and_tests_padim(name: str, tmp_path: Path, anomalib_cli, resize_pre_processor) -> None:
    make_layout, data_args, results = DATASETS[name]
    root = make_layout(tmp_path / "data")
    result = anomalib_cli(
        "train",
        *PADIM_TINY,
        "--model.pre_processor",
        resize_pre_processor(32),
        "--data",
        name,
        "--data.root",
        str(root),
        *data_args,
        "--data.num_workers",
        "0",
        "--data.train_batch_size",
        "8",
        "--data.eval_batch_size",
        "8",
        "--trainer.max_epochs",
        "1",
        "--default_root_dir",
        str(tmp_path / "results"),
    )
    assert "pixel_AUROC" in result.stdout
    assert list((tmp_path / "results" / "Padim" / results / "latest" / "weights").rglob("*.ckpt"))
    images = (tmp_path / "results" / "Padim" / results / "latest" / "images").rglob("*")
    assert any(path.is_file() for path in images)  # visualisations keep the source names (.PNG for DAGM, .bmp for 03)


@pytest.mark.parametrize("name", list(DATASETS))
def test_data_config_instantiates_and_sets_up(name: str, tmp_path: Path) -> None:
    """``configs/data/<name>.yaml`` holds valid arguments: instantiate it as jsonargparse would and set it up."""
    config = yaml.safe_load((CONFIGS / f"{name.lower()}.yaml").read_text())
    module_name, class_name = config["class_path"].rsplit(".", 1)
    assert class_name == name and module_name == "anomalib_ext.data"
    make_layout, _, _ = DATASETS[name]
    init_args = {**config["init_args"], "root": make_layout(tmp_path), "num_workers": 0}
    if name == "Crack500":
        init_args["num_train_images"] = 3
    datamodule = getattr(anomalib_ext.data, class_name)(**init_args)
    datamodule.prepare_data()
    datamodule.setup()
    assert len(datamodule.train_data) and len(datamodule.test_data) and len(datamodule.val_data)
