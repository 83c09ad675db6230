"""Tests of the UFlowNFA model: loss, torch model, MS-CaiT wiring, Lightning/CLI integration, reload, export, DDP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from anomalib.engine import Engine
from anomalib.models.image.uflow.loss import UFlowLoss
from PIL import Image

from anomalib_ext.data import Textures
from anomalib_ext.models import UFlowNFA
from anomalib_ext.models.uflow_nfa import UFlowNFALoss, UFlowNFAModel
from anomalib_ext.models.uflow_nfa import torch_model as torch_model_module

SIZE = (64, 64)
TINY = {"tile_size": 64, "num_train": 8, "num_test_normal": 4, "num_test_defect": 2}


def _tiny_model(**kwargs) -> UFlowNFAModel:
    torch.manual_seed(0)
    return UFlowNFAModel(SIZE, backbone="efficientnet_lite0", pre_trained=False, **kwargs)


def test_loss_is_a_per_image_mean() -> None:
    latents = [torch.randn(1, 4, 8, 8), torch.randn(1, 8, 4, 4)]
    log_jacobian = torch.tensor([3.0])
    single = UFlowNFALoss()(latents, log_jacobian)
    expected = 0.5 * sum(z.square().sum() for z in latents) - 3.0
    torch.testing.assert_close(single, expected)
    doubled = UFlowNFALoss()([torch.cat([z, z]) for z in latents], log_jacobian.repeat(2))
    torch.testing.assert_close(doubled, single)  # the batch size does not reweight the terms
    anomalib = UFlowLoss()([torch.cat([z, z]) for z in latents], log_jacobian.repeat(2))
    assert not torch.allclose(anomalib, single)  # Anomalib 2.7 sums 1/2||z||^2 over the batch


def test_torch_model_outputs_and_invertible_flow() -> None:
    model = _tiny_model()
    assert model.feature_extractor.layers == ["blocks.1", "blocks.2", "blocks.4"]  # strides 4, 8, 16
    image = torch.rand(2, 3, *SIZE)
    model.train()
    latents, log_jacobian = model(image)
    assert [tuple(z.shape[-2:]) for z in latents] == [(16, 16), (8, 8), (4, 4)]
    assert log_jacobian.shape == (2,)
    features = model.feature_extractor(image)
    reconstructed, _ = model.flow(latents, rev=True)
    for original, back in zip(features, reconstructed, strict=True):
        torch.testing.assert_close(back, original, atol=1e-3, rtol=1e-3)
    model.eval()
    with torch.no_grad():
        output = model(image)
    assert output.anomaly_map.shape == (2, 1, *SIZE)
    assert output.pred_mask.shape == (2, *SIZE)
    assert output.pred_mask.dtype == torch.bool
    torch.testing.assert_close(output.pred_score, output.anomaly_map.amax(dim=(-3, -2, -1)))
    assert output.pred_label.tolist() == output.pred_mask.flatten(1).any(1).tolist()
    assert ((output.anomaly_map >= 0) & (output.anomaly_map <= 1)).all()


def test_nfa_threshold_reaches_the_mask() -> None:
    model = _tiny_model(log_nfa_threshold=1e9).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, *SIZE)).pred_mask.all()


def test_bad_configurations_raise() -> None:
    with pytest.raises(ValueError, match="strides double"):
        _tiny_model(layers=["blocks.2", "blocks.6"])
    with pytest.raises(ValueError, match="at least 2 feature scales"):
        _tiny_model(layers=["blocks.2"])
    with pytest.raises(ValueError, match="448"):
        UFlowNFAModel(SIZE, backbone="mcait", pre_trained=False)
    with pytest.raises(ValueError, match="two weight files"):
        UFlowNFAModel((448, 448), backbone="mcait", backbone_weights="one_file.pth")
    with pytest.raises(ValueError, match="fixed input size"):
        UFlowNFA(backbone="efficientnet_lite0", pre_trained=False, pre_processor=False)


def test_mcait_wiring_with_small_cait_stand_ins(monkeypatch: pytest.MonkeyPatch) -> None:
    """MS-CaiT with tiny CaiTs in place of M48/S24 (the real ones are 1.4 GB): per-scale weight files, shapes."""
    requested = []

    def small_cait(name: str, pre_trained: bool = True, backbone_weights: str | None = None) -> torch.nn.Module:
        requested.append((name, backbone_weights))
        size = 448 if name == "cait_m48_448" else 224
        return timm.create_model("cait_xxs24_224", pretrained=False, img_size=size, depth=2, embed_dim=48, num_heads=4)

    monkeypatch.setattr(torch_model_module, "build_timm_model", small_cait)
    model = UFlowNFAModel((448, 448), backbone="mcait", backbone_weights=["m48.pth", "s24.pth"], flow_steps=1).eval()
    assert requested == [("cait_m48_448", "m48.pth"), ("cait_s24_224", "s24.pth")]
    image = torch.rand(1, 3, 448, 448)
    with torch.no_grad():
        features = model.feature_extractor(image)
        output = model(image)
    assert [tuple(f.shape) for f in features] == [(1, 48, 28, 28), (1, 48, 14, 14)]
    assert output.pred_mask.shape == (1, 448, 448)
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())


def test_stock_cli_train_then_test(anomalib_cli, tiny_textures_args, resize_pre_processor, tmp_path: Path) -> None:
    common = [
        "--model",
        "UFlowNFA",
        "--model.backbone",
        "efficientnet_lite0",
        "--model.pre_processor",
        resize_pre_processor(64),
    ]
    anomalib_cli(
        "train",
        *common,
        *tiny_textures_args("gravel"),
        "--trainer.max_epochs",
        "1",
        "--default_root_dir",
        str(tmp_path / "train"),
    )
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
    assert "pixel_nfa_MIoU" in result.stdout
    images = list((tmp_path / "test").rglob("images/**/*.png"))
    assert images
    # the NFA visualizer: the four stock panels (image, gt mask, map overlay, mask overlay) + the -log10 NFA panel
    assert Image.open(images[0]).size == (5 * 256, 256)


def test_checkpoint_reload_identical_and_onnx_export(textures_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = UFlowNFA(
        backbone="efficientnet_lite0", pre_processor=UFlowNFA.configure_pre_processor(SIZE), visualizer=False
    )
    datamodule = Textures(
        root=textures_root, category="gravel", num_workers=0, train_batch_size=4, eval_batch_size=4, **TINY
    )
    engine = Engine(
        default_root_dir=tmp_path, max_epochs=1, limit_train_batches=2, accelerator="cpu", devices=1, logger=False
    )
    engine.fit(model=model, datamodule=datamodule)
    checkpoint = tmp_path / "reload.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    # as for every Anomalib model, a non-default pre-processor (here the input size) is passed again on reload
    reloaded = UFlowNFA.load_from_checkpoint(checkpoint, pre_processor=UFlowNFA.configure_pre_processor(SIZE)).eval()
    model.eval()
    image = torch.rand(2, 3, 80, 80)
    with torch.no_grad():
        expected, actual = model(image), reloaded(image)
    for name, value in expected._asdict().items():
        assert torch.equal(value, getattr(actual, name)), name
    assert torch.isfinite(reloaded.post_processor.pixel_threshold)  # learnt statistics travelled too

    onnx_path = model.to_onnx(tmp_path / "export", input_size=SIZE)
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    probe = torch.rand(1, 3, *SIZE)
    outputs = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, {"input": probe.numpy()}), strict=True)
    )
    with torch.no_grad():
        torch_output = model(probe)
    np.testing.assert_allclose(outputs["anomaly_map"], torch_output.anomaly_map.numpy(), atol=1e-4)
    np.testing.assert_allclose(outputs["pred_score"], torch_output.pred_score.numpy(), atol=1e-4)
    assert outputs["pred_mask"].dtype == np.bool_  # thresholded map in the graph (the NFA tree stays in Python)


def test_ddp_smoke(anomalib_cli, tiny_textures_args, resize_pre_processor, tmp_path: Path) -> None:
    anomalib_cli(
        "fit",
        "--model",
        "UFlowNFA",
        "--model.backbone",
        "efficientnet_lite0",
        "--model.pre_processor",
        resize_pre_processor(64),
        *tiny_textures_args("gravel"),
        "--trainer.max_epochs",
        "1",
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--default_root_dir",
        str(tmp_path),
    )
    assert list(tmp_path.rglob("*.ckpt"))
