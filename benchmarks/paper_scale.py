"""Paper-scale dry run: every paper config, random weights of the same architecture, at the config's image size.

For each paper config (plugin models in ``configs/*.yaml`` except the ``*_textures_cpu`` demos, stock PaDiM / FastFlow /
PatchCore in ``configs/stock/*_mvtecad.yaml``) a fresh subprocess builds the model exactly as the config says, except:

* no download: ``pre_trained=False`` and no weights files (random weights, same architecture and shapes);
* every training stage runs one epoch of two steps (pre-training, TNF/BMR, auto-encoder/SVM/prior, flows), then one
  validation batch and one test batch (evaluator and visualizer off: the model's own cost is measured);
* images are random tensors already at the model's input size (the config's ``Resize``; the dataset's native size for
  models without one), so data loading and resizing are not timed;
* paths to synthetic-anomaly sources (``poisson_source``, ``negative_source``) point to a small generated folder of
  images with masks; ``pretrain_weights_out`` to a temporary file.

Measured per model: parameters (trainable / frozen at build time), seconds per training step (per stage), seconds per
test image, peak memory, checkpoint size (full, and with ``slim_checkpoint=True`` where the model offers it), and the
time spent in CPU-side synthesis of training inputs (MSFlow's synthetic anomalies, DenseHybridAD's pasted negatives).

Memory on CPU is the process's peak resident set size (``VmHWM`` from ``/proc/self/status``), reset before each phase
by writing ``5`` to ``/proc/self/clear_refs``: ``peak`` is the absolute high-water mark during the phase (weights,
Python, libraries included), ``delta`` the part above the resident size at the phase's start (the phase's working
memory). On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (absolute and above the phase's
start). The parent process also watches each worker's RSS and stops it above ``--max-rss-gib`` (reported, not a crash).

Usage::

    python benchmarks/paper_scale.py --device cpu --batch-size 2 --eval-batch-size 1 --output paper_scale_cpu.json
    python benchmarks/paper_scale.py --device cuda --output paper_scale_cuda.json          # the configs' batch sizes
    python benchmarks/paper_scale.py --models msflow,stock/fastflow --device cpu
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
GIB = 2**30
STOCK_REFERENCES = ("stock/fastflow_mvtecad", "stock/patchcore_mvtecad")
STAGE_EPOCH_ARGUMENTS = ("pretrain_epochs", "tnf_epochs", "bmr_epochs", "ae_epochs", "prior_epochs")
NO_DOWNLOAD_ARGUMENTS = {"pre_trained": False, "backbone_weights": None, "segmenter_weights": None}
SOURCE_ARGUMENTS = ("poisson_source", "negative_source")
LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
# Allocations above 64 KiB are mmap'ed and unmapped when freed (glibc's threshold would otherwise grow to 32 MiB and
# keep freed tensors resident), so that RSS follows live memory in the workers.
WORKER_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "65536"}
NATIVE_SIZE = 1024  # MVTec AD carpet / wood (PatchVQVAE works at the images' own resolution)


# ------------------------------------------------------------------------------------------------------ configurations
def paper_configs() -> list[str]:
    """Names (paths below ``configs/`` without ``.yaml``) of every paper config: plugin models, then stock MVTec AD."""
    plugin = sorted(path.stem for path in CONFIGS.glob("*.yaml") if not path.stem.endswith("_textures_cpu"))
    stock = sorted(f"stock/{path.stem}" for path in (CONFIGS / "stock").glob("*_mvtecad.yaml"))
    return plugin + stock


def load_config(name: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def instantiate(spec: Any) -> Any:  # noqa: ANN401
    """Build ``{class_path, init_args}`` specs recursively (lists and plain values pass through)."""
    if isinstance(spec, list):
        return [instantiate(item) for item in spec]
    if isinstance(spec, dict) and "class_path" in spec:
        module, _, name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{key: instantiate(value) for key, value in spec.get("init_args", {}).items()})
    return spec


def model_arguments(config: dict[str, Any], source_dir: Path | None, work_dir: Path) -> tuple[type, dict[str, Any]]:
    """The config's model class and arguments with the dry-run overrides (no download, one epoch per stage)."""
    spec = config["model"]
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    parameters = inspect.signature(cls.__init__).parameters
    arguments = {key: instantiate(value) for key, value in copy.deepcopy(spec.get("init_args", {})).items()}
    for key, value in NO_DOWNLOAD_ARGUMENTS.items():
        if key in parameters:
            arguments[key] = value
    for key in STAGE_EPOCH_ARGUMENTS:
        if key in parameters and arguments.get(key, parameters[key].default) not in (0, None):
            arguments[key] = 1
    for key in SOURCE_ARGUMENTS:
        if arguments.get(key):
            if source_dir is None:
                msg = f"{name} needs a synthetic source for {key}"
                raise ValueError(msg)
            arguments[key] = str(source_dir)
    if arguments.get("pretrain_weights_out"):
        arguments["pretrain_weights_out"] = str(work_dir / "encoder.safetensors")
    arguments.update(evaluator=False, visualizer=False)
    return cls, arguments


