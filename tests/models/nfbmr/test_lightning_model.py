"""NFBMR in Anomalib: two-stage fit, resume from either stage, reload, ONNX export, stock CLI and DDP."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.callbacks import ModelCheckpoint
from anomalib.engine import Engine
from lightning.pytorch import Callback

from anomalib_ext.data import Textures
from anomalib_ext.models import NFBMR

SIZE = (64, 64)
TINY_DATA = {"tile_size": 64, "num_train": 8, "num_test_normal": 4, "num_test_defect": 2}
TINY_MODEL = {
    "backbone": "efficientnet_lite0",
    "layer": "blocks.4",
    "flow_hidden_channels": 32,
    "mapper_hidden_channels": 32,
    "bottleneck_channels": 8,
}
CLI_MODEL_ARGS = [f"--model.{key}={value}" for key, value in TINY_MODEL.items()]


def _model(**kwargs: object) -> NFBMR:
    return NFBMR(**{**TINY_MODEL, **kwargs}, pre_processor=NFBMR.configure_pre_processor(SIZE), visualizer=False)


def _datamodule(root: Path, batch_size: int = 4) -> Textures:
    return Textures(
        root=root, category="gravel", num_workers=0, train_batch_size=batch_size, eval_batch_size=4, **TINY_DATA
    )


def _engine(root: Path, max_epochs: int, **kwargs: object) -> Engine:
    return Engine(default_root_dir=root, max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, **kwargs)


class EpochSnapshots(Callback):
    """Copies of the model's state dict at the end of every training epoch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.states.append(copy.deepcopy(pl_module.model.state_dict()))


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if key.startswith(prefix)}


def _assert_same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert first.keys() == second.keys() and first
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=atol, rtol=0, msg=key)


def _changed(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(first[key], second[key]) for key in first)


def test_stages_train_only_their_own_parameters_then_reload_and_export(textures_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _model(tnf_epochs=1, bmr_epochs=1)
    initial = copy.deepcopy(model.model.state_dict())
    snapshots = EpochSnapshots()
    engine = _engine(tmp_path, max_epochs=10, limit_train_batches=2, callbacks=[snapshots])
    engine.fit(model=model, datamodule=_datamodule(textures_root))
    assert len(snapshots.states) == 2  # stopped after both stages although max_epochs=10
    after_tnf, after_bmr = snapshots.states
    assert _changed(_part(initial, "flow."), _part(after_tnf, "flow."))
    _assert_same(_part(initial, "mapper."), _part(after_tnf, "mapper."))  # BMR untouched in stage 1
    _assert_same(_part(after_tnf, "flow."), _part(after_bmr, "flow."))  # TNF untouched in stage 2
    assert _changed(_part(after_tnf, "mapper."), _part(after_bmr, "mapper."))
    _assert_same(_part(initial, "extractor."), _part(after_bmr, "extractor."))  # SNN frozen (BN statistics too)
    logged = engine.trainer.logged_metrics
    assert float(logged["stage"]) == 2.0 and "bmr_loss_epoch" in logged and "tnf_nll_epoch" in logged

    checkpoint = tmp_path / "reload.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    reloaded = NFBMR.load_from_checkpoint(checkpoint, pre_processor=NFBMR.configure_pre_processor(SIZE)).eval()
    model.eval()
    image = torch.rand(2, 3, 80, 80)
    with torch.no_grad():
        expected, actual = model(image), reloaded(image)
    for name, value in expected._asdict().items():
        assert torch.equal(value, getattr(actual, name)), name
    assert torch.isfinite(reloaded.post_processor.image_threshold)

    onnx_path = model.to_onnx(tmp_path / "export", input_size=SIZE)
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    probe = torch.rand(1, 3, *SIZE)
    names = [output.name for output in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"input": probe.numpy()}), strict=True))
    with torch.no_grad():
        torch_output = model(probe)
    np.testing.assert_allclose(outputs["anomaly_map"], torch_output.anomaly_map.numpy(), atol=1e-4)
    np.testing.assert_allclose(outputs["pred_score"], torch_output.pred_score.numpy(), atol=1e-4)


def test_resume_from_a_checkpoint_taken_in_stage_1_matches_the_uninterrupted_run(
    textures_root: Path, tmp_path: Path
) -> None:
    """Full-batch training (8 images, batch 8) so that both runs see the same gradients whatever the data order."""
    torch.manual_seed(0)
    model = _model(tnf_epochs=2, bmr_epochs=1)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    snapshots = EpochSnapshots()
    engine = _engine(tmp_path / "full", max_epochs=3, callbacks=[checkpoints, snapshots])
    engine.fit(model=model, datamodule=_datamodule(textures_root, batch_size=8))
    mid_stage_1 = tmp_path / "checkpoints" / "epoch=0.ckpt"
    assert mid_stage_1.is_file() and len(snapshots.states) == 3

    # the stage-1 checkpoint reloads to exactly the state the model had after epoch 0
    reloaded = NFBMR.load_from_checkpoint(mid_stage_1, pre_processor=NFBMR.configure_pre_processor(SIZE))
    _assert_same(reloaded.model.state_dict(), snapshots.states[0])

    torch.manual_seed(1)  # a different initialisation: everything must come from the checkpoint
    resumed = _model(tnf_epochs=2, bmr_epochs=1)
    _engine(tmp_path / "resumed", max_epochs=3).fit(
        model=resumed, datamodule=_datamodule(textures_root, batch_size=8), ckpt_path=str(mid_stage_1)
    )
    _assert_same(resumed.model.state_dict(), snapshots.states[-1], atol=1e-5)  # stage 1 finished, stage 2 ran
    torch.testing.assert_close(
        resumed.post_processor.image_threshold, model.post_processor.image_threshold, rtol=1e-4, atol=1e-5
    )


