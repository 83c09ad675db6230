"""Figures of the comparison runner: a grouped bar chart per metric and side-by-side example anomaly maps."""

from __future__ import annotations

from pathlib import Path

from anomalib_ext.cli.compare.process import read_result
from anomalib_ext.cli.compare.report import COST_COLUMNS, METRIC_LABELS, STANDARD_METRICS
from anomalib_ext.cli.compare.spec import EXAMPLES_FILE, NO_CATEGORY, Cell, GridSpec, safe_name


def write_plots(grid: GridSpec, frame, output: Path) -> dict[str, Path]:  # noqa: ANN001 - a pandas DataFrame
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
                errors.append(values.std(ddof=1) if len(values) > 1 else 0.0)
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
        axis.set_title(f"{METRIC_LABELS[column]} (mean ± std over seeds)")
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
            models = [model for model in grid.models if model.runs_on(category)]
            loaded = {}
            for model in models:
                path = Cell(model, dataset, category, grid.seeds[0]).directory(output) / EXAMPLES_FILE
                if path.is_file():
                    with np.load(path) as archive:
                        loaded[model.name] = {key: archive[key] for key in archive.files}
            if not loaded:
                continue
            reference = next(iter(loaded.values()))
            paths = list(reference["image_path"])
            columns = ["image + ground truth", *[model.name for model in models]]
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
                for column, model in enumerate(models, start=1):
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
            path = plots / f"maps_{safe_name(dataset.name)}_{safe_name(category or NO_CATEGORY)}.png"
            figure.savefig(path, dpi=100)
            plt.close(figure)
            written[f"maps/{dataset.name}/{category or NO_CATEGORY}"] = path
    return written
