"""PatchAE / PatchVQVAE through Anomalib: stock CLI per scorer, checkpoint reload (SVM and prior), ONNX, DDP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_ext.models import PatchAE, PatchVQVAE

TINY_MODEL = {
    "patch_size": 27,
    "num_codes": 32,
    "patches_per_image": 16,
    "patch_batch_size": 32,
    "ae_epochs": 1,
    "svm_patches_per_image": 6,
}
TINY_PRIOR = {
    "prior_epochs": 1,
    "prior_dim": 16,
    "prior_layers": 1,
    "prior_heads": 2,
    "prior_feedforward": 32,
    "prior_batch_size": 32,
    "restoration_mode": "single_pass",
    "restoration_stride": 16,
}
SCORERS = [
    ("PatchAE", "reconstruction"),
    ("PatchAE", "ocsvm"),
    ("PatchVQVAE", "reconstruction"),
    ("PatchVQVAE", "ocsvm"),
    ("PatchVQVAE", "restoration"),
]


def _model_args(model: str, scorer: str) -> list[str]:
    options = {"scorer": scorer, **TINY_MODEL}
    if model == "PatchAE":
        options.pop("num_codes")
    if scorer == "restoration":
        options.update(TINY_PRIOR)
    return ["--model", model, *[item for key, value in options.items() for item in (f"--model.{key}", str(value))]]


def _checkpoint(root: Path) -> Path:
    checkpoints = sorted(root.rglob("*.ckpt"))
    assert checkpoints, f"no checkpoint under {root}"
    return checkpoints[-1]


@pytest.mark.parametrize(("model", "scorer"), SCORERS)
def test_stock_cli_train_and_test(model: str, scorer: str, anomalib_cli, tiny_textures_args, tmp_path: Path) -> None:
    """``anomalib train`` (fit + test) for every scorer of the paper's Table 1; ``anomalib test --ckpt_path`` reloads."""
    common = [*_model_args(model, scorer), *tiny_textures_args("gravel"), "--trainer.limit_train_batches", "2"]
    result = anomalib_cli("train", *common, "--default_root_dir", str(tmp_path / "train"))
    assert "pixel_AUROC" in result.stdout + result.stderr
    if scorer in {"ocsvm", "restoration"}:  # the fitted SVM / trained prior come back from the checkpoint
        checkpoint = _checkpoint(tmp_path / "train")
        result = anomalib_cli("test", *common, "--ckpt_path", str(checkpoint), "--default_root_dir", str(tmp_path))
        assert "pixel_AUROC" in result.stdout + result.stderr


def _fit_in_process(model: PatchAE | PatchVQVAE, textures_root: Path, root: Path) -> Path:
    datamodule = MVTecAD(
        root=textures_root, category="gravel", train_batch_size=4, eval_batch_size=4, num_workers=0
    )
    engine = Engine(default_root_dir=root, limit_train_batches=2, accelerator="cpu", devices=1, logger=False)
    engine.fit(model, datamodule=datamodule)
    checkpoint = root / "reload.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    return checkpoint


@pytest.mark.parametrize(
    ("model_class", "options"),
    [(PatchAE, {"scorer": "ocsvm"}), (PatchVQVAE, {"scorer": "restoration", **TINY_PRIOR})],
    ids=["ae-ocsvm", "vqvae-restoration"],
)
def test_checkpoint_reload_identical_and_onnx(model_class, options, textures_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    tiny = {key: value for key, value in TINY_MODEL.items() if model_class is PatchVQVAE or key != "num_codes"}
    model = model_class(**tiny, **options)
    checkpoint = _fit_in_process(model, textures_root, tmp_path)
    torch.load(checkpoint, weights_only=True)  # safe loading works (no pickled classes)
    reloaded = model_class.load_from_checkpoint(checkpoint).eval()
    model.eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected, actual = model.model(images), reloaded.model(images)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, rtol=0, atol=0)
    if options["scorer"] == "ocsvm":
        assert reloaded.model.ocsvm.is_fitted
        torch.testing.assert_close(reloaded.model.ocsvm.support_vectors, model.model.ocsvm.support_vectors)
    else:
        torch.testing.assert_close(reloaded.model.prior.head.weight, model.model.prior.head.weight)
        with pytest.raises(NotImplementedError, match="reconstruction"):
            reloaded.to_onnx(tmp_path / "onnx", input_size=(64, 64))
        reloaded.model.scorer = "reconstruction"  # the exportable scorer of the same checkpoint

    import onnxruntime  # noqa: PLC0415

    onnx_path = reloaded.to_onnx(tmp_path / "onnx", input_size=(64, 64))
    session = onnxruntime.InferenceSession(str(onnx_path))
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": images.numpy()}), strict=True))
    with torch.no_grad():
        reference = reloaded(images)
    np.testing.assert_allclose(outputs["anomaly_map"], reference.anomaly_map.numpy(), rtol=1e-3, atol=1e-4)


def test_ddp_smoke_gathers_svm_latents(anomalib_cli, tiny_textures_args, tmp_path: Path) -> None:
    """Two CPU processes (gloo): the SVM is fitted on the latents of both ranks and saved in the checkpoint."""
    args = _model_args("PatchVQVAE", "ocsvm")
    anomalib_cli(
        "fit", *args, *tiny_textures_args("gravel"), "--trainer.limit_train_batches", "1", "--trainer.strategy", "ddp",
        "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--default_root_dir", str(tmp_path),
    )
    state = torch.load(_checkpoint(tmp_path), weights_only=True)["state_dict"]
    assert state["model.ocsvm.support_vectors"].shape[0] > 0
    # 2 ranks x 1 batch x 4 images x 6 patches: with nu = 0.03 libsvm keeps at least nu * n support vectors.
    assert state["model.ocsvm.dual_coef"].sum().item() == pytest.approx(0.03 * 2 * 4 * 6, rel=1e-3)