class ValidationRecorder(Callback):
    """The epoch, images and image scores of every validation batch of a fit."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        del pl_module, batch, batch_idx, dataloader_idx
        self.batches.append((trainer.current_epoch, outputs.image.clone(), outputs.pred_score.clone()))

    def assert_last_validation_used_the_mapper(self, model: NFBMR) -> None:
        """The last validation's scores are the finished model's mapping scores (eq. 14), not the flow's."""
        last_epoch = self.batches[-1][0]
        model.eval()
        with torch.no_grad():
            for epoch, image, score in self.batches:
                if epoch == last_epoch:
                    torch.testing.assert_close(score, model.model(image).pred_score)
                    assert not torch.allclose(score, model.model(image, flow_score=True).pred_score)


def test_nf_only_trains_one_stage(textures_root: Path, tmp_path: Path) -> None:
    model = _model(nf_only=True, tnf_epochs=1, bmr_epochs=50)
    assert model.total_epochs == 1 and len(model.configure_optimizers()) == 1
    engine = _engine(tmp_path / "nf", max_epochs=3, limit_train_batches=1)
    engine.fit(model=model, datamodule=_datamodule(textures_root))
    assert engine.trainer.current_epoch == 1
    with pytest.raises(ValueError, match="at least one epoch"):
        _model(tnf_epochs=0)


def test_stages_shrink_in_proportion_to_fit_max_epochs_1_then_test_and_torch_export(
    textures_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Anomalib's own model test runs ``Engine(max_epochs=1)`` with the default stage epochs (300 + 300)."""
    torch.manual_seed(0)
    model = _model()
    initial = copy.deepcopy(model.model.state_dict())
    recorder = ValidationRecorder()
    engine = _engine(tmp_path, max_epochs=1, callbacks=[recorder])
    with caplog.at_level(logging.WARNING):
        engine.fit(model=model, datamodule=_datamodule(textures_root))  # 2 batches: one per stage
    assert "shrunk in proportion" in caplog.text
    trained = model.model.state_dict()
    assert _changed(_part(initial, "flow."), _part(trained, "flow."))
    assert _changed(_part(initial, "mapper."), _part(trained, "mapper."))
    recorder.assert_last_validation_used_the_mapper(model)
    (metrics,) = engine.test(model=model, datamodule=_datamodule(textures_root), verbose=False)
    assert "image_AUROC" in metrics
    exported = torch.load(model.to_torch(tmp_path / "export"), map_location="cpu", weights_only=False)["model"]
    image = torch.rand(1, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(exported.eval()(image).anomaly_map, model.eval()(image).anomaly_map)


def test_last_validation_follows_stage_2_whatever_check_val_every_n_epoch(textures_root: Path, tmp_path: Path) -> None:
    """Validation every 2 epochs with 2 + 1 stage epochs: epoch 1 (stage 1, flow scores) and, forced, epoch 2."""
    torch.manual_seed(0)
    model = _model(tnf_epochs=2, bmr_epochs=1)
    recorder = ValidationRecorder()
    engine = _engine(tmp_path, max_epochs=3, check_val_every_n_epoch=2, limit_train_batches=1, callbacks=[recorder])
    engine.fit(model=model, datamodule=_datamodule(textures_root))
    assert sorted({epoch for epoch, _, _ in recorder.batches}) == [1, 2]
    recorder.assert_last_validation_used_the_mapper(model)


def test_stock_cli_train_then_test_with_nfa_mask(
    anomalib_cli, tiny_textures_args, resize_pre_processor, tmp_path: Path
) -> None:
    common = [
        "--model",
        "NFBMR",
        *CLI_MODEL_ARGS,
        "--model.use_nfa_mask",
        "true",
        "--model.pre_processor",
        resize_pre_processor(64),
    ]
    stages = ["--model.tnf_epochs", "1", "--model.bmr_epochs", "1", "--trainer.max_epochs", "2"]
    result = anomalib_cli(
        "train",
        *common,
        *stages,
        *tiny_textures_args("gravel"),
        "--trainer.limit_train_batches",
        "2",
        "--default_root_dir",
        str(tmp_path / "train"),
    )
    assert "image_AUROC" in result.stdout
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
    assert list((tmp_path / "test").rglob("images/**/*.png"))


def test_ddp_several_steps_in_both_stages(
    anomalib_cli, tiny_textures_args, resize_pre_processor, tmp_path: Path
) -> None:
    anomalib_cli(
        "fit",
        "--model",
        "NFBMR",
        *CLI_MODEL_ARGS,
        "--model.pre_processor",
        resize_pre_processor(64),
        "--model.tnf_epochs",
        "1",
        "--model.bmr_epochs",
        "1",
        "--trainer.max_epochs",
        "2",
        *tiny_textures_args("gravel"),
        "--data.train_batch_size",
        "1",  # 8 images over 2 ranks: 4 optimiser steps per rank in each stage
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--default_root_dir",
        str(tmp_path),
    )
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert len(checkpoints) == 1
    state = torch.load(checkpoints[0], map_location="cpu", weights_only=False)
    assert state["epoch"] == 1 and len(state["optimizer_states"]) == 2
    for optimizer_state in state["optimizer_states"]:  # Adam's step count: per rank, identical on both ranks
        assert {int(param["step"]) for param in optimizer_state["state"].values()} == {4}
