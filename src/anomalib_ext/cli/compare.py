"""Compare models on a grid of datasets x categories x seeds through the stock Anomalib Engine; write tables and plots.

Anomalib's own ``anomalib benchmark`` only loads models from a whitelist of Anomalib modules, so plugin models cannot
take part in it. This runner reads a grid spec (YAML, format in ``docs/comparison.md``) and, for every cell
(model x dataset x category x seed), runs exactly what ``anomalib train --config <model config> <overrides>`` runs --
``Engine.fit`` then ``Engine.test`` on objects built by Anomalib's own CLI parser -- in a fresh subprocess, so that a
crash, an out-of-memory kill or a timeout fails only that cell and peak memory is measured per cell.

Outputs under the output folder::

    results.csv            one row per cell: metrics, fit/test seconds, peak memory, status, error
    results.md             the same as Markdown, plus a per-model summary (mean over categories and seeds)
    plots/<metric>.png     a grouped bar chart per metric
    plots/maps_<dataset>_<category>.png   example anomaly maps of every model side by side
    cells/<model>/<dataset>/<category>/seed<k>/   per-cell log.txt, result.json, examples.npz, Anomalib's results

Finished cells are not recomputed on a rerun (unless their settings or config files changed, or ``--force``); failed
cells are retried.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STANDARD_METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO", "pixel_MIoU")
COST_COLUMNS = ("fit_seconds", "test_seconds", "peak_rss_mib", "peak_gpu_mib")
METRIC_LABELS = {
    "image_AUROC": "image AUROC",
    "pixel_AUROC": "pixel AUROC",
    "pixel_AUPRO": "AUPRO",
    "pixel_MIoU": "mIoU",
    "fit_seconds": "fit s",
    "test_seconds": "test s",
    "peak_rss_mib": "peak RSS MiB",
    "peak_gpu_mib": "peak GPU MiB",
}
RESULT_FILE = "result.json"
EXAMPLES_FILE = "examples.npz"
NO_CATEGORY = "-"


class GridSpecError(ValueError):
    """The grid spec file is malformed; the message says which entry and what was expected."""


@dataclass(frozen=True)
class ModelEntry:
    """One model of the grid: an Anomalib config file and/or an inline ``class_path`` spec, plus CLI overrides."""

    name: str
    config: Path | None = None
    model: dict[str, Any] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of the grid: an Anomalib datamodule spec (``class_path``/``init_args``) and its categories."""

    name: str
    data: dict[str, Any]
    categories: tuple[str | None, ...] = (None,)
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GridSpec:
    """A parsed grid spec (see ``docs/comparison.md``)."""

    path: Path
    models: tuple[ModelEntry, ...]
    datasets: tuple[DatasetEntry, ...]
    seeds: tuple[int, ...] = (0,)
    overrides: dict[str, Any] = field(default_factory=dict)
    output: Path = Path("results/compare")
    timeout: float | None = None
    num_examples: int = 3


@dataclass(frozen=True)
class Cell:
    """One model x dataset x category x seed run."""

    model: ModelEntry
    dataset: DatasetEntry
    category: str | None
    seed: int

    @property
    def label(self) -> str:
        return f"{self.model.name} / {self.dataset.name} / {self.category or NO_CATEGORY} / seed {self.seed}"

    def directory(self, output: Path) -> Path:
        parts = (self.model.name, self.dataset.name, self.category or NO_CATEGORY, f"seed{self.seed}")
        return output.joinpath("cells", *(_safe_name(part) for part in parts))


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)


# ----------------------------------------------------------------------------------------------------------------- spec
def _require_mapping(value: Any, where: str) -> dict[str, Any]:  # noqa: ANN401
    if value is None:
        return {}
    if not isinstance(value, dict):
        msg = f"{where} must be a mapping, got {type(value).__name__}: {value!r}"
        raise GridSpecError(msg)
    return value


