"""MSFlow in Anomalib: stages inside one fit, resume, checkpoint reload, ONNX export, stock CLI and DDP."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import Callback, LightningModule, Trainer

from anomalib_ext.components.data_synthesis import SyntheticAnomalyDataset
from anomalib_ext.data import Textures
from anomalib_ext.models import MSFlow

SIZE = 64
NFA_SIZE = 96  # coarsest latent 3x3: scikit-image's max-tree (NFA) fails on 2x2 images
TINY_DATA = {"tile_size": 64, "num_train": 8, "num_test_normal": 4, "num_test_defect": 2}
TINY_MODEL = ["--model.backbone", "efficientnet_lite0", "--model.flow_blocks", "[1, 2, 2]"]


@pytest.fixture
def single_threaded_subprocesses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _datamodule(root: Path, category: str = "gravel") -> Textures:
    return Textures(root=root, category=category, **TINY_DATA, train_batch_size=4, eval_batch_size=4, num_workers=0)


def _model(size: int = SIZE, **kwargs: object) -> MSFlow:
    return MSFlow(
        backbone="efficientnet_lite0",
        flow_blocks=(1, 2, 2),
        pre_processor=MSFlow.configure_pre_processor((size, size)),
        **kwargs,  # type: ignore[arg-type]
    )


def _engine(root: Path, max_epochs: int, **kwargs: object) -> Engine:
    return Engine(
        max_epochs=max_epochs,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        accelerator="cpu",
        devices=1,
        **kwargs,  # type: ignore[arg-type]
    )


def test_defaults_are_the_originals() -> None:
    """torchvision's wide_resnet50_2 weights (as MSFlow) and the ``add`` map (MSFlow's pixel-AUROC map)."""
    parameters = inspect.signature(MSFlow).parameters
    assert parameters["backbone"].default == "wide_resnet50_2.tv_in1k"
    assert parameters["anomaly_map"].default == "add"
    assert parameters["gradient_clip_norm"].default == 2.0


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="pretrain_task must be"):
        _model(pretrain_task="draem")
    with pytest.raises(ValueError, match="needs `poisson_source`"):
        _model(pretrain_task="poisson")


class _RecordMasks(Callback):
    """Records, per epoch, whether the training batches (after the pre-processor) carried anomaly masks."""

    def __init__(self) -> None:
        self.has_anomaly: dict[int, list[bool]] = {}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: object, batch_idx: int) -> None:
        del pl_module, batch_idx
        masks = batch.gt_mask  # type: ignore[attr-defined]
        assert masks.shape[-2:] == batch.image.shape[-2:] == (SIZE, SIZE)  # type: ignore[attr-defined]
        self.has_anomaly.setdefault(trainer.current_epoch, []).extend(masks.flatten(1).any(1).tolist())


def test_pretraining_then_flows_in_one_fit(textures_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _model(
        pretrain_task="cutpaste", pretrain_epochs=1, pretrain_weights_out=str(tmp_path / "encoder.safetensors")
    )
    encoder_before = {key: value.clone() for key, value in model.model.encoder.state_dict().items()}
    flows_before = {key: value.clone() for key, value in model.model.fusion_flow.state_dict().items()}
    recorder = _RecordMasks()
    engine = _engine(tmp_path, max_epochs=2, callbacks=[recorder])
    engine.fit(model, datamodule=_datamodule(textures_root))
    # pre-training batches arrive with the synthetic anomalies made in the DataLoader; flow batches are the normal images
    assert all(recorder.has_anomaly[0]) and not any(recorder.has_anomaly[1])
    metrics = engine.trainer.callback_metrics
    assert "pretrain_bce_epoch" in metrics and "train_loss_epoch" in metrics
    encoder_after = model.model.encoder.state_dict()
    assert any(
        not torch.equal(encoder_before[key], encoder_after[key]) for key in encoder_before if key.endswith("weight")
    )
    assert any(not torch.equal(flows_before[key], value) for key, value in model.model.fusion_flow.state_dict().items())
    # the encoder written at the end of pre-training is the one the flows were trained on
    reloaded = MSFlow(
        backbone="efficientnet_lite0", backbone_weights=str(tmp_path / "encoder.safetensors"), flow_blocks=(1, 2, 2)
    )
    for key, value in reloaded.model.encoder.state_dict().items():
        assert torch.equal(value, encoder_after[key])

    # flow-stage checkpoints leave the U-Net out and still reload into the same configuration, with identical outputs
    checkpoint = tmp_path / "flows.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    assert not any(
        key.startswith("pretrain_network.") for key in torch.load(checkpoint, weights_only=False)["state_dict"]
    )
    restored = MSFlow.load_from_checkpoint(checkpoint)
    assert restored.pretrain_task == "cutpaste"
    images = torch.rand(2, 3, SIZE, SIZE)
    model.eval()
    restored.eval()
    with torch.no_grad():
        assert torch.equal(model(images).anomaly_map, restored(images).anomaly_map)


def test_max_epochs_must_leave_room_for_the_flows(textures_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="counts both stages"):
        _engine(tmp_path, max_epochs=2).fit(
            _model(pretrain_task="cutpaste", pretrain_epochs=2), datamodule=_datamodule(textures_root)
        )


class _StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del pl_module
        trainer.should_stop = True


def test_poisson_pretraining_resumes_from_a_pretraining_checkpoint(textures_root: Path, tmp_path: Path) -> None:
    """A run interrupted during pre-training resumes there: pre-training continues, then the flows train."""
    poisson = {"pretrain_task": "poisson", "pretrain_epochs": 2, "poisson_source": str(textures_root / "brick")}
    datamodule = _datamodule(textures_root)
    torch.manual_seed(0)
    interrupted = _model(**poisson)
    engine = _engine(tmp_path / "first", max_epochs=3, callbacks=[_StopAfterFirstEpoch()])
    engine.fit(interrupted, datamodule=datamodule)
    checkpoint = tmp_path / "interrupted.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    assert engine.trainer.current_epoch == 1 and "train_loss_epoch" not in engine.trainer.callback_metrics
    saved = {key: value.clone() for key, value in interrupted.state_dict().items()}

    resumed = _model(**poisson)
    engine = _engine(tmp_path / "second", max_epochs=3)
    engine.fit(resumed, datamodule=datamodule, ckpt_path=checkpoint)
    assert engine.trainer.current_epoch == 3
    assert {"pretrain_bce_epoch", "train_loss_epoch"} <= set(
        engine.trainer.callback_metrics
    )  # both stages ran after resume
    state = resumed.state_dict()
    encoder_keys = [key for key in state if key.startswith("model.feature_extractor.") and key.endswith("weight")]
    assert any(not torch.equal(state[key], saved[key]) for key in encoder_keys)  # pre-training went on at epoch 1
    flow_keys = [key for key in state if key.startswith("model.fusion_flow.")]
    assert any(not torch.equal(state[key], saved[key]) for key in flow_keys)  # then the flows trained at epoch 2


def test_checkpoint_reload_identical_and_onnx_export(textures_root: Path, tmp_path: Path) -> None:
    """With ``use_nfa_mask``: the reloaded model gives identical maps, scores and NFA masks; ONNX leaves the NFA out."""
    torch.manual_seed(0)
    model = _model(NFA_SIZE, use_nfa_mask=True)
    engine = _engine(tmp_path, max_epochs=1)
    datamodule = _datamodule(textures_root)
    engine.fit(model, datamodule=datamodule)
    checkpoint = tmp_path / "msflow.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    reloaded = MSFlow.load_from_checkpoint(checkpoint)

    images = torch.rand(3, 3, NFA_SIZE, NFA_SIZE)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        first, second = model(images), reloaded(images)
    assert torch.equal(first.anomaly_map, second.anomaly_map)
    assert torch.equal(first.pred_score, second.pred_score)
    assert torch.equal(first.pred_mask, second.pred_mask)
    with torch.no_grad():
        raw = model.model(model.pre_processor(images))
        features = model.model.extract_features(model.pre_processor(images))
        for latent, reloaded_latent in zip(
            model.model.encode(features)[0], reloaded.model.encode(features)[0], strict=True
        ):
            assert torch.equal(latent, reloaded_latent) and latent.std() > 0  # (a 1-epoch flow's bounded map saturates)
    assert torch.equal(first.pred_mask, raw.pred_mask)  # the post-processor keeps the model's NFA mask and label
    assert torch.equal(first.pred_label, raw.pred_mask.flatten(1).any(dim=1))

    onnx_path = model.to_onnx(tmp_path / "export", input_size=(NFA_SIZE, NFA_SIZE))
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, {"input": images.numpy()}), strict=True)
    )
    assert np.allclose(outputs["anomaly_map"], first.anomaly_map.numpy(), atol=1e-3)
    assert np.allclose(outputs["pred_score"], first.pred_score.numpy(), atol=1e-4)
    assert outputs["pred_mask"].shape == (
        3,
        1,
        NFA_SIZE,
        NFA_SIZE,
    )  # thresholded map: the NFA max-tree is not in the graph


def test_poisson_run_resumes_in_the_flow_stage_without_the_poisson_source(textures_root: Path, tmp_path: Path) -> None:
    """Once pre-training is over, resuming needs neither the Poisson folder nor any synthesis."""
    source = tmp_path / "brick"
    shutil.copytree(textures_root / "brick", source)
    poisson = {"pretrain_task": "poisson", "pretrain_epochs": 1, "poisson_source": str(source)}
    datamodule = _datamodule(textures_root)
    torch.manual_seed(0)
    engine = _engine(tmp_path / "first", max_epochs=3, callbacks=[_StopAfterFirstEpoch()])
    first = _model(**poisson)
    engine.fit(first, datamodule=datamodule)
    checkpoint = tmp_path / "end_of_pretraining.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    shutil.rmtree(source)

    resumed = _model(**poisson)
    flows_before = {key: value.clone() for key, value in first.model.fusion_flow.state_dict().items()}
    engine = _engine(tmp_path / "second", max_epochs=3)
    engine.fit(resumed, datamodule=datamodule, ckpt_path=checkpoint)
    assert engine.trainer.current_epoch == 3 and "train_loss_epoch" in engine.trainer.callback_metrics
    assert not isinstance(datamodule.train_data, SyntheticAnomalyDataset)
    assert any(not torch.equal(flows_before[k], v) for k, v in resumed.model.fusion_flow.state_dict().items())


class _RecordGradientNorms(Callback):
    def __init__(self) -> None:
        self.norms: list[float] = []
        self.losses: list[tuple[float, float]] = []  # (back-propagated, logged)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        del pl_module, batch, batch_idx
        logged = trainer.callback_metrics["train_loss_step"]
        self.losses.append((outputs["loss"].item(), logged.item()))  # type: ignore[index]

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: object) -> None:
        del trainer, optimizer
        gradients = [p.grad for p in pl_module.flow_parameters if p.grad is not None]  # type: ignore[attr-defined]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in gradients])).item())


def test_gradient_clip_at_two_acts_on_the_un_normalised_loss(textures_root: Path, tmp_path: Path) -> None:
    """As in MSFlow: the flows' gradient norm exceeds 2, so the clip acts; the logged loss is per dimension."""
    torch.manual_seed(0)
    model = _model()
    recorder = _RecordGradientNorms()
    _engine(tmp_path, max_epochs=1, callbacks=[recorder]).fit(model, datamodule=_datamodule(textures_root))
    assert min(recorder.norms) > 2.0
    batch = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        dimensions = sum(z[0].numel() for z in model.model.encode(model.model.extract_features(batch))[0])
    for back_propagated, logged in recorder.losses:  # the NLL itself is back-propagated, its per-dimension value logged
        assert back_propagated == pytest.approx(dimensions * logged, rel=1e-5)
    model.train()
    latents, log_det = model.model(model.pre_processor(batch))
    loss = model.loss(latents, log_det)
    loss.backward()
    model.configure_gradient_clipping(None)  # type: ignore[arg-type]
    gradients = [p.grad for p in model.flow_parameters if p.grad is not None]
    assert torch.linalg.vector_norm(torch.stack([g.norm() for g in gradients])).item() == pytest.approx(2.0, rel=1e-4)


