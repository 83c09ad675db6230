"""Shared fixtures: a tiny embedded dataset and a runner for the stock ``anomalib`` command.

A stock-CLI test looks like::

    def test_cli(anomalib_cli, tiny_textures_args, resize_pre_processor, tmp_path):
        anomalib_cli("train", "--model", "UFlowNFA", "--model.pre_processor", resize_pre_processor(64),
                     *tiny_textures_args("gravel"), "--trainer.max_epochs", "1", "--default_root_dir", str(tmp_path))

``resize_pre_processor(size)`` gives the JSON of a pre-processor that resizes and applies ImageNet normalisation; the
same JSON works for ``anomalib test``. ``--data MVTecAD --data.root <textures_root>`` reads the same fixture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from anomalib_ext.data.textures import CATEGORIES, Textures

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
TINY_TEXTURES = {"tile_size": 64, "num_train": 8, "num_test_normal": 4, "num_test_defect": 2}


def _resize_pre_processor(size: int, normalize: bool = True) -> str:
    """JSON for ``--model.pre_processor``: resize to ``size`` x ``size`` (then ImageNet normalisation)."""
    transforms = [
        {"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [size, size], "antialias": True}}
    ]
    if normalize:
        transforms.append(
            {
                "class_path": "torchvision.transforms.v2.Normalize",
                "init_args": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
            },
        )
    transform = {"class_path": "torchvision.transforms.v2.Compose", "init_args": {"transforms": transforms}}
    return json.dumps({"class_path": "anomalib.pre_processing.PreProcessor", "init_args": {"transform": transform}})


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """Torch runs single-threaded in tests: CI runs two pytest workers on two cores, and oversubscription is far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def textures_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Textures dataset (MVTec AD layout, 64 px tiles, both categories): 8 train, 4 normal + 6 defective test."""
    root = tmp_path_factory.mktemp("textures")
    for category in CATEGORIES:
        Textures(root=root, category=category, **TINY_TEXTURES).prepare_data()
    return root


@pytest.fixture
def resize_pre_processor() -> Callable[..., str]:
    """``resize_pre_processor(size, normalize=True)`` -> JSON for ``--model.pre_processor`` (resize, ImageNet norm)."""
    return _resize_pre_processor


@pytest.fixture
def tiny_textures_args(textures_root: Path) -> Callable[..., list[str]]:
    """``tiny_textures_args(category="gravel")`` -> ``--data`` arguments selecting the tiny Textures fixture."""

    def args(category: str = "gravel") -> list[str]:
        result = ["--data", "Textures", "--data.root", str(textures_root), "--data.category", category]
        for key, value in TINY_TEXTURES.items():
            result += [f"--data.{key}", str(value)]
        return result + ["--data.num_workers", "0", "--data.train_batch_size", "4", "--data.eval_batch_size", "4"]

    return args


@pytest.fixture
def anomalib_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run the stock ``anomalib`` console script (plugin resolved through the import hook) in a subprocess.

    Returns the completed process; a non-zero exit fails the test with the command's output. ``expect_failure=True``
    returns failing runs instead. The working directory defaults to the test's ``tmp_path``.
    """
    executable = str(Path(sys.executable).with_name("anomalib"))

    def run(
        *args: str, cwd: Path | None = None, expect_failure: bool = False, timeout: int = 600
    ) -> subprocess.CompletedProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            [executable, *args],
            cwd=cwd or tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if (result.returncode == 0) == expect_failure:
            pytest.fail(
                f"anomalib {' '.join(args)} exited {result.returncode}\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
            )
        return result

    return run