def _resolve_path(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def load_grid(path: str | Path) -> GridSpec:
    """Read and validate a grid spec. Config paths inside it are relative to the spec file's folder."""
    path = Path(path)
    if not path.is_file():
        msg = f"Grid spec not found: {path}"
        raise FileNotFoundError(msg)
    raw = _require_mapping(yaml.safe_load(path.read_text()), str(path))
    unknown = set(raw) - {"output", "seeds", "overrides", "timeout", "num_examples", "models", "datasets"}
    if unknown:
        msg = f"{path}: unknown top-level keys {sorted(unknown)}; expected output, seeds, overrides, timeout, num_examples, models, datasets."
        raise GridSpecError(msg)
    base = path.parent.resolve()
    models = []
    for index, entry in enumerate(raw.get("models") or []):
        where = f"{path}: models[{index}]"
        entry = _require_mapping(entry, where)
        if "name" not in entry or not ("config" in entry or "model" in entry):
            msg = f"{where} needs a `name` and a `config` (Anomalib config file) and/or a `model` (class_path spec)."
            raise GridSpecError(msg)
        config = _resolve_path(entry["config"], base) if entry.get("config") else None
        if config is not None and not config.is_file():
            msg = f"{where}: config file {config} not found (paths are relative to the spec file's folder {base})."
            raise GridSpecError(msg)
        model = entry.get("model")
        if isinstance(model, str):
            model = {"class_path": model}
        models.append(
            ModelEntry(
                name=str(entry["name"]),
                config=config,
                model=_require_mapping(model, f"{where}.model") or None,
                overrides=_require_mapping(entry.get("overrides"), f"{where}.overrides"),
            )
        )
    datasets = []
    for index, entry in enumerate(raw.get("datasets") or []):
        where = f"{path}: datasets[{index}]"
        entry = _require_mapping(entry, where)
        data = entry.get("data")
        if isinstance(data, str):
            data = {"class_path": data}
        if "name" not in entry or not isinstance(data, dict) or "class_path" not in data:
            msg = f"{where} needs a `name` and a `data` mapping with `class_path` (and optional `init_args`)."
            raise GridSpecError(msg)
        categories = entry.get("categories") or [None]
        if not isinstance(categories, list):
            categories = [categories]
        datasets.append(
            DatasetEntry(
                name=str(entry["name"]),
                data=data,
                categories=tuple(None if category is None else str(category) for category in categories),
                overrides=_require_mapping(entry.get("overrides"), f"{where}.overrides"),
            )
        )
    if not models or not datasets:
        msg = f"{path}: the grid needs at least one entry under `models` and one under `datasets`."
        raise GridSpecError(msg)
    for kind, names in (("model", [m.name for m in models]), ("dataset", [d.name for d in datasets])):
        if len(set(names)) != len(names):
            msg = f"{path}: {kind} names must be unique, got {names}."
            raise GridSpecError(msg)
    seeds = raw.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not seeds or not all(isinstance(seed, int) for seed in seeds):
        msg = f"{path}: `seeds` must be an integer or a list of integers, got {seeds!r}."
        raise GridSpecError(msg)
    return GridSpec(
        path=path,
        models=tuple(models),
        datasets=tuple(datasets),
        seeds=tuple(seeds),
        overrides=_require_mapping(raw.get("overrides"), f"{path}: overrides"),
        output=Path(raw.get("output", "results/compare")),
        timeout=None if raw.get("timeout") is None else float(raw["timeout"]),
        num_examples=int(raw.get("num_examples", 3)),
    )


def grid_cells(grid: GridSpec) -> list[Cell]:
    """All cells in a stable order: dataset, category, seed, then model (so one category's models finish together)."""
    return [
        Cell(model, dataset, category, seed)
        for dataset in grid.datasets
        for category in dataset.categories
        for seed in grid.seeds
        for model in grid.models
    ]


def _cli_value(value: Any) -> str:  # noqa: ANN401
    """A YAML/JSON value as one command-line token for jsonargparse."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict | list | tuple):
        return json.dumps(value)
    return str(value)


def _override_arguments(overrides: dict[str, Any]) -> list[str]:
    arguments: list[str] = []
    for key, value in overrides.items():
        arguments += [f"--{key.lstrip('-')}", _cli_value(value)]
    return arguments


def cell_arguments(grid: GridSpec, cell: Cell) -> list[str]:
    """The ``anomalib train`` arguments of a cell, in order of precedence (later wins).

    model config file < inline ``model`` spec < dataset ``data`` and category < grid ``overrides`` < dataset
    ``overrides`` < model ``overrides`` < seed. Overrides come after the classes they refer to, so ``model.*`` and
    ``data.*`` keys work whether the class comes from a config file or an inline spec.
    """
    arguments: list[str] = []
    if cell.model.config is not None:
        arguments += ["--config", str(cell.model.config)]
    if cell.model.model is not None:
        arguments += ["--model", json.dumps(cell.model.model)]
    arguments += ["--data", json.dumps(cell.dataset.data)]
    if cell.category is not None:
        arguments += ["--data.category", cell.category]
    arguments += _override_arguments(grid.overrides)
    arguments += _override_arguments(cell.dataset.overrides)
    arguments += _override_arguments(cell.model.overrides)
    arguments += ["--seed_everything", str(cell.seed)]
    return arguments


def cell_fingerprint(grid: GridSpec, cell: Cell) -> str:
    """Hash of everything that defines a cell's result: its arguments and the contents of its config file."""
    digest = hashlib.sha256(json.dumps([cell_arguments(grid, cell), grid.num_examples]).encode())
    if cell.model.config is not None:
        digest.update(cell.model.config.read_bytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------- worker
def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kilobytes on Linux


def _standard_test_metrics() -> list:
    """Metrics every cell reports, whatever the model's own evaluator computes."""
    from anomalib.metrics import AUPRO, AUROC

    metrics = [
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
    ]
    try:
        from anomalib_ext.metrics import MIoU
    except ImportError:  # pragma: no cover - the metric ships with the package
        return metrics
    return [*metrics, MIoU(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False)]


def _with_standard_metrics(model) -> None:  # noqa: ANN001 - an AnomalibModule
    """Give ``model`` an evaluator with its own test metrics plus the standard ones it lacks."""
    from anomalib.metrics import Evaluator

    own_test = list(model.evaluator.test_metrics) if model.evaluator is not None else []
    own_val = list(model.evaluator.val_metrics) if model.evaluator is not None else []
    names = {metric.name for metric in own_test}
    extra = [metric for metric in _standard_test_metrics() if metric.name not in names]
    model.evaluator = Evaluator(val_metrics=own_val, test_metrics=own_test + extra)


def _number(value: Any) -> float | None:  # noqa: ANN401
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def model_source_dirs(model_class: type) -> list[Path]:
    """Folders whose Python sources define ``model_class``'s behaviour: its own package folder, plus the shared
    ``components`` and ``metrics`` of anomalib-ext for plugin models."""
    module = sys.modules[model_class.__module__]
    folders = [Path(module.__file__).resolve().parent]
    if model_class.__module__.startswith("anomalib_ext."):
        package = Path(sys.modules["anomalib_ext"].__file__).resolve().parent
        folders += [package / "components", package / "metrics"]
    return folders


def source_hash(folders: Sequence[str | Path]) -> str:
    """Hash of the ``*.py`` files under ``folders`` (names and contents); a missing folder hashes as empty."""
    digest = hashlib.sha256()
    for folder in map(Path, folders):
        for path in sorted(folder.rglob("*.py")) if folder.is_dir() else []:
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _plain(value: Any) -> Any:  # noqa: ANN401
    """A jsonargparse Namespace as nested dicts (other values unchanged)."""
    return value.as_dict() if hasattr(value, "as_dict") else value


def summarize_error(text: str) -> str:
    """One line for the tables; jsonargparse's "Does not validate against any of the Union subtypes" is reduced to
    the underlying errors (the constructor's own message), without the dump of the given value."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    if "Does not validate against any of the Union subtypes" in lines[0]:
        reasons = [
            line.removeprefix("- ")
            for line in lines
            if line.startswith("- ") and not line.startswith("- Expected a <class 'NoneType'>")
        ]
        if reasons:
            return f"{lines[0].split(':')[0]}: {'; '.join(reasons)}"
    return lines[0]


def run_cell_worker(job_file: Path) -> int:
    """Inside the cell subprocess: build model/data/engine with Anomalib's CLI parser, fit, test, write result.json."""
    job = json.loads(Path(job_file).read_text())
    directory = Path(job["directory"])
    result: dict[str, Any] = {"status": "failed", "fingerprint": job["fingerprint"], "arguments": job["arguments"]}
    try:
        import torch
        from anomalib.cli import AnomalibCLI
        from lightning.pytorch import seed_everything

        # Anomalib 2.7's CLI accepts --seed_everything but never applies it: seed before it instantiates the classes.
        seed_everything(job["seed"], workers=True)

        collector = {
            "class_path": f"{__name__}.ExampleCollector",
            "init_args": {"path": str(directory / EXAMPLES_FILE), "num_examples": job["num_examples"]},
        }
        arguments = [
            "fit",
            *job["arguments"],
            "--default_root_dir",
            str(directory / "anomalib"),
            "--trainer.callbacks+",
            json.dumps(collector),
        ]
        cli = AnomalibCLI(arguments, run=False)
        model, datamodule, engine = cli.model, cli.datamodule, cli.engine
        _with_standard_metrics(model)
        result["source_dirs"] = [str(folder) for folder in model_source_dirs(type(model))]
        result["source_hash"] = source_hash(result["source_dirs"])
        resolved = cli.config[cli.subcommand]
        result["resolved"] = json.loads(
            json.dumps({key: _plain(resolved.get(key)) for key in ("model", "data", "trainer")}, default=str)
        )
        start = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        result["fit_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        metrics = engine.test(model=model, datamodule=datamodule, verbose=False)
        result["test_seconds"] = time.perf_counter() - start
        result["metrics"] = {
            key: _number(value) for key, value in (metrics[0] if metrics else {}).items() if _number(value) is not None
        }
        result["device"] = str(engine.trainer.strategy.root_device)
        if torch.cuda.is_available() and engine.trainer.strategy.root_device.type == "cuda":
            result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["status"] = "ok"
        rank = engine.trainer.global_rank
    except BaseException as error:  # noqa: BLE001 - any failure becomes the cell's reported error
        traceback.print_exc()
        result["error_detail"] = f"{type(error).__name__}: {error}".strip()
        result["error"] = summarize_error(result["error_detail"])
        rank = int(os.environ.get("LOCAL_RANK", "0"))  # under DDP only the launching process writes the result
    result["peak_rss_mib"] = _peak_rss_mib()
    if rank == 0:
        (directory / RESULT_FILE).write_text(json.dumps(result, indent=2))
    return 0 if result["status"] == "ok" else 1


def _lightning_callback_base() -> type:
    from lightning.pytorch.callbacks import Callback

    return Callback


class ExampleCollector(_lightning_callback_base()):  # type: ignore[misc]
    """Keeps the test outputs of anomalous images and saves ``num_examples`` of them (evenly spaced by path).

    The batches are read at the end of the test epoch, after Anomalib's post-processor has normalised them in place,
    so maps are on the model's normalised scale (0.5 = its threshold) and ``pred_mask`` is the evaluated mask.
    """

    MAX_SIDE = 160

    def __init__(self, path: str, num_examples: int = 3) -> None:
        super().__init__()
        self.path = Path(path)
        self.num_examples = num_examples
        self._batches: list = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001, ARG002
        labels = getattr(outputs, "gt_label", None)
        if self.num_examples > 0 and labels is not None and bool(labels.bool().any()):
            self._batches.append(outputs)

    def on_test_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001, ARG002
        import numpy as np
        import torch
        import torch.nn.functional as F

        examples = []
        for batch in self._batches:
            if batch.anomaly_map is None:
                continue
            for index in torch.nonzero(batch.gt_label.bool()).flatten().tolist():
                examples.append((str(batch.image_path[index]), batch, index))
        self._batches = []
        if not examples or trainer.global_rank != 0:
            return
        examples.sort(key=lambda item: item[0])
        picks = np.unique(np.linspace(0, len(examples) - 1, min(self.num_examples, len(examples))).round().astype(int))

        def resized(tensor: torch.Tensor | None, size: tuple[int, int], mode: str) -> np.ndarray | None:
            if tensor is None:
                return None
            tensor = tensor.detach().float().cpu().reshape(1, 1, *tensor.shape[-2:])
            return F.interpolate(tensor, size=size, mode=mode)[0, 0].numpy()

        arrays: dict[str, list] = {
            "image_path": [],
            "anomaly_map": [],
            "gt_mask": [],
            "pred_mask": [],
            "pred_score": [],
        }
        for pick in picks:
            path, batch, index = examples[pick]
            height, width = batch.anomaly_map.shape[-2:]
            scale = min(1.0, self.MAX_SIDE / max(height, width))
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            arrays["image_path"].append(path)
            arrays["anomaly_map"].append(resized(batch.anomaly_map[index], size, "bilinear").astype(np.float16))
            gt = None if batch.gt_mask is None else resized(batch.gt_mask[index], size, "nearest")
            arrays["gt_mask"].append(np.zeros(size, bool) if gt is None else gt > 0.5)
            pred = None if batch.pred_mask is None else resized(batch.pred_mask[index], size, "nearest")
            arrays["pred_mask"].append(np.zeros(size, bool) if pred is None else pred > 0.5)
            score = None if batch.pred_score is None else batch.pred_score.reshape(-1)[index]
            arrays["pred_score"].append(float("nan") if score is None else float(score))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            self.path,
            image_path=np.array(arrays["image_path"]),
            anomaly_map=np.stack(arrays["anomaly_map"]),
            gt_mask=np.stack(arrays["gt_mask"]),
            pred_mask=np.stack(arrays["pred_mask"]),
            has_pred_mask=np.array(examples[0][1].pred_mask is not None),
            pred_score=np.array(arrays["pred_score"], dtype=np.float32),
        )


# --------------------------------------------------------------------------------------------------------------- parent
def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _last_error_line(log: Path) -> str:
    """The exception line of a traceback in ``log`` (or its last non-empty line)."""
    text = _tail(log, 200).splitlines()
    for line in reversed(text):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*", line.strip()):
            return line.strip()
    return next((line.strip() for line in reversed(text) if line.strip()), "")


def read_result(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / RESULT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _run_isolated(command: list[str], stream, timeout: float | None) -> int | None:  # noqa: ANN001
    """Run ``command`` in its own process group; return its exit code, or ``None`` after killing it at ``timeout``.

    The whole group is killed on a timeout or when the runner itself is interrupted, so no cell process (nor a DDP
    rank it started) outlives the runner.
    """
    process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        return None
    except BaseException:
        _kill_group(process)
        raise


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def is_finished(result: dict[str, Any] | None, fingerprint: str) -> bool:
    """A cell is done when it succeeded with the same settings and its model's source code is unchanged since."""
    return bool(
        result
        and result.get("status") == "ok"
        and result.get("fingerprint") == fingerprint
        and result.get("source_hash") == source_hash(result.get("source_dirs", []))
    )


def run_cell(grid: GridSpec, cell: Cell, output: Path, force: bool = False) -> tuple[dict[str, Any], bool]:
    """Run one cell in a subprocess unless it already finished with the same fingerprint; returns (result, skipped)."""
    directory = cell.directory(output)
    fingerprint = cell_fingerprint(grid, cell)
    previous = read_result(directory)
    if not force and is_finished(previous, fingerprint):
        return previous, True
    directory.mkdir(parents=True, exist_ok=True)
    for stale in (RESULT_FILE, EXAMPLES_FILE):
        (directory / stale).unlink(missing_ok=True)
    job = {
        "directory": str(directory.resolve()),
        "arguments": cell_arguments(grid, cell),
        "fingerprint": fingerprint,
        "num_examples": grid.num_examples,
        "seed": cell.seed,
    }
    job_file = directory / "job.json"
    job_file.write_text(json.dumps(job, indent=2))
    log = directory / "log.txt"
    command = [sys.executable, "-m", __name__, "--worker", str(job_file.resolve())]
    start = time.perf_counter()
    with log.open("w") as stream:
        stream.write(f"# equivalent: anomalib train {shlex.join(job['arguments'])}\n")
        stream.flush()
        returncode = _run_isolated(command, stream, grid.timeout)
    result = read_result(directory)
    if result is None:
        if returncode is None:
            error = f"timed out after {grid.timeout:g} s"
        else:
            reason = _last_error_line(log) or "no output"
            error = f"worker exited with code {returncode} ({reason})"
            if returncode < 0 or returncode == 137:
                error += " -- killed (out of memory?)"
        result = {"status": "failed", "fingerprint": fingerprint, "error": error}
        (directory / RESULT_FILE).write_text(json.dumps(result, indent=2))
    result["wall_seconds"] = time.perf_counter() - start
    return result, False


def result_row(cell: Cell, result: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "model": cell.model.name,
        "dataset": cell.dataset.name,
        "category": cell.category or NO_CATEGORY,
        "seed": cell.seed,
        "status": result.get("status", "failed"),
    }
    metrics = result.get("metrics", {})
    for name in STANDARD_METRICS:
        row[name] = metrics.get(name)
    for name in COST_COLUMNS:
        row[name] = result.get(name)
    for name in sorted(set(metrics) - set(STANDARD_METRICS)):
        row[name] = metrics[name]
    row["error"] = result.get("error", "")
    return row


def _format(value: Any, column: str) -> str:  # noqa: ANN401
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        if column.endswith("_seconds"):
            return f"{value:.1f}"
        if column.endswith("_mib"):
            return f"{value:.0f}"
        return f"{value:.3f}"
    return str(value)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_reports(grid: GridSpec, rows: list[dict[str, Any]], output: Path) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and ``plots/*.png``; returns the written paths by kind."""
    import pandas as pd

    output.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    csv_path = output / "results.csv"
    frame.to_csv(csv_path, index=False, float_format="%.6g")

    shown_metrics = [name for name in STANDARD_METRICS if frame[name].notna().any()]
    shown_costs = [name for name in COST_COLUMNS if frame[name].notna().any()]
    columns = ["model", "dataset", "category", "seed", *shown_metrics, *shown_costs, "status"]
    table_rows = []
    for row in rows:
        values = [_format(row[column], column) for column in columns]
        if row["status"] != "ok":
            values[-1] = " ".join(f"{row['status']}: {row['error']}".split())[:240] if row["error"] else row["status"]
        table_rows.append(values)
    header = [METRIC_LABELS.get(column, column) for column in columns]
    ok = frame[frame["status"] == "ok"]
    summary_rows = []
    for (model, dataset), group in frame.groupby(["model", "dataset"], sort=False):
        good = ok[(ok["model"] == model) & (ok["dataset"] == dataset)]
        values = [model, dataset, f"{len(good)}/{len(group)}"]
        for column in [*shown_metrics, *shown_costs]:
            series = good[column].dropna()
            if series.empty:
                values.append("")
            elif len(series) > 1 and column in STANDARD_METRICS:
                values.append(f"{series.mean():.3f} ± {series.std(ddof=0):.3f}")
            else:
                values.append(_format(float(series.mean()), column))
        summary_rows.append(values)
    summary_header = ["model", "dataset", "cells ok", *[METRIC_LABELS[c] for c in [*shown_metrics, *shown_costs]]]
    markdown = [
        f"# Comparison: `{grid.path}`",
        "",
        "Mean over categories and seeds (± population std over the cells that finished):",
        "",
        _markdown_table(summary_header, summary_rows),
        "",
        "Per cell:",
        "",
        _markdown_table(header, table_rows),
        "",
        "image/pixel AUROC, AUPRO (FPR limit 0.3) and mIoU (per-image IoU of the evaluated `pred_mask`, see docs/comparison.md) "
        "from Anomalib's `Engine.test`; fit/test seconds are wall-clock times of `Engine.fit`/`Engine.test`; peak RSS is "
        "the cell process's peak resident memory (including the Python/torch baseline).",
        "",
    ]
    markdown_path = output / "results.md"
    markdown_path.write_text("\n".join(markdown))
    paths = {"csv": csv_path, "markdown": markdown_path}
    paths.update(_write_plots(grid, frame, output))
    return paths


def _write_plots(grid: GridSpec, frame, output: Path) -> dict[str, Path]:  # noqa: ANN001 - a pandas DataFrame
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plots = output / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    models = [model.name for model in grid.models]
    groups = list(dict.fromkeys(zip(frame["dataset"], frame["category"], strict=True)))
    width = 0.8 / max(1, len(models))
    for column in [*STANDARD_METRICS, *COST_COLUMNS]:
        if not frame[column].notna().any():
            continue
        figure, axis = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * max(1, len(models)) * 0.6 + 2), 3.6))
        for model_index, model in enumerate(models):
            means, errors, failed = [], [], []
            for dataset, category in groups:
                cells = frame[
                    (frame["model"] == model) & (frame["dataset"] == dataset) & (frame["category"] == category)
                ]
                values = cells.loc[cells["status"] == "ok", column].dropna()
                means.append(values.mean() if not values.empty else np.nan)
                errors.append(values.std(ddof=0) if len(values) > 1 else 0.0)
                failed.append(bool((cells["status"] != "ok").any()))
            positions = np.arange(len(groups)) + (model_index - (len(models) - 1) / 2) * width
            axis.bar(
                positions, np.nan_to_num(means), width, yerr=errors if any(errors) else None, label=model, capsize=2
            )
            for position, mean, did_fail in zip(positions, means, failed, strict=True):
                if did_fail and np.isnan(mean):
                    axis.text(position, 0, "failed", rotation=90, ha="center", va="bottom", fontsize=7, color="red")
        axis.set_xticks(np.arange(len(groups)), [f"{d}\n{c}" for d, c in groups])
        axis.set_ylabel(METRIC_LABELS[column])
        if column in STANDARD_METRICS:
            axis.set_ylim(0, 1.05)
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        axis.set_title(METRIC_LABELS[column])
        figure.tight_layout()
        path = plots / f"{column}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written[column] = path
    written.update(_write_map_figures(grid, output))
    return written


def _write_map_figures(grid: GridSpec, output: Path) -> dict[str, Path]:
    """Per dataset/category (first seed): rows = example images, columns = image + ground truth, then each model."""
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    written: dict[str, Path] = {}
    plots = output / "plots"
    for dataset in grid.datasets:
        for category in dataset.categories:
            loaded = {}
            for model in grid.models:
                path = Cell(model, dataset, category, grid.seeds[0]).directory(output) / EXAMPLES_FILE
                if path.is_file():
                    with np.load(path) as archive:
                        loaded[model.name] = {key: archive[key] for key in archive.files}
            if not loaded:
                continue
            reference = next(iter(loaded.values()))
            paths = list(reference["image_path"])
            columns = ["image + ground truth", *[model.name for model in grid.models]]
            figure, axes = plt.subplots(
                len(paths), len(columns), figsize=(2.0 * len(columns), 2.0 * len(paths)), squeeze=False
            )
            for row, image_path in enumerate(paths):
                gt = reference["gt_mask"][row]
                try:
                    image = np.asarray(Image.open(image_path).convert("RGB").resize(gt.shape[::-1]))
                except OSError:
                    image = np.zeros((*gt.shape, 3), np.uint8)
                axes[row, 0].imshow(image)
                axes[row, 0].contour(gt, levels=[0.5], colors="red", linewidths=0.8)
                axes[row, 0].set_ylabel(Path(image_path).parent.name + "/" + Path(image_path).stem, fontsize=7)
                for column, model in enumerate(grid.models, start=1):
                    axis = axes[row, column]
                    examples = loaded.get(model.name)
                    matches = [] if examples is None else list(np.flatnonzero(examples["image_path"] == image_path))
                    if not matches:
                        result = read_result(Cell(model, dataset, category, grid.seeds[0]).directory(output)) or {}
                        note = "failed" if result.get("status") == "failed" else "no result"
                        axis.text(0.5, 0.5, note, ha="center", va="center", transform=axis.transAxes)
                        continue
                    index = matches[0]
                    anomaly_map = examples["anomaly_map"][index].astype(np.float32)
                    in_unit = anomaly_map.min() >= 0 and anomaly_map.max() <= 1
                    axis.imshow(image, alpha=1.0)
                    axis.imshow(
                        anomaly_map, cmap="jet", alpha=0.5, vmin=0 if in_unit else None, vmax=1 if in_unit else None
                    )
                    if bool(examples["has_pred_mask"]) and examples["pred_mask"][index].any():
                        axis.contour(examples["pred_mask"][index], levels=[0.5], colors="white", linewidths=0.8)
                    axis.set_xlabel(f"score {examples['pred_score'][index]:.2f}", fontsize=7)
            for axis in axes.flat:
                axis.set_xticks([])
                axis.set_yticks([])
            for column, title in enumerate(columns):
                axes[0, column].set_title(title, fontsize=8)
            figure.suptitle(
                f"{dataset.name} / {category or NO_CATEGORY}: normalised anomaly maps, white = pred_mask", fontsize=9
            )
            figure.tight_layout()
            path = plots / f"maps_{_safe_name(dataset.name)}_{_safe_name(category or NO_CATEGORY)}.png"
            figure.savefig(path, dpi=100)
            plt.close(figure)
            written[f"maps/{dataset.name}/{category or NO_CATEGORY}"] = path
    return written


def run_grid(
    grid: GridSpec,
    output: Path | None = None,
    force: bool = False,
    only: Sequence[str] | None = None,
    report_only: bool = False,
    log=print,  # noqa: ANN001
) -> list[dict[str, Any]]:
    """Run every cell (resuming finished ones), write the reports after each cell, return the result rows.

    ``only``: names of the models whose cells run; the other cells are reported from what is on disk.
    ``report_only``: run nothing, only rewrite the reports from what is on disk.
    """
    output = Path(output or grid.output)
    unknown = set(only or ()) - {model.name for model in grid.models}
    if unknown:
        msg = f"--only names unknown models {sorted(unknown)}; the grid has {[model.name for model in grid.models]}."
        raise GridSpecError(msg)
    cells = grid_cells(grid)
    rows: list[dict[str, Any]] = []
    for number, cell in enumerate(cells, start=1):
        if report_only or (only and cell.model.name not in only):
            rows.append(result_row(cell, read_result(cell.directory(output)) or _unfinished(cell.directory(output))))
            continue
        result, skipped = run_cell(grid, cell, output, force=force)
        rows.append(result_row(cell, result))
        if skipped:
            status = "done before, skipped"
        elif result["status"] == "ok":
            status = f"ok in {result.get('wall_seconds', 0):.0f} s"
        else:
            status = f"FAILED: {result.get('error', '')}"
        score = result.get("metrics", {}).get("image_AUROC")
        suffix = f", image AUROC {score:.3f}" if score is not None else ""
        log(f"[{number}/{len(cells)}] {cell.label}: {status}{suffix}")
        pending = [result_row(other, {"status": "pending"}) for other in cells[number:]]
        write_reports(grid, rows + pending, output)
    write_reports(grid, rows, output)
    return rows


def _unfinished(directory: Path) -> dict[str, Any]:
    """Status of a cell without a result: started (a job file exists) but not finished, or never run."""
    return {"status": "unfinished" if (directory / "job.json").is_file() else "not run"}


# ------------------------------------------------------------------------------------------------------------ commands
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "grid", type=Path, help="grid spec YAML (see docs/comparison.md), e.g. configs/compare/textures.yaml"
    )
    parser.add_argument("--output", type=Path, default=None, help="results folder (default: the spec's `output`)")
    parser.add_argument("--force", action="store_true", help="recompute cells that already finished")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated model names: run only their cells (the others are reported as on disk)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="run nothing; rewrite the table and plots from the finished cells"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print each cell's equivalent `anomalib train` command and stop"
    )


def _exit_on_sigterm(signum: int, frame: Any) -> None:  # noqa: ANN401, ARG001
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid)
    output = Path(args.output or grid.output)
    if args.dry_run:
        for cell in grid_cells(grid):
            print(f"# {cell.label}\nanomalib train {shlex.join(cell_arguments(grid, cell))}")
        return 0
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that a terminated runner kills its running cell
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    rows = run_grid(grid, output, force=args.force, only=only, report_only=args.report_only)
    failed = sum(row["status"] != "ok" for row in rows)
    print(f"\n{len(rows) - failed}/{len(rows)} cells ok. Table: {output / 'results.md'}, plots: {output / 'plots'}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        from anomalib_ext.cli.compare import run_cell_worker as _worker  # the importable module, not __main__

        raise SystemExit(_worker(Path(sys.argv[2])))
    from anomalib_ext.cli.main import main

    raise SystemExit(main(["compare", *sys.argv[1:]]))
