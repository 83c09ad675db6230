"""Tests of the UFlowNFA model: loss, torch model, MS-CaiT wiring, Lightning/CLI integration, reload, export, DDP."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import timm
import torch
from anomalib.data import ImageBatch
from anomalib.deploy import TorchInferencer
from anomalib.engine import Engine
from anomalib.models.image.uflow.loss import UFlowLoss
from PIL import Image

from anomalib_ext.components.nfa import log10_number_of_tests, moment_matched_null
from anomalib_ext.data import Textures
from anomalib_ext.deploy import NFAInferencer
from anomalib_ext.models import UFlowNFA
from anomalib_ext.models.uflow_nfa import UFlowNFALoss, UFlowNFAModel
from anomalib_ext.models.uflow_nfa import torch_model as torch_model_module
from anomalib_ext.models.uflow_nfa.lightning_model import CNN_INPUT_SIZE

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
    assert model.feature_extractor.layers == ["blocks.2", "blocks.4", "blocks.6"]  # strides 8, 16, 32
    image = torch.rand(2, 3, *SIZE)
    model.train()
    latents, log_jacobian = model(image)
    assert [tuple(z.shape[-2:]) for z in latents] == [(8, 8), (4, 4), (2, 2)]
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
    with pytest.raises(ValueError, match="nfa_tail"):
        _tiny_model(nfa_tail="gaussian")


def test_mcait_wiring_with_small_cait_stand_ins(monkeypatch: pytest.MonkeyPatch) -> None:
    """MS-CaiT with tiny CaiTs in place of M48/S24 (the real ones are 1.4 GB): per-scale weight files, shapes."""
    requested = []

    def small_cait(name: str, pre_trained: bool = True, backbone_weights: str | None = None) -> torch.nn.Module:
        requested.append((name, backbone_weights))
        size, depth = (448, 41) if name == "cait_m48_448" else (224, 21)  # the blocks MS-CaiT uses
        return timm.create_model(
            "cait_xxs24_224", pretrained=False, img_size=size, depth=depth, embed_dim=16, num_heads=2
        )

    monkeypatch.setattr(torch_model_module, "build_timm_model", small_cait)
    model = UFlowNFAModel((448, 448), backbone="mcait", backbone_weights=["m48.pth", "s24.pth"], flow_steps=1).eval()
    assert requested == [("cait_m48_448", "m48.pth"), ("cait_s24_224", "s24.pth")]
    image = torch.rand(1, 3, 448, 448)
    with torch.no_grad():
        features = model.feature_extractor(image)
        output = model(image)
    assert [tuple(f.shape) for f in features] == [(1, 16, 28, 28), (1, 16, 14, 14)]
    assert output.pred_mask.shape == (1, 448, 448)
    assert not any(p.requires_grad for p in model.feature_extractor.parameters())
    paper = UFlowNFA(backbone="mcait", pre_trained=False, flow_steps=1).model  # the paper's NFA: chi2, every scale
    assert (paper.nfa_null, paper.nfa_scales, paper.input_size) == ("chi2", [0, 1], (448, 448))


def test_cnn_defaults() -> None:
    """A CNN backbone: 256 px, taps at strides 8/16/32, calibrated null, the coarsest scale tested (explicit
    choices are kept)."""
    module = UFlowNFA(backbone="efficientnet_lite0", pre_trained=False)
    assert module.hparams["layers"] == ["blocks.2", "blocks.4", "blocks.6"]  # saved in checkpoints as resolved
    model = module.model
    assert model.input_size == (256, 256)
    assert model.feature_extractor.layers == ["blocks.2", "blocks.4", "blocks.6"]
    assert (model.nfa_null, model.nfa_scales) == ("calibrated", [2])
    assert [shape[1:] for shape in model.latent_shapes] == [(32, 32), (16, 16), (8, 8)]
    explicit = UFlowNFA(backbone="efficientnet_lite0", pre_trained=False, nfa_scales=[0, 1, 2], nfa_null="chi2").model
    assert (explicit.nfa_null, explicit.nfa_scales) == ("chi2", [0, 1, 2])


def test_mcait_with_too_few_blocks_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def shallow_cait(name: str, pre_trained: bool = True, backbone_weights: str | None = None) -> torch.nn.Module:
        size = 448 if name == "cait_m48_448" else 224
        return timm.create_model("cait_xxs24_224", pretrained=False, img_size=size, depth=2, embed_dim=16, num_heads=2)

    monkeypatch.setattr(torch_model_module, "build_timm_model", shallow_cait)
    with pytest.raises(ValueError, match="blocks 0..40 of cait_m48_448, but this model has only 2"):
        UFlowNFAModel((448, 448), backbone="mcait", pre_trained=False, flow_steps=1)


def test_cnn_backbone_frozen_and_out_of_the_optimizer() -> None:
    model = UFlowNFA(backbone="efficientnet_lite0", pre_trained=False, lr=2e-4, weight_decay=0.0)
    assert model.input_size == CNN_INPUT_SIZE  # not the MS-CaiT 448 px
    backbone = list(model.model.feature_extractor.extractor.parameters())
    assert backbone
    assert not any(p.requires_grad for p in backbone)
    model.trainer = SimpleNamespace(estimated_stepping_batches=123)  # what Lightning gives configure_optimizers
    config = model.configure_optimizers()
    optimised = {id(p) for group in config["optimizer"].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in backbone}
    assert config["optimizer"].param_groups[0]["lr"] == 2e-4
    assert config["optimizer"].param_groups[0]["weight_decay"] == 0.0
    assert config["lr_scheduler"]["scheduler"].total_iters == 123
    assert config["lr_scheduler"]["interval"] == "step"


def test_validation_step_does_not_run_the_nfa(monkeypatch: pytest.MonkeyPatch) -> None:
    model = UFlowNFA(
        backbone="efficientnet_lite0", pre_trained=False, pre_processor=UFlowNFA.configure_pre_processor(SIZE)
    )
    model.eval()

    def forbidden(*args, **kwargs) -> None:
        raise AssertionError("validation ran the NFA")

    monkeypatch.setattr(model.model.anomaly_map_generator, "segment", forbidden)
    batch = ImageBatch(image=torch.rand(2, 3, *SIZE), gt_label=torch.tensor([0, 1]))
    with torch.no_grad():
        output = model.validation_step(batch)
    assert output.anomaly_map.shape[-2:] == SIZE
    assert output.pred_mask is None


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


def _fit_tiny(textures_root: Path, tmp_path: Path, **kwargs) -> tuple[UFlowNFA, Engine]:
    torch.manual_seed(0)
    model = UFlowNFA(
        backbone="efficientnet_lite0",
        pre_processor=UFlowNFA.configure_pre_processor(SIZE),
        visualizer=False,
        **kwargs,
    )
    datamodule = Textures(
        root=textures_root, category="gravel", num_workers=0, train_batch_size=4, eval_batch_size=4, **TINY
    )
    engine = Engine(default_root_dir=tmp_path, max_epochs=1, accelerator="cpu", devices=1, logger=False)
    engine.fit(model=model, datamodule=datamodule)
    return model, engine


def test_calibrated_null_reload_and_deployment_parity(
    textures_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Calibration is fitted in fit, saved and reloaded; ONNX / OpenVINO (NFAInferencer) and torch exports give
    model(x)'s mask
    (with the exact chi-square tail, which the export carries in its settings)."""
    # a threshold just below log10 N_tests: any region with PFA < 0.1 is flagged, so the masks compared are not empty
    threshold = log10_number_of_tests((8 * 8, 2 * 2)) - 1.0
    model, engine = _fit_tiny(textures_root, tmp_path, log_nfa_threshold=threshold, nfa_tail="exact", nfa_scales=[0, 2])
    assert model.model.anomaly_map_generator.tail == "exact"
    assert model.model.nfa_null == "calibrated"  # the CNN default
    assert bool(model.model.null_calibrated)
    model.eval()
    with torch.no_grad():  # the stored null = the moments of every scale on the held-out images
        held_out, _ = model.model.encode(torch.stack(list(model._calibration_images.values())))
    squared = [latent.double().square().sum(dim=1) for latent in held_out]
    scale, dof = moment_matched_null(
        torch.stack([q.mean() for q in squared]), torch.stack([q.var(unbiased=False) for q in squared])
    )
    torch.testing.assert_close(model.model.null_scale, scale)
    torch.testing.assert_close(model.model.null_dof, dof)
    checkpoint = tmp_path / "reload.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    # as for every Anomalib model, a non-default pre-processor (here the input size) is passed again on reload
    reloaded = UFlowNFA.load_from_checkpoint(checkpoint, pre_processor=UFlowNFA.configure_pre_processor(SIZE)).eval()
    torch.testing.assert_close(reloaded.model.null_table(), model.model.null_table(), rtol=0, atol=0)
    assert reloaded.model.anomaly_map_generator.tail == "exact"
    model.eval()
    image = torch.rand(2, 3, 80, 80)
    with torch.no_grad():
        expected, actual = model(image), reloaded(image)
    for name, value in expected._asdict().items():
        assert torch.equal(value, getattr(actual, name)), name
    assert expected.pred_mask.any()
    assert not expected.pred_mask.all()
    assert torch.isfinite(reloaded.post_processor.pixel_threshold)  # learnt statistics travelled too

    probe = torch.rand(2, 3, *SIZE)
    with torch.no_grad():
        torch_output = model(probe)
    assert torch_output.pred_mask.any()
    with caplog.at_level(logging.WARNING):
        onnx_path = model.to_onnx(tmp_path / "export", input_size=SIZE)
    assert "NFA mask is not part of the graph" in caplog.text  # said at export time
    outputs = [output.name for output in onnx.load(str(onnx_path)).graph.output]
    assert "pred_mask" not in outputs
    assert {"pred_score", "anomaly_map", "nfa_latent_0", "nfa_latent_2", "nfa_null", "nfa_settings"} <= set(outputs)
    deployed = NFAInferencer(onnx_path).predict(probe.numpy())
    with torch.no_grad():
        chernoff = model.model.anomaly_map_generator
        chernoff.tail = "chernoff"
        chernoff_mask = model(probe).pred_mask
        chernoff.tail = "exact"
    assert not torch.equal(chernoff_mask, torch_output.pred_mask)  # the tail changes the mask: parity is not vacuous
    assert deployed.pred_mask.shape == torch_output.pred_mask.shape == (2, *SIZE)
    assert torch.equal(deployed.pred_mask, torch_output.pred_mask)
    assert torch.equal(deployed.pred_label, torch_output.pred_label)
    np.testing.assert_allclose(deployed.anomaly_map, torch_output.anomaly_map.numpy(), atol=1e-4)
    np.testing.assert_allclose(deployed.pred_score, torch_output.pred_score.numpy(), atol=1e-4)

    openvino_path = model.to_openvino(tmp_path / "export_openvino", input_size=SIZE)
    openvino = NFAInferencer(openvino_path).predict(probe.numpy())
    assert torch.equal(openvino.pred_mask, torch_output.pred_mask)
    assert torch.equal(openvino.pred_label, torch_output.pred_label)
    np.testing.assert_allclose(openvino.anomaly_map, torch_output.anomaly_map.numpy(), atol=1e-4)

    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    torch_inferencer = TorchInferencer(model.to_torch(tmp_path / "export"), device="cpu")
    assert torch.equal(torch_inferencer.predict(probe).pred_mask, torch_output.pred_mask)


