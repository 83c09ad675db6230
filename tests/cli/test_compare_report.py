"""Reports and exit status of the comparison runner, from hand-written results (no model runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from anomalib_ext.cli.compare import grid_cells, load_grid
from anomalib_ext.cli.compare.report import category_summary, cross_category_summary
from anomalib_ext.cli.main import main

METRIC = "image_AUROC"


def _row(model: str, category: str, seed: int, value: float | None, status: str = "ok") -> dict:
    return {"model": model, "dataset": "D", "category": category, "seed": seed, "status": status, METRIC: value}


def test_per_category_summary_is_mean_and_std_over_seeds_not_over_categories() -> None:
    rows = [_row("A", "x", 0, 0.6), _row("A", "x", 1, 0.8), _row("A", "y", 0, 0.9), _row("A", "y", 1, None, "failed")]

    table = category_summary(rows, [METRIC])

    assert table[0] == ["A", "D", "x", "2/2", "0.700 ± 0.141", ""]  # sample std of (0.6, 0.8)
    assert table[1] == ["A", "D", "y", "1/2", "0.900", "y/seed 1 (failed)"]


def test_cross_category_mean_uses_only_categories_every_model_finished_and_flags_missing_cells() -> None:
    rows = [
        _row("A", "easy", 0, 0.9),
        _row("A", "hard", 0, 0.5),
        _row("B", "easy", 0, 0.8),
        _row("B", "hard", 0, None, "failed"),  # B would look better than A if averaged over what finished
        _row("A", "mid", 0, 0.6),
        _row("A", "mid", 1, 0.8),
        _row("B", "mid", 0, 0.7),
        _row("B", "mid", 1, None, "failed"),
    ]

    table, notes = cross_category_summary(rows, [METRIC])

    by_model = {row[0]: row for row in table}
    assert by_model["A"][2] == "2/3" and by_model["B"][2] == "2/3"  # easy and mid; hard is left out for both
    assert by_model["A"][3] == "0.800"  # mean of easy 0.9 and mid (0.6 + 0.8) / 2
    assert by_model["B"][3] == "0.750"  # mean of easy 0.8 and mid 0.7 (its one finished seed)
    assert by_model["A"][4] == ""
    assert by_model["B"][4].startswith("⚠ 2:") and "hard/seed 0 (failed)" in by_model["B"][4]
    assert notes == ["D/hard left out: no finished cell for B."]


def test_a_model_without_any_finished_cell_is_flagged_without_emptying_the_comparison() -> None:
    rows = [_row("A", "x", 0, 0.9), _row("A", "y", 0, 0.7), _row("B", "x", 0, None, "not run")]
    rows.append(_row("B", "y", 0, None, "failed"))

    table, notes = cross_category_summary(rows, [METRIC])

    assert table[0][:4] == ["A", "D", "2/2", "0.800"]
    assert table[1][2:4] == ["0/2", ""] and table[1][4].startswith("⚠ 2:")
    assert notes == ["D: B has no finished cell; the other models are compared without it."]


def test_models_restricted_to_their_papers_categories_are_averaged_within_their_group() -> None:
    rows = [
        _row("All", "wood", 0, 0.9),
        _row("All", "tile", 0, 0.7),
        _row("All", "bottle", 0, 0.5),
        _row("Paper", "wood", 0, 0.8),
        _row("Paper", "tile", 0, 0.6),
    ]

    table, notes = cross_category_summary(rows, [METRIC])

    assert [row[:4] for row in table] == [
        ["All", "D", "wood, tile, bottle", "0.700"],
        ["Paper", "D", "wood, tile", "0.700"],
    ]
    assert any("different category sets" in note for note in notes)


@pytest.fixture
def two_model_grid(tmp_path: Path) -> Path:
    spec = {
        "datasets": [{"name": "D", "data": {"class_path": "anomalib.data.MVTecAD"}, "categories": ["x", "y"]}],
        "models": [
            {"name": "A", "model": "anomalib.models.Padim"},
            {"name": "B", "model": "anomalib.models.Padim", "categories": ["x"]},
        ],
        "seeds": [0, 1],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_model_entry_with_categories_runs_only_on_those(two_model_grid: Path) -> None:
    cells = grid_cells(load_grid(two_model_grid))
    assert [(cell.model.name, cell.category, cell.seed) for cell in cells] == [
        ("A", "x", 0),
        ("B", "x", 0),
        ("A", "x", 1),
        ("B", "x", 1),
        ("A", "y", 0),
        ("A", "y", 1),
    ]


def test_exit_status_is_1_when_a_cell_failed_and_the_table_is_still_written(two_model_grid: Path) -> None:
    grid = load_grid(two_model_grid)
    output = two_model_grid.parent / "out"
    for cell in grid_cells(grid):
        cell.directory(output).mkdir(parents=True)
        result = {"status": "ok", "metrics": {METRIC: 0.5 + 0.1 * cell.seed}}
        (cell.directory(output) / "result.json").write_text(json.dumps(result))
    arguments = ["compare", str(two_model_grid), "--output", str(output), "--report-only"]
    assert main(arguments) == 0

    failed = grid_cells(grid)[-1].directory(output) / "result.json"
    failed.write_text(json.dumps({"status": "failed", "error": "boom"}))
    assert main(arguments) == 1
    markdown = (output / "results.md").read_text()
    assert "failed: boom" in markdown and "⚠ 1: y/seed 1 (failed)" in markdown
    assert "| A | D | x | 2/2 | 0.550 ± 0.071 |" in markdown
