"""Inside one cell's subprocess: build model, datamodule and engine with Anomalib's own CLI parser, seed, fit, test,
and write ``result.json`` (metrics, timings, peak memory, resolved settings, or the error)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from anomalib_ext.cli.compare.process import source_hash
from anomalib_ext.cli.compare.spec import EXAMPLES_FILE, RESULT_FILE


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
            "class_path": "anomalib_ext.cli.compare.examples.ExampleCollector",
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


if __name__ == "__main__":
    raise SystemExit(run_cell_worker(Path(sys.argv[1])))
