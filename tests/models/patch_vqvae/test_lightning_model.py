"""PatchAE / PatchVQVAE through Anomalib: stock CLI per scorer, checkpoint reload (SVM and prior), ONNX, DDP."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime
import pytest
import torch
from anomalib.data import ImageBatch, MVTecAD
from anomalib.deploy import ExportType
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
    "restoration_mode": "sequential",
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
        # Stock export: Anomalib probes with a 32 x 32 image and exports height and width as dynamic axes.
        export = [
            "export",
            *_model_args(model, scorer),
            "--export_type",
            "onnx",
            "--ckpt_path",
            str(checkpoint),
            "--default_root_dir",
            str(tmp_path / "export"),
        ]
        if scorer == "restoration":  # the refusal names the reason and the scorers that export
            result = anomalib_cli(*export, expect_failure=True)
            assert "cannot be exported" in result.stdout + result.stderr
            assert "'reconstruction'" in result.stdout + result.stderr
        elif model == "PatchAE":
            anomalib_cli(*export)
            assert list((tmp_path / "export").rglob("*.onnx"))


def _fit_in_process(model: PatchAE | PatchVQVAE, textures_root: Path, root: Path) -> Path:
    datamodule = MVTecAD(root=textures_root, category="gravel", train_batch_size=4, eval_batch_size=4, num_workers=0)
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
def test_checkpoint_reload_identical_and_whole_module_pickles(
    model_class, options, textures_root: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    tiny = {key: value for key, value in TINY_MODEL.items() if model_class is PatchVQVAE or key != "num_codes"}
    model = model_class(**tiny, **options)
    checkpoint = _fit_in_process(model, textures_root, tmp_path)
    torch.load(checkpoint, weights_only=True)  # safe loading works (no pickled classes)
    reloaded = model_class.load_from_checkpoint(checkpoint).eval()
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the whole module (as Anomalib's torch export does)
    unpickled = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False).eval()
    model.eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.model(images).anomaly_map
        for other in (reloaded, unpickled):
            torch.testing.assert_close(other.model(images).anomaly_map, expected, rtol=0, atol=0)
    if options["scorer"] == "ocsvm":
        assert reloaded.model.ocsvm.is_fitted
        torch.testing.assert_close(reloaded.model.ocsvm.support_vectors, model.model.ocsvm.support_vectors)
    else:
        torch.testing.assert_close(reloaded.model.prior.head.weight, model.model.prior.head.weight)


# Both models and both exportable scorers are covered (the stock CLI test exports PatchAE's OC-SVM from a checkpoint).
EXPORTABLE = [("PatchAE", "reconstruction"), ("PatchVQVAE", "ocsvm")]


@pytest.mark.parametrize(("model_name", "scorer"), EXPORTABLE)
def test_stock_export_accepts_any_input_size(model_name: str, scorer: str, tmp_path: Path) -> None:
    """``Engine.export`` with Anomalib's defaults (32 x 32 probe, dynamic height and width) to ONNX and OpenVINO."""
    torch.manual_seed(0)
    model_class = PatchAE if model_name == "PatchAE" else PatchVQVAE
    tiny = {key: value for key, value in TINY_MODEL.items() if model_class is PatchVQVAE or key != "num_codes"}
    model = model_class(scorer=scorer, **tiny).eval()
    if scorer == "ocsvm":  # an SVM fitted on latents of random patches, as the staged fit does
        model.model.ocsvm.fit(model.model.patch_latents(torch.rand(40, 3, 27, 27)), nu=0.2)
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False)
    onnx_path = engine.export(model, ExportType.ONNX, export_root=tmp_path / "onnx")
    session = onnxruntime.InferenceSession(str(onnx_path))
    for size in [(32, 32), (64, 48), (20, 70)]:
        images = torch.rand(2, 3, *size)
        outputs = session.run(None, {"input": images.numpy()})
        names = [output.name for output in session.get_outputs()]
        with torch.no_grad():
            reference = model(images)
        np.testing.assert_allclose(
            outputs[names.index("anomaly_map")], reference.anomaly_map.numpy(), rtol=1e-3, atol=1e-4
        )
    if scorer == "ocsvm" and importlib.util.find_spec("openvino") is not None:  # OpenVINO converts the ONNX graph
        xml_path = engine.export(model, ExportType.OPENVINO, export_root=tmp_path / "openvino")
        assert xml_path.exists()


def test_unfitted_svm_raises_outside_fit() -> None:
    """``anomalib test``/``validate`` of an unfitted OC-SVM must not report reconstruction numbers under its name."""
    model = PatchAE(scorer="ocsvm", **{k: v for k, v in TINY_MODEL.items() if k != "num_codes"}).eval()
    batch = ImageBatch(image=torch.rand(2, 3, 64, 64))
    for state in ("test", "validate"):
        model._trainer = SimpleNamespace(state=SimpleNamespace(fn=state), current_epoch=0)  # noqa: SLF001
        with pytest.raises(RuntimeError, match="not fitted"):
            model.validation_step(batch)
    model._trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), current_epoch=0)  # noqa: SLF001
    assert model.validation_step(batch).anomaly_map.shape[-2:] == (64, 64)  # early fit epochs: reconstruction


