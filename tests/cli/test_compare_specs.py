"""The shipped grid specs (``configs/compare/*.yaml``): they parse, every config they name exists, they pair each plugin
model and datamodule with the datasets of its paper, and Anomalib's own CLI parser accepts every model x dataset cell."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from anomalib_ext.cli.compare import cell_arguments, grid_cells, load_grid

SPEC_DIR = Path(__file__).parents[2] / "configs" / "compare"
SPECS = sorted(SPEC_DIR.glob("*.yaml"))
PLUGIN_MODELS = {"UFlowNFA", "MSFlow", "NFBMR", "DenseHybridAD", "PatchAE", "PatchVQVAE"}
STOCK_BASELINES = {"PaDiM", "FastFlow", "PatchCore"}
# Plugin datamodule -> (spec file, the plugin model classes its papers evaluate on it).
PAPER_PAIRINGS = {
    "anomalib_ext.data.Crack500": ("crack500.yaml", {"MSFlow"}),
    "anomalib_ext.data.DAGM": ("dagm.yaml", {"NFBMR"}),
    "anomalib_ext.data.BeanTech": ("beantech.yaml", {"UFlowNFA"}),
}


def _model_class(entry) -> str:  # noqa: ANN001 - a ModelEntry
    """The class a model entry trains: the inline spec's, else its config file's."""
    if entry.model is not None:
        return entry.model["class_path"]
    return yaml.safe_load(entry.config.read_text())["model"]["class_path"]


def test_every_shipped_spec_parses_and_names_existing_configs() -> None:
    assert {"mvtecad.yaml", "textures.yaml", "textures_quick.yaml", "crack500.yaml", "dagm.yaml", "beantech.yaml"} <= {
        spec.name for spec in SPECS
    }
    for spec in SPECS:
        grid = load_grid(spec)  # raises GridSpecError for a missing config file
        assert grid_cells(grid), spec
        for model in grid.models:
            assert model.config is not None or model.model is not None, (spec, model.name)
            if model.config is not None:
                assert model.config.is_file(), (spec, model.name, model.config)
        assert {model.name for model in grid.models} >= STOCK_BASELINES, spec


def test_mvtecad_spec_holds_every_plugin_model_beside_the_stock_baselines() -> None:
    grid = load_grid(SPEC_DIR / "mvtecad.yaml")
    classes = {_model_class(model).rsplit(".", 1)[-1] for model in grid.models}
    assert classes >= PLUGIN_MODELS
    assert {"Padim", "Fastflow", "Patchcore"} <= classes
    assert len(grid.datasets[0].categories) == 15 and len(grid.seeds) >= 3
    restricted = {model.name: model.categories for model in grid.models if model.categories is not None}
    assert set(restricted["MSFlow-CutPaste"]) == {"wood", "tile"}
    assert set(restricted["PatchVQVAE"]) == {"carpet", "wood"}


@pytest.mark.parametrize("datamodule", sorted(PAPER_PAIRINGS))
def test_each_plugin_datamodule_has_a_spec_with_its_paper_models(datamodule: str) -> None:
    spec, paper_models = PAPER_PAIRINGS[datamodule]
    grid = load_grid(SPEC_DIR / spec)
    assert [dataset.data["class_path"] for dataset in grid.datasets] == [datamodule]
    classes = {_model_class(model).rsplit(".", 1)[-1] for model in grid.models}
    assert paper_models <= classes
    assert len(grid.seeds) >= 3


@pytest.mark.parametrize("spec", SPECS, ids=[spec.stem for spec in SPECS])
def test_anomalib_cli_parses_every_model_dataset_pair_of_a_shipped_spec(spec: Path) -> None:
    """Each (model, dataset) pair's first cell, through the parser `anomalib train` uses (nothing is instantiated):
    the grid's datamodule and category win over the model config's, and the model class is the intended one."""
    from anomalib.cli import AnomalibCLI

    class ParseOnly(AnomalibCLI):
        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

    parser = ParseOnly(["fit", "--model", "Padim", "--data", "MVTecAD"], run=False).parser
    grid = load_grid(spec)
    seen = set()
    for cell in grid_cells(grid):
        if (cell.model.name, cell.dataset.name) in seen:
            continue
        seen.add((cell.model.name, cell.dataset.name))
        config = parser.parse_args(["fit", *cell_arguments(grid, cell)])["fit"]
        where = f"{spec.name}: {cell.label}"
        assert config["model"]["class_path"] == _model_class(cell.model), where
        assert config["data"]["class_path"] == cell.dataset.data["class_path"], where
        if cell.category is not None:
            assert config["data"]["init_args"]["category"] == cell.category, where
        assert config["seed_everything"] == cell.seed, where
