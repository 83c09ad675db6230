"""``anomalib-ext demo``: what it prints (scores, what the mask finds, what each number means, where the images are)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from anomalib_ext.cli.demo import DEMO_EPOCHS, build_model
from anomalib_ext.cli.main import main


@pytest.fixture
def logger_levels() -> Iterator[None]:
    """The demo quiets Lightning's and timm's loggers for the process; give the other tests their levels back."""
    names = (
        "lightning.pytorch",
        "lightning.fabric",
        "lightning_fabric",
        "pytorch_lightning",
        "anomalib",
        "timm.models._builder",
    )
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.usefixtures("logger_levels")
def test_demo_prints_what_the_mask_finds_and_points_to_the_images(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    output = tmp_path / "out"
    arguments = ["demo", "--model", "padim", "--image-size", "64", "--root", str(tmp_path / "data")]
    assert main([*arguments, "--output", str(output)]) == 0

    printed = capsys.readouterr().out
    scores = re.search(r"defects found (\d+)/(\d+) \| false alarms (\d+)/(\d+) \| pixel F1 ([0-9.]+)", printed)
    assert scores, printed
    found, defective, false_alarms, normal = (int(group) for group in scores.groups()[:4])
    assert defective == 24 and normal == 16  # the Textures test split: 8 of each of 3 defect types, 16 normal tiles
    assert 0 <= found <= defective and 0 <= false_alarms <= normal and 0.0 <= float(scores.group(5)) <= 1.0
    assert "Meaning: image AUROC" in printed and "tuned on the test labels" in printed
    where = Path(re.search(r"under (\S+)/ ", printed).group(1))
    assert where.is_dir() and any(where.rglob("*.png"))
    assert "GPU available" not in printed


@pytest.mark.parametrize("name", sorted(DEMO_EPOCHS))
def test_every_demo_model_builds_offline(name: str) -> None:
    model = build_model(name, image_size=64)
    assert type(model).__name__ == {"msflow_cutpaste": "MSFlow", "padim": "Padim", "uflow_nfa": "UFlowNFA"}[name]
    if name == "msflow_cutpaste":
        assert model.hparams.pretrain_task == "cutpaste" and model.hparams.use_nfa_mask  # the demo's unsupervised mask
        assert not build_model(name, image_size=64, nfa_mask=False).hparams.use_nfa_mask


@pytest.mark.usefixtures("logger_levels")
def test_msflow_demo_refuses_epochs_that_leave_no_flow_training(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="must exceed the 6 CutPaste pre-training epochs"):
        main(["demo", "--max-epochs", "6", "--root", str(tmp_path / "data"), "--output", str(tmp_path / "out")])
