"""DenseHybridAD through Anomalib: stock CLI train/test, checkpoint reload, ONNX export, DDP smoke (random init, 64 px)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.engine import Engine
from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights, deeplabv3_resnet50

from anomalib_ext.data import Textures
from anomalib_ext.models import DenseHybridAD

SIZE = (64, 64)
TINY = {"tile_size": 64, "num_train": 8, "num_test_normal": 4, "num_test_defect": 2}
FAST = ["--data.train_batch_size", "2", "--trainer.limit_train_batches", "2", "--trainer.max_epochs", "1"]


def test_stock_cli_train_then_test(
    anomalib_cli, tiny_textures_args, resize_pre_processor, textures_root: Path, tmp_path: Path
) -> None:
    # negatives: the brick category's defect masks (MVTec layout) pasted into gravel
    common = [
        "--model",
        "DenseHybridAD",
        "--model.pre_trained",
        "false",
        "--model.pre_processor",
        resize_pre_processor(64),
    ]
    train_args = ["--model.negative_source", str(textures_root / "brick"), *tiny_textures_args("gravel"), *FAST]
    anomalib_cli("train", *common, *train_args, "--default_root_dir", str(tmp_path / "train"))
    checkpoints = list((tmp_path / "train").rglob("*.ckpt"))
    assert len(checkpoints) == 1
    result = anomalib_cli(
        "test",
        *common,
        *tiny_textures_args("gravel"),
        "--ckpt_path",
        str(checkpoints[0]),
        "--default_root_dir",
        str(tmp_path / "test"),
    )
    assert "pixel_AUROC" in result.stdout
    assert list((tmp_path / "test").rglob("images/**/*.png"))  # stock visualizer panels


def test_training_step_moves_only_trainable_parameters_and_checkpoint_reload_is_identical(
    textures_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trained with ``pre_trained=True`` (a stand-in for torchvision's download); the reload must work offline."""
    torch.manual_seed(0)
    downloaded = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=False).state_dict()
    monkeypatch.setattr(DeepLabV3_ResNet50_Weights, "get_state_dict", lambda *args, **kwargs: downloaded)
    model = DenseHybridAD(
        pre_trained=True,
        negative_shape="rectangle",
        pre_processor=DenseHybridAD.configure_pre_processor(SIZE),
        visualizer=False,
    )
    initial = {name: value.clone() for name, value in model.model.state_dict().items()}
    datamodule = Textures(
        root=textures_root, category="gravel", num_workers=0, train_batch_size=2, eval_batch_size=4, **TINY
    )
    engine = Engine(
        default_root_dir=tmp_path, max_epochs=1, limit_train_batches=2, accelerator="cpu", devices=1, logger=False
    )
    engine.fit(model=model, datamodule=datamodule)
    changed = {
        ".".join(name.split(".")[:3])
        for name, value in model.model.state_dict().items()
        if not torch.equal(initial[name], value)
    }
    # freeze="all": only the final BN-ReLU-Conv of both heads moves (weights and BN running statistics)
    assert changed == {
        "segmenter.classifier.2",
        "segmenter.classifier.4",
        "outlier_head.0.weight",
        "outlier_head.0.bias",
        "outlier_head.0.running_mean",
        "outlier_head.0.running_var",
        "outlier_head.0.num_batches_tracked",
        "outlier_head.2.weight",
        "outlier_head.2.bias",
    }

    checkpoint = tmp_path / "reload.ckpt"
    engine.trainer.save_checkpoint(checkpoint)

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(DeepLabV3_ResNet50_Weights, "get_state_dict", offline)
    reloaded = DenseHybridAD.load_from_checkpoint(
        checkpoint, pre_processor=DenseHybridAD.configure_pre_processor(SIZE)
    ).eval()
    assert reloaded.hparams.negative_shape == "rectangle" and not reloaded.hparams.pre_trained
    model.eval()
    image = torch.rand(2, 3, 80, 80)
    with torch.no_grad():
        expected, actual = model(image), reloaded(image)
    for name, value in expected._asdict().items():
        assert torch.equal(value, getattr(actual, name)), name
    exported = torch.load(model.to_torch(tmp_path / "export"), map_location="cpu", weights_only=False)["model"]
    with torch.no_grad():
        assert torch.equal(exported.eval()(image).anomaly_map, expected.anomaly_map)  # torch.save of the whole module


def test_onnx_export_matches_torch(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnxruntime")
    model = DenseHybridAD(
        pre_trained=False, pre_processor=DenseHybridAD.configure_pre_processor(SIZE), visualizer=False
    ).eval()
    onnx_path = model.to_onnx(tmp_path / "export", input_size=SIZE)
    session = onnx.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    probe = torch.rand(1, 3, *SIZE)
    outputs = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, {"input": probe.numpy()}), strict=True)
    )
    with torch.no_grad():
        torch_output = model(probe)
    np.testing.assert_allclose(outputs["anomaly_map"], torch_output.anomaly_map.numpy(), atol=1e-4)
    np.testing.assert_allclose(outputs["pred_score"], torch_output.pred_score.numpy(), atol=1e-4)
    assert outputs["pred_mask"].shape == (1, 1, *SIZE)


def test_ddp_several_steps(anomalib_cli, tiny_textures_args, resize_pre_processor, tmp_path: Path) -> None:
    anomalib_cli(
        "fit",
        "--model",
        "DenseHybridAD",
        "--model.pre_trained",
        "false",
        "--model.pre_processor",
        resize_pre_processor(64),
        *tiny_textures_args("gravel"),
        *FAST,
        "--data.train_batch_size",
        "1",
        "--trainer.limit_train_batches",
        "3",  # 3 optimiser steps per rank
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--default_root_dir",
        str(tmp_path),
    )
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert {int(param["step"]) for param in state["optimizer_states"][0]["state"].values()} == {3}