@pytest.mark.usefixtures("single_threaded_subprocesses")
def test_stock_cli_train_then_test(anomalib_cli, tiny_textures_args, resize_pre_processor, tmp_path: Path) -> None:
    common = ["--model", "MSFlow", *TINY_MODEL, "--model.pre_processor", resize_pre_processor(SIZE)]
    anomalib_cli(
        "train", *common, "--model.pretrain_task", "cutpaste", "--model.pretrain_epochs", "1", *tiny_textures_args("gravel"),
        "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--default_root_dir", str(tmp_path / "train"),
    )  # fmt: skip
    checkpoints = sorted((tmp_path / "train").rglob("*.ckpt"))
    assert checkpoints
    result = anomalib_cli(
        "test", *common, *tiny_textures_args("gravel"), "--ckpt_path", str(checkpoints[-1]), "--default_root_dir", str(tmp_path / "test"),
    )  # fmt: skip
    assert "pixel_AUROC" in result.stdout + result.stderr


@pytest.mark.usefixtures("single_threaded_subprocesses")
def test_ddp_smoke(anomalib_cli, tiny_textures_args, resize_pre_processor, tmp_path: Path) -> None:
    """Two CPU processes (gloo), 3 optimiser steps per rank in pre-training and 3 in flow training (batch 1 per rank).

    Unused-stage parameters need find_unused; the ranks' synthetic samples and flows stay in sync.
    """
    anomalib_cli(
        "fit", "--model", "MSFlow", *TINY_MODEL, "--model.pre_processor", resize_pre_processor(SIZE),
        "--model.pretrain_task", "cutpaste", "--model.pretrain_epochs", "1", *tiny_textures_args("gravel"),
        "--data.train_batch_size", "1", "--trainer.max_epochs", "2", "--trainer.strategy",
        "ddp_find_unused_parameters_true", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.limit_train_batches", "3", "--default_root_dir", str(tmp_path),
    )  # fmt: skip
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert checkpoints
    checkpoint = torch.load(checkpoints[0], weights_only=False)
    assert checkpoint["global_step"] == 6  # optimiser steps per rank: 3 pre-training + 3 flow steps
    assert checkpoint["epoch"] == 1
