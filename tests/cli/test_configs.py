"""``anomalib-ext configs list|copy``: the shipped configs, found from any folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomalib_ext.cli import configs
from anomalib_ext.cli.main import main

REPOSITORY_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_lists_every_repository_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs", "list"]) == 0
    printed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    expected = {
        path.relative_to(REPOSITORY_CONFIGS).with_suffix("").as_posix() for path in REPOSITORY_CONFIGS.rglob("*.yaml")
    }
    assert printed == expected
    assert {"uflow_nfa", "stock/padim_textures", "data/crack500"} <= printed


def test_copy_into_folder_and_to_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["configs", "copy", "stock/padim_textures"]) == 0
    assert (tmp_path / "padim_textures.yaml").read_bytes() == (
        REPOSITORY_CONFIGS / "stock/padim_textures.yaml"
    ).read_bytes()
    assert main(["configs", "copy", "uflow_nfa.yaml", "sub/mine.yaml"]) == 0
    assert (tmp_path / "sub/mine.yaml").read_bytes() == (REPOSITORY_CONFIGS / "uflow_nfa.yaml").read_bytes()


def test_copy_refuses_unknown_name_and_overwriting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs", "copy", "no_such_config", str(tmp_path)]) == 2
    assert "Known: " in capsys.readouterr().err
    (tmp_path / "uflow_nfa.yaml").write_text("mine")
    assert main(["configs", "copy", "uflow_nfa", str(tmp_path)]) == 2
    assert (tmp_path / "uflow_nfa.yaml").read_text() == "mine"


def test_package_folder_wins_over_source_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wheel install reads ``anomalib_ext/configs``; only an editable install falls back to ``<clone>/configs``."""
    (tmp_path / "only.yaml").write_text("a: 1\n")
    monkeypatch.setattr(configs, "PACKAGE_CONFIGS", tmp_path)
    assert list(configs.list_configs()) == ["only"]
