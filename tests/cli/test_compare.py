"""The comparison runner (``anomalib-ext compare``): grid parsing, a tiny 2 x 1 x 1 grid end to end, resume, failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from anomalib_ext.cli.compare import (
    GridSpecError,
    cell_arguments,
    cell_fingerprint,
    grid_cells,
    is_finished,
    load_grid,
    run_grid,
    source_hash,
)

BROKEN_BACKBONE = "no_such_backbone_for_compare_test"


def _write_grid(directory: Path, spec: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _padim(pre_processor: str, backbone: str = "efficientnet_lite0.anomalib_ext") -> dict:
    return {
        "class_path": "anomalib.models.Padim",
        "init_args": {
            "backbone": backbone,
            "layers": ["blocks.1", "blocks.2"],
            "n_features": 16,
            "pre_processor": json.loads(pre_processor),
        },
    }


@pytest.fixture
def tiny_grid(tmp_path: Path, textures_root: Path, resize_pre_processor) -> dict:
    """PaDiM (offline EfficientNet-Lite0, 64 px) and a PaDiM with an unknown backbone, on the tiny gravel fixture."""
    return {
        "output": str(tmp_path / "default_output"),
        "seeds": [0],
        "num_examples": 2,
        "overrides": {
            "trainer.max_epochs": 1,
            "trainer.accelerator": "cpu",
            "trainer.devices": 1,
            "model.visualizer": False,
        },
        "datasets": [
            {
                "name": "TinyTextures",
                "data": {
                    "class_path": "anomalib.data.MVTecAD",
                    "init_args": {
                        "root": str(textures_root),
                        "num_workers": 0,
                        "train_batch_size": 4,
                        "eval_batch_size": 4,
                    },
                },
                "categories": ["gravel"],
            }
        ],
        "models": [
            {"name": "PaDiM", "model": _padim(resize_pre_processor(64))},
            {"name": "Broken", "model": _padim(resize_pre_processor(64), backbone=BROKEN_BACKBONE)},
        ],
    }


def _compare(*args: str, cwd: Path, exit_code: int = 0) -> subprocess.CompletedProcess:
    executable = str(Path(sys.executable).with_name("anomalib-ext"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [executable, "compare", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == exit_code, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def test_tiny_grid_writes_tables_and_plots_reports_failures_and_resumes(tmp_path: Path, tiny_grid: dict) -> None:
    grid_path = _write_grid(tmp_path / "spec", tiny_grid)
    output = tmp_path / "out"

    first = _compare(str(grid_path), "--output", str(output), cwd=tmp_path, exit_code=1)  # a cell failed
    assert "[1/2] PaDiM / TinyTextures / gravel / seed 0: started" in first.stdout
    assert "time left unknown" in first.stdout  # nothing measured yet
    assert "[1/2] PaDiM / TinyTextures / gravel / seed 0: ok in" in first.stdout
    assert "[2/2] Broken / TinyTextures / gravel / seed 0: started" in first.stdout
    assert "about" in first.stdout.split("[2/2] Broken")[1]  # PaDiM's time estimates the Broken cell
    assert "[2/2] Broken / TinyTextures / gravel / seed 0: FAILED" in first.stdout
    assert "1/2 cells ok, 1 failed" in first.stdout

    table = pd.read_csv(output / "results.csv")
    assert list(table["model"]) == ["PaDiM", "Broken"]
    assert list(table["status"]) == ["ok", "failed"]
    padim, broken = table.iloc[0], table.iloc[1]
    for metric in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "pixel_MIoU"):
        assert 0.0 <= padim[metric] <= 1.0, metric
        assert pd.isna(broken[metric]), metric
    assert padim["fit_seconds"] > 0 and padim["test_seconds"] > 0 and padim["peak_rss_mib"] > 100
    assert BROKEN_BACKBONE in broken["error"]

    markdown = (output / "results.md").read_text()
    assert "| PaDiM | TinyTextures | gravel | 0 |" in markdown
    assert "failed:" in markdown and BROKEN_BACKBONE in markdown
    assert (
        "| PaDiM | TinyTextures | gravel | 1/1 |" in markdown and "| Broken | TinyTextures | gravel | 0/1 |" in markdown
    )

    plots = output / "plots"
    for name in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "pixel_MIoU", "fit_seconds", "maps_TinyTextures_gravel"):
        with Image.open(plots / f"{name}.png") as image:
            assert image.size[0] > 100 and image.size[1] > 100, name
    padim_cell = output / "cells" / "PaDiM" / "TinyTextures" / "gravel" / "seed0"
    assert (padim_cell / "examples.npz").is_file()
    padim_log = (padim_cell / "log.txt").read_text()
    assert "anomalib train --model" in padim_log.splitlines()[0]
    assert "Testing" in padim_log  # Lightning's progress bar stays in the cell's log
    finished = (padim_cell / "result.json").stat().st_mtime_ns

    second = _compare(str(grid_path), "--output", str(output), cwd=tmp_path, exit_code=1)
    assert "[1/2] PaDiM / TinyTextures / gravel / seed 0: done before, skipped" in second.stdout
    assert "[2/2] Broken / TinyTextures / gravel / seed 0: FAILED" in second.stdout  # failed cells are retried
    assert (padim_cell / "result.json").stat().st_mtime_ns == finished
    assert list(pd.read_csv(output / "results.csv")["status"]) == ["ok", "failed"]


def test_cell_that_outlives_the_timeout_is_reported_as_failed(tmp_path: Path, tiny_grid: dict) -> None:
    tiny_grid["models"] = tiny_grid["models"][:1]
    tiny_grid["timeout"] = 0.5
    grid = load_grid(_write_grid(tmp_path / "spec", tiny_grid))
    lines: list[str] = []

    rows = run_grid(grid, tmp_path / "out", log=lines.append)

    assert [row["status"] for row in rows] == ["failed"]
    assert rows[0]["error"] == "timed out after 0.5 s"
    assert "started" in lines[0] and "FAILED after" in lines[-1] and "timed out after 0.5 s" in lines[-1]
    assert "timed out" in (tmp_path / "out" / "results.md").read_text()


def test_cell_arguments_precedence_and_fingerprint(tmp_path: Path, tiny_grid: dict) -> None:
    config = tmp_path / "spec" / "model.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("model:\n  class_path: anomalib.models.Padim\n")
    tiny_grid["models"] = [{"name": "FromConfig", "config": "model.yaml", "overrides": {"model.n_features": 8}}]
    tiny_grid["datasets"][0]["overrides"] = {"data.train_batch_size": 2}
    tiny_grid["seeds"] = [3, 4]
    grid = load_grid(_write_grid(tmp_path / "spec", tiny_grid))
    cells = grid_cells(grid)
    assert [cell.seed for cell in cells] == [3, 4]

    arguments = cell_arguments(grid, cells[0])
    assert arguments[:2] == ["--config", str(config.resolve())]
    order = [arguments.index(flag) for flag in ("--data", "--trainer.max_epochs", "--data.train_batch_size")]
    assert order == sorted(order)
    assert arguments[-4:] == ["--model.n_features", "8", "--seed_everything", "3"]
    assert arguments[arguments.index("--model.visualizer") + 1] == "false"

    before = cell_fingerprint(grid, cells[0])
    assert before != cell_fingerprint(grid, cells[1])
    config.write_text("model:\n  class_path: anomalib.models.Padim\n  init_args: {n_features: 4}\n")
    assert cell_fingerprint(grid, cells[0]) != before  # an edited config file recomputes the cell


def test_only_runs_the_named_models_and_reports_the_others_from_disk(tmp_path: Path, tiny_grid: dict) -> None:
    grid = load_grid(_write_grid(tmp_path / "spec", tiny_grid))
    with pytest.raises(GridSpecError, match="unknown models"):
        run_grid(grid, tmp_path / "out", only=["NoSuchModel"])
    padim_cell, broken_cell = grid_cells(grid)
    finished = {
        "status": "ok",
        "fingerprint": cell_fingerprint(grid, padim_cell),
        "source_dirs": [],
        "source_hash": source_hash([]),
        "metrics": {"image_AUROC": 0.75},
    }
    for cell, result in ((padim_cell, finished), (broken_cell, {"status": "failed", "error": "an earlier run"})):
        cell.directory(tmp_path / "out").mkdir(parents=True)
        (cell.directory(tmp_path / "out") / "result.json").write_text(json.dumps(result))
    lines: list[str] = []

    rows = run_grid(grid, tmp_path / "out", only=["PaDiM"], log=lines.append)  # starts no process

    assert lines == ["[1/2] PaDiM / TinyTextures / gravel / seed 0: done before, skipped, image AUROC 0.750"]
    assert [(row["model"], row["status"], row["image_AUROC"]) for row in rows] == [
        ("PaDiM", "ok", 0.75),
        ("Broken", "failed", None),
    ]
    assert "| Broken | TinyTextures | gravel | 0 |" in (tmp_path / "out" / "results.md").read_text()

    (padim_cell.directory(tmp_path / "out") / "result.json").unlink()  # as while another runner works on it
    (padim_cell.directory(tmp_path / "out") / "job.json").write_text("{}")
    rows = run_grid(grid, tmp_path / "out", report_only=True, log=lines.append)
    assert [row["status"] for row in rows] == ["unfinished", "failed"] and len(lines) == 1


def test_finished_cell_is_recomputed_when_its_model_source_changes(tmp_path: Path) -> None:
    package = tmp_path / "my_model"
    package.mkdir()
    (package / "torch_model.py").write_text("WIDTH = 1\n")
    result = {"status": "ok", "fingerprint": "f", "source_dirs": [str(package)], "source_hash": source_hash([package])}
    assert is_finished(result, "f")
    assert not is_finished(result, "other settings")
    assert not is_finished({**result, "status": "failed"}, "f")
    (package / "torch_model.py").write_text("WIDTH = 2\n")
    assert not is_finished(result, "f")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"models": []}, "at least one entry"),
        ({"models": [{"name": "A"}]}, "needs a `name` and a `config`"),
        ({"models": [{"name": "A", "config": "missing.yaml"}]}, "not found"),
        ({"datasets": [{"name": "D", "data": {"init_args": {}}}]}, "`data` mapping with `class_path`"),
        ({"seeds": ["zero"]}, "`seeds` must be"),
        ({"colour": "blue"}, "unknown top-level keys"),
    ],
)
def test_malformed_grid_is_rejected_with_a_clear_message(
    tmp_path: Path, tiny_grid: dict, change: dict, message: str
) -> None:
    with pytest.raises(GridSpecError, match=message):
        load_grid(_write_grid(tmp_path, {**tiny_grid, **change}))


def test_dry_run_prints_equivalent_anomalib_commands(tmp_path: Path, tiny_grid: dict, capsys) -> None:
    from anomalib_ext.cli.main import main

    grid_path = _write_grid(tmp_path / "spec", tiny_grid)
    assert main(["compare", str(grid_path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("anomalib train --model") == 2 and "# Broken / TinyTextures / gravel / seed 0" in printed
    assert not (tmp_path / "default_output").exists()
