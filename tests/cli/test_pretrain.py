"""``anomalib-ext pretrain``: writes a loadable fine-tuned encoder; usage problems exit 2 with a message naming the files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

from anomalib_ext.cli.main import main
from anomalib_ext.components.backbones import build_timm_model


def _tiny_args(textures_root: Path, output: Path) -> list[str]:
    return [
        "pretrain", "--normal-images", str(textures_root / "gravel" / "train" / "good"), "--output", str(output),
        "--backbone", "efficientnet_lite0", "--image-size", "64", "--epochs", "1", "--batch-size", "4",
    ]  # fmt: skip


def test_help_through_the_console_script() -> None:
    executable = Path(sys.executable).with_name("anomalib-ext")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [str(executable), "pretrain", "--help"], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "--poisson-source" in result.stdout and "--task" in result.stdout


def test_poisson_pretraining_writes_a_loadable_encoder(
    textures_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / "gravel_poisson.safetensors"
    args = _tiny_args(textures_root, output)
    assert main([*args, "--task", "poisson", "--poisson-source", str(textures_root / "brick")]) == 0
    assert "pre-training epoch 1/1: BCE" in capsys.readouterr().out
    tuned = build_timm_model("efficientnet_lite0", backbone_weights=output).state_dict()
    imagenet = build_timm_model("efficientnet_lite0", pre_trained=True).state_dict()
    assert not torch.equal(
        tuned["blocks.1.0.conv_pw.weight"], imagenet["blocks.1.0.conv_pw.weight"]
    )  # fine-tuned stage
    assert torch.equal(tuned["conv_head.weight"], imagenet["conv_head.weight"])  # beyond the encoder: untouched


def test_usage_errors_exit_2_with_a_message(textures_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = _tiny_args(textures_root, tmp_path / "x.safetensors")
    assert main([*args, "--task", "poisson"]) == 2
    assert "needs --poisson-source" in capsys.readouterr().err

    source = tmp_path / "defects"
    source.mkdir()
    image = cv2.imread(str(next((textures_root / "brick" / "test").rglob("*.png"))))
    cv2.imwrite(str(source / "scratch.png"), image)  # side-by-side layout, but no scratch_mask.png
    assert main([*args, "--task", "poisson", "--poisson-source", str(source)]) == 2
    assert "scratch.png has no mask" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_task_choices_match_the_component() -> None:
    from anomalib_ext.cli.pretrain import TASKS
    from anomalib_ext.components.task_pretraining import PRETRAIN_TASKS

    assert TASKS == PRETRAIN_TASKS