def test_codes_used_logging_adds_no_batchnorm_update(textures_root: Path, tmp_path: Path) -> None:
    """BatchNorm statistics move once per optimiser step: logging ``codes_used`` runs no extra training forward."""
    torch.manual_seed(0)
    model = PatchVQVAE(scorer="reconstruction", **TINY_MODEL)
    datamodule = MVTecAD(root=textures_root, category="gravel", train_batch_size=4, eval_batch_size=4, num_workers=0)
    engine = Engine(
        default_root_dir=tmp_path,
        limit_train_batches=2,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
        logger=False,
    )
    engine.fit(model, datamodule=datamodule)
    steps = engine.trainer.global_step
    assert steps == 2 * 2  # 2 batches x (4 images x 16 patches / 32 per mini-batch)
    assert int(model.model.encoder.norms[0].num_batches_tracked) == steps


def test_pooled_patch_sampling_mixes_all_images_of_the_epoch() -> None:
    """``patch_sampling="pool"``: n patches per image of the whole epoch, shuffled together into mini-batches."""
    torch.manual_seed(0)
    model = PatchAE(
        patch_sampling="pool",
        **{**{k: v for k, v in TINY_MODEL.items() if k != "num_codes"}, "patches_per_image": 10, "patch_batch_size": 8},
    )
    # Image i is constant i / 10, so a patch's mean names its image; 3 "batches" of 2 images.
    model._pool_images = [
        torch.full((2, 3, 40, 40), 0.1 * i) + torch.tensor([0.0, 0.1])[:, None, None, None]  # noqa: SLF001
        for i in range(0, 6, 2)
    ]
    seen: list[torch.Tensor] = []
    reconstruct = model.model.reconstruct

    def recording(patches: torch.Tensor):  # noqa: ANN202
        seen.append((patches.mean((1, 2, 3)) * 10).round().long())
        return reconstruct(patches)

    model.model.reconstruct = recording
    optimizer = torch.optim.Adam(model.model.parameters())
    model.optimizers = lambda: optimizer
    model.manual_backward = lambda loss: loss.backward()
    model.log = lambda *args, **kwargs: None
    model._train_autoencoder_on_pool()  # noqa: SLF001
    assert [len(batch) for batch in seen] == [8] * 7 + [4]  # 6 images x 10 patches in mini-batches of 8
    assert torch.bincount(torch.cat(seen)).tolist() == [10] * 6
    assert max(batch.unique().numel() for batch in seen) > 2  # a mini-batch mixes more than one image batch


DDP_SCRIPT = """
import sys, torch
from collections import Counter
from lightning.pytorch.callbacks import Callback
from anomalib.engine import Engine
from anomalib_ext.data import Textures
from anomalib_ext.models import PatchVQVAE

root, out, runs = sys.argv[1], sys.argv[2], eval(sys.argv[3])

class Record(Callback):
    def __init__(self, name):
        self.name, self.steps = name, Counter()
    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.steps[module.stage] += 1
    def on_fit_end(self, trainer, module):
        state = {key: value.cpu() for key, value in module.state_dict().items()}
        torch.save({"steps": dict(self.steps), "state": state}, f"{out}/{self.name}-rank{trainer.global_rank}.pt")

for name, options in runs.items():
    torch.manual_seed(0)
    data = Textures(root=root, category="gravel", tile_size=64, num_train=8, num_test_normal=4, num_test_defect=2,
                    train_batch_size=2, eval_batch_size=4, num_workers=0)
    engine = Engine(default_root_dir=f"{out}/{name}", accelerator="cpu", devices=2, strategy="ddp", logger=False,
                    limit_val_batches=0, callbacks=[Record(name)])
    engine.fit(PatchVQVAE(**options), datamodule=data)
"""


def test_ddp_trains_in_sync_over_several_steps(textures_root: Path, tmp_path: Path) -> None:
    """Two CPU processes (gloo), >= 3 optimiser steps per rank in every trained stage, for the OC-SVM scorer with
    pooled patches and the restoration scorer with per-batch patches: the ranks end with identical weights and
    BatchNorm statistics, the SVM saw both ranks' latents."""
    common = {**TINY_MODEL, "patches_per_image": 12, "patch_batch_size": 8, "prior_batch_size": 8}
    runs = {
        "ocsvm": {**common, "scorer": "ocsvm", "patch_sampling": "pool"},
        "restoration": {**TINY_PRIOR, **common, "scorer": "restoration", "patch_sampling": "batch"},
    }
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(textures_root), str(tmp_path), repr(runs)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    for name in runs:
        ranks = [torch.load(tmp_path / f"{name}-rank{rank}.pt", weights_only=True) for rank in (0, 1)]
        for record in ranks:
            # pool: 4 images x 12 patches / 8; batch: 2 batches x 2 images x 12 / 8; prior: 2 x 24 sequences / 8
            assert record["steps"]["autoencoder"] >= 3
            if name == "restoration":
                assert record["steps"]["prior"] >= 3
        first, second = (record["state"] for record in ranks)
        assert first.keys() == second.keys()
        for key in (key for key in first if key.startswith("model.")):  # the trained model (not the thresholds)
            torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)
        if name == "ocsvm":
            # 2 ranks x 4 images x 6 patches: with nu = 0.03 libsvm's dual coefficients sum to nu * n.
            assert first["model.ocsvm.dual_coef"].sum().item() == pytest.approx(0.03 * 2 * 4 * 6, rel=1e-3)