def build_model(name: str, source_dir: Path | None = None, work_dir: Path | None = None) -> tuple[Any, dict[str, Any]]:
    """The model of paper config ``name`` with random weights (see the module docstring), and the loaded config."""
    config = load_config(name)
    work_dir = work_dir or Path(tempfile.mkdtemp(prefix="paper-scale-"))
    if source_dir is None and any(config["model"].get("init_args", {}).get(key) for key in SOURCE_ARGUMENTS):
        source_dir = make_masked_source(work_dir / "source")
    cls, arguments = model_arguments(config, source_dir, work_dir)
    return cls(**arguments), config


def input_size(model: Any) -> tuple[int, int]:  # noqa: ANN401
    """The model's input size (its pre-processor's resize), else the native MVTec AD size."""
    size = getattr(model, "input_size", None)
    return tuple(size) if size else (NATIVE_SIZE, NATIVE_SIZE)


def make_masked_source(root: Path, count: int = 4, size: int = 512) -> Path:
    """A small ``images/`` + ``masks/`` folder of random images with one elliptic object each (synthetic source)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        centre = tuple(int(value) for value in rng.integers(size // 4, 3 * size // 4, 2))
        axes = tuple(int(value) for value in rng.integers(size // 10, size // 4, 2))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        cv2.imwrite(str(root / "images" / f"{index:03d}.png"), image)
        cv2.imwrite(str(root / "masks" / f"{index:03d}.png"), mask)
    return root


def stage_epochs(model: Any) -> int:  # noqa: ANN401
    """Epochs of a fit with one epoch per stage."""
    if hasattr(model, "total_epochs"):  # NF-BMR
        return int(model.total_epochs)
    if hasattr(model, "stages"):  # PatchAE / PatchVQVAE
        return len(model.stages)
    if hasattr(model, "pretrain_epochs"):  # MSFlow
        return int(model.pretrain_epochs) + 1
    return 1


def stage_name(model: Any) -> str:  # noqa: ANN401
    """The current training stage, for models that have several."""
    if hasattr(model, "stages"):
        return str(model.stage)
    if hasattr(model, "total_epochs"):
        return ("tnf", "bmr")[model.stage - 1]
    if getattr(model, "pretrain_epochs", 0):
        return "pretrain" if model.in_pretraining() else "flows"
    return "train"


# ---------------------------------------------------------------------------------------------------------- memory
class MemoryProbe:
    """Peak memory of a phase: process RSS high-water mark on CPU, allocated device memory on CUDA."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.start = 0

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        return 0

    def begin(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            import gc

            gc.collect()
            LIBC.malloc_trim(0)  # give freed heap pages back, so that the RSS at the start is live memory
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.start = self._status("VmRSS:")
        self.cpu_start = time.process_time()

    def end(self) -> dict[str, float]:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = self._status("VmHWM:")
        return {
            "peak_gib": peak / GIB,
            "delta_gib": max(0, peak - self.start) / GIB,
            "cpu_s": time.process_time() - self.cpu_start,
        }


def timed_calls(owner: Any, attribute: str, totals: dict[str, float], device: str) -> None:  # noqa: ANN401
    """Wrap ``owner.attribute`` (a callable): its wall and CPU time accumulate in ``totals``."""
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        result = original(*args, **kwargs)
        synchronize(device)
        totals["cpu_side_s"] += time.perf_counter() - start
        totals["cpu_side_cpu_s"] += time.process_time() - cpu_start
        return result

    setattr(owner, attribute, wrapper)


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------- worker
def run_worker(name: str, device: str, batch_size: int | None, eval_batch_size: int, status_file: Path) -> dict:
    """Build, fit (two steps per stage), validate and test one paper config in this process; return the figures."""
    import torch
    from anomalib.data import ImageBatch, ImageItem
    from lightning.pytorch import Callback, LightningDataModule, Trainer
    from torch.utils.data import DataLoader, Dataset

    from anomalib_ext.components.data_synthesis import SyntheticAnomalyDataset

    def phase(text: str) -> None:
        status_file.write_text(text)

    torch.manual_seed(0)
    work_dir = Path(tempfile.mkdtemp(prefix="paper-scale-"))
    phase("build")
    probe = MemoryProbe(device)
    probe.begin()
    start = time.perf_counter()
    model, config = build_model(name, work_dir=work_dir)
    build = {"build_s": time.perf_counter() - start, **{f"build_{k}": v for k, v in probe.end().items()}}
    height, width = input_size(model)
    data = config.get("data", {}).get("init_args", {})
    train_batch = batch_size or int(data.get("train_batch_size", 8))
    eval_batch = min(eval_batch_size, int(data.get("eval_batch_size", eval_batch_size)))
    # Trained = received a gradient in some training step (``requires_grad`` alone over-counts: Anomalib's
    # TimmFeatureExtractor keeps it on weights that it runs under ``no_grad``).
    trained: set[str] = set()
    for parameter_name, parameter in model.named_parameters():
        if parameter.requires_grad:
            parameter.register_post_accumulate_grad_hook(lambda _, key=parameter_name: trained.add(key))

    class RandomImages(Dataset):
        def __init__(self, count: int, anomalous: bool) -> None:
            self.count, self.anomalous = count, anomalous

        def __len__(self) -> int:
            return self.count

        def __getitem__(self, index: int) -> ImageItem:
            generator = torch.Generator().manual_seed(index + 1000 * self.anomalous)
            mask = torch.zeros(height, width, dtype=torch.bool)
            if self.anomalous:
                mask[height // 3 : height // 2, width // 3 : width // 2] = True
            return ImageItem(
                image=torch.rand(3, height, width, generator=generator),
                gt_label=torch.tensor(int(self.anomalous)),
                gt_mask=mask,
                image_path=f"random_{index}.png",
            )

    def loader(count: int, batch: int, anomalous: bool) -> DataLoader:
        return DataLoader(RandomImages(count, anomalous), batch_size=batch, collate_fn=ImageBatch.collate)

    class RandomData(LightningDataModule):
        """Random training images as ``train_data``: models that synthesise anomalies wrap it (DataLoader side)."""

        def __init__(self) -> None:
            super().__init__()
            self.train_data = RandomImages(2 * train_batch, False)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.train_data, batch_size=train_batch, collate_fn=ImageBatch.collate)

        def val_dataloader(self) -> DataLoader:
            return loader(eval_batch, eval_batch, True)

    # Synthetic anomalies (MSFlow pre-training, DenseHybridAD negatives) are made per sample by the training dataset;
    # with num_workers=0 (here) they run in this process between two steps, so their time is the CPU-side work a step
    # waits for unless DataLoader workers overlap it.
    cpu_side = {"cpu_side_s": 0.0, "cpu_side_cpu_s": 0.0}
    timed_calls(SyntheticAnomalyDataset, "synthetic", cpu_side, device)

    records: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}

    class Meter(Callback):
        def _begin(self, kind: str) -> None:
            phase(f"{kind} step {len(records[kind]) + 1}" + (f" ({stage_name(model)})" if kind == "train" else ""))
            probe.begin()
            self.start = time.perf_counter()

        def _end(self, kind: str, images: int) -> None:
            synchronize(device)
            seconds = time.perf_counter() - self.start
            record = {"seconds": seconds, "images": images, **probe.end()}
            if kind == "train":  # the synthesis done while this batch was loaded
                record.update(stage=stage_name(model), **cpu_side)
                cpu_side.update(cpu_side_s=0.0, cpu_side_cpu_s=0.0)
            records[kind].append(record)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            self._begin("train")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            self._end("train", len(batch.image))

        def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            # Callbacks run before the model's own hook, where memory-bank models fit (PaDiM's Gaussian).
            phase(f"end of training epoch {trainer.current_epoch} ({stage_name(model)})")

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
            self._begin("validation")

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
            self._end("validation", len(batch.image))

        def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
            self._begin("test")

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
            self._end("test", len(batch.image))

    epochs = stage_epochs(model)
    settings = {
        "accelerator": device,
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": work_dir,
        **{key: value for key, value in model.trainer_arguments.items() if key != "callbacks"},
        # two training steps per stage, one validation batch after the last stage, one test batch
        "max_epochs": epochs,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "limit_test_batches": 1,
        "check_val_every_n_epoch": epochs,
    }
    trainer = Trainer(callbacks=[Meter()], **settings)
    phase("fit")
    probe_fit = MemoryProbe(device)
    probe_fit.begin()
    start = time.perf_counter()
    trainer.fit(model, datamodule=RandomData())
    fit = {"fit_s": time.perf_counter() - start, **{f"fit_{k}": v for k, v in probe_fit.end().items()}}
    phase("test")
    trainer.test(model, dataloaders=loader(eval_batch, eval_batch, True), verbose=False)
    phase("checkpoint")
    checkpoints = {}
    path = work_dir / "full.ckpt"
    trainer.save_checkpoint(path)
    checkpoints["checkpoint_mib"] = path.stat().st_size / 2**20
    trainer.save_checkpoint(work_dir / "weights.ckpt", weights_only=True)
    checkpoints["weights_checkpoint_mib"] = (work_dir / "weights.ckpt").stat().st_size / 2**20
    if "slim_checkpoint" in model.hparams:
        model.hparams["slim_checkpoint"] = True
        slim = work_dir / "slim.ckpt"
        trainer.save_checkpoint(slim, weights_only=True)
        checkpoints["slim_checkpoint_mib"] = slim.stat().st_size / 2**20
    phase("done")
    return {
        "model": type(model).__name__,
        "device": device,
        "input_size": [height, width],
        "train_batch_size": train_batch,
        "eval_batch_size": eval_batch,
        "params_trainable": sum(p.numel() for key, p in model.named_parameters() if key in trained),
        "params_frozen": sum(p.numel() for key, p in model.named_parameters() if key not in trained),
        "params_requires_grad": sum(p.numel() for p in model.parameters() if p.requires_grad),
        **build,
        **fit,
        **checkpoints,
        "steps": records,
    }


