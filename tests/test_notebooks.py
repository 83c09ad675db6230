"""Every notebook in ``notebooks/`` executes headless on its tiny settings (``ANOMALIB_EXT_NOTEBOOK_TINY=1``)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).parents[1] / "notebooks"
EXPECTED = ("01_quickstart", "02_compare", "03_own_data")


def test_the_documented_notebooks_exist() -> None:
    assert tuple(path.stem for path in sorted(NOTEBOOK_DIR.glob("*.ipynb"))) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_executes_headless(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANOMALIB_EXT_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    notebook = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError with the cell's traceback on the first failing cell

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    figures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert figures, f"{name} displayed no figure"
    if name == "02_compare":
        import pandas as pd

        table = pd.read_csv(tmp_path / "results" / "compare_notebook_tiny" / "results.csv")
        assert dict(zip(table["model"], table["status"], strict=True)) == {"UFlowNFA": "ok", "PaDiM": "ok"}, (
            table.to_string()
        )