def test_no_calibration_images_warn_and_use_chi2(textures_root: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        model, _ = _fit_tiny(textures_root, tmp_path, calibration_fraction=0.0)
    assert "no held-out normal image" in caplog.text
    assert not bool(model.model.null_calibrated)
    assert model.model.nfa_null_parameters() is None


def test_ddp_multi_step(anomalib_cli, tiny_textures_args, resize_pre_processor, tmp_path: Path) -> None:
    """Two CPU ranks, 3 epochs of one batch each: >= 3 optimiser steps per rank (the frozen backbone must stay out of
    DDP's reducer) and the calibration reduced over ranks."""
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
        "3",
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
    assert state["global_step"] >= 3  # steps per rank
    assert bool(state["state_dict"]["model.null_calibrated"])


def test_checkpoint_at_a_non_default_size_reloads_without_passing_the_pre_processor(tmp_path) -> None:
    """``load_from_checkpoint`` (as ``anomalib export --ckpt_path`` calls it) rebuilds the flow at the trained size."""
    import lightning

    model = UFlowNFA(
        backbone="efficientnet_lite0",
        pre_trained=False,
        flow_steps=1,
        pre_processor=UFlowNFA.configure_pre_processor((64, 64)),
    )
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "model.ckpt")

    reloaded = UFlowNFA.load_from_checkpoint(tmp_path / "model.ckpt")  # strict: LayerNorm shapes must match

    assert reloaded.model.input_size == (64, 64)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(images).anomaly_map, model.model(images).anomaly_map, rtol=0, atol=0)