# ---------------------------------------------------------------------------------------------------------- parent
def process_tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its children."""
    import psutil

    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except psutil.Error:
        return 0


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one config in a fresh worker process, watching its memory and time."""
    with tempfile.TemporaryDirectory(prefix="paper-scale-") as tmp:
        status, result = Path(tmp) / "status", Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--worker", name, "--device", args.device, "--result", str(result)]
        command += ["--status", str(status), "--eval-batch-size", str(args.eval_batch_size)]
        if args.batch_size:
            command += ["--batch-size", str(args.batch_size)]
        log = Path(tmp) / "log"
        start, peak, reason = time.time(), 0, None
        with log.open("w") as output:
            environment = {**os.environ, **WORKER_ENVIRONMENT}
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO, env=environment)
            while process.poll() is None:
                rss = process_tree_rss(process.pid)
                peak = max(peak, rss)
                if rss > args.max_rss_gib * GIB:
                    reason = f"stopped: RSS {rss / GIB:.1f} GiB above --max-rss-gib {args.max_rss_gib}"
                elif time.time() - start > args.timeout:
                    reason = f"stopped: over --timeout {args.timeout} s"
                if reason:
                    process.kill()
                    process.wait()
                    break
                time.sleep(0.2)
        where = status.read_text() if status.exists() else "start"
        if result.exists() and process.returncode == 0:
            figures = json.loads(result.read_text())
            figures.update(config=name, ok=True, wall_s=time.time() - start, watched_peak_rss_gib=peak / GIB)
            return figures
        tail = log.read_text()[-3000:]
        error = reason or f"exit code {process.returncode}"
        last = [line for line in tail.splitlines() if line.strip()][-1:] or [""]
        return {
            "config": name,
            "ok": False,
            "error": error,
            "phase": where,
            "last_line": last[0],
            "log_tail": tail,
            "watched_peak_rss_gib": peak / GIB,
            "wall_s": time.time() - start,
        }


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Per-stage and per-image figures of one successful result.

    Times are CPU seconds of the worker (``process_time``) on ``--device cpu``, where a shared machine makes wall time
    depend on the other jobs, and wall seconds on ``--device cuda``.
    """
    cuda = result["device"] == "cuda"
    time_key, side_key = ("seconds", "cpu_side_s") if cuda else ("cpu_s", "cpu_side_cpu_s")
    steps = result["steps"]
    stages: dict[str, list[dict]] = {}
    for step in steps["train"]:
        stages.setdefault(step["stage"], []).append(step)
    test = steps["test"][0]
    return {
        "stages": {
            stage: {
                "s_per_image": sum(s[time_key] / s["images"] for s in items) / len(items),
                "wall_s_per_step": sum(s["seconds"] for s in items) / len(items),
                "peak_gib": max(s["peak_gib"] for s in items),
                "delta_gib": max(s["delta_gib"] for s in items),
                "cpu_side_share": sum(s[side_key] for s in items) / max(1e-9, sum(s[time_key] for s in items)),
                "cpu_side_ms_per_image": 1000 * sum(s[side_key] / s["images"] for s in items) / len(items),
            }
            for stage, items in stages.items()
        },
        "test_s_per_image": test[time_key] / test["images"],
        "test_wall_s_per_image": test["seconds"] / test["images"],
        "test_peak_gib": test["peak_gib"],
        "test_delta_gib_per_image": test["delta_gib"] / test["images"],
    }


def markdown(results: list[dict[str, Any]]) -> str:
    """The results table, with ratios to the stock references of the same run."""
    summaries = {r["config"]: summary(r) for r in results if r["ok"]}
    references = [summaries.get(name) for name in STOCK_REFERENCES]
    # Per-image test memory = the test batch's peak (weights, fitted state and activations; batch 1 by default).
    stock_peak = max((s["test_peak_gib"] for n, s in summaries.items() if n.startswith("stock/")), default=0)
    lines = [
        "| config | model | input | params trained / not trained (M) | train, per stage: s/image (wall s/step, batch) | "
        "train peak / Δ GiB | CPU-side synthesis: share of train time (per image) | test s/image (wall) | test peak / Δ GiB per image | "
        "test peak vs largest stock peak | test time vs FastFlow / PatchCore | checkpoint MiB: full / weights / slim |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        name = result["config"]
        if not result["ok"]:
            errors = [
                line for line in result["log_tail"].splitlines() if line.split(":")[0].endswith(("Error", "Exception"))
            ]
            cause = f"{result['error']} in phase `{result['phase']}`" + (f": {errors[-1][:200]}" if errors else "")
            lines.append(f"| {name} | **failed**: {cause} |" + " |" * 10)
            continue
        s = summaries[name]
        batch = result["train_batch_size"]
        stage_rows = s["stages"].items()
        time_text = "<br>".join(
            f"{k}: {v['s_per_image']:.2f} ({v['wall_s_per_step']:.1f}, {batch})" for k, v in stage_rows
        )
        memory_text = "<br>".join(f"{v['peak_gib']:.2f} / {v['delta_gib']:.2f}" for v in s["stages"].values())
        share_text = "<br>".join(
            f"{100 * v['cpu_side_share']:.1f} % ({v['cpu_side_ms_per_image']:.0f} ms/img)" for v in s["stages"].values()
        )
        ratios = " / ".join(
            f"{s['test_s_per_image'] / ref['test_s_per_image']:.1f}x" if ref else "n/a" for ref in references
        )
        versus_stock = f"{s['test_peak_gib'] / stock_peak:.1f}x" if stock_peak else "n/a"
        sizes = [result["checkpoint_mib"], result["weights_checkpoint_mib"], result.get("slim_checkpoint_mib")]
        size_text = " / ".join("-" if size is None else f"{size:.0f}" for size in sizes)
        lines.append(
            f"| {name} | {result['model']} | {result['input_size'][0]}x{result['input_size'][1]} | "
            f"{result['params_trainable'] / 1e6:.1f} / {result['params_frozen'] / 1e6:.1f} | {time_text} | "
            f"{memory_text} | {share_text} | {s['test_s_per_image']:.2f} ({s['test_wall_s_per_image']:.1f}) | "
            f"{s['test_peak_gib']:.2f} / {s['test_delta_gib_per_image']:.2f} | {versus_stock} | {ratios} | {size_text} |"
        )
    return "\n".join(lines)


def select(names: list[str], filters: str | None) -> list[str]:
    """Configs named by the comma-separated filters: exact names, else names containing the filter (all without one)."""
    if not filters:
        return names
    wanted = [item.strip() for item in filters.split(",") if item.strip()]
    return [name for name in names if any(item == name or (item not in names and item in name) for item in wanted)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", help="comma-separated substrings of config names (default: all paper configs)")
    parser.add_argument("--batch-size", type=int, help="training batch size (default: each config's)")
    parser.add_argument("--eval-batch-size", type=int, default=1, help="validation/test batch (capped by the config's)")
    parser.add_argument("--max-rss-gib", type=float, default=8.0, help="stop a worker whose RSS exceeds this")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    parser.add_argument("--output", type=Path, help="JSON file for the raw results (and the table beside it, .md)")
    parser.add_argument("--table", type=Path, help="only print the table of an earlier --output JSON")
    parser.add_argument("--list", action="store_true", help="print the paper configs and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--status", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        figures = run_worker(args.worker, args.device, args.batch_size, args.eval_batch_size, args.status)
        args.result.write_text(json.dumps(figures))
        return 0
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return 0
    names = select(paper_configs(), args.models)
    if args.list:
        print("\n".join(names))
        return 0
    results = []
    for name in names:
        print(f"[paper_scale] {name} ...", file=sys.stderr, flush=True)
        results.append(run_one(name, args))
        outcome = "ok" if results[-1]["ok"] else f"FAILED ({results[-1]['error']}, phase {results[-1]['phase']})"
        print(f"[paper_scale] {name}: {outcome} in {results[-1]['wall_s']:.0f} s", file=sys.stderr, flush=True)
        if args.output:
            args.output.write_text(json.dumps(results, indent=1))
    if args.output:
        args.output.with_suffix(".md").write_text(markdown(results) + "\n")
    print(markdown(results))
    return 0 if all(result["ok"] for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
