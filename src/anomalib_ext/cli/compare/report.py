"""Tables of the comparison runner: one row per cell (``results.csv``), and ``results.md`` with a per-category summary
(mean ± std over seeds) and a cross-category summary that compares models only on the categories every model finished.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalib_ext.cli.compare.spec import NO_CATEGORY, Cell, GridSpec

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
MAX_LISTED_MISSING = 6


def result_row(cell: Cell, result: dict[str, Any]) -> dict[str, Any]:
    """One ``results.csv`` row: the cell's coordinates, status, standard metrics, costs, extra metrics and error."""
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


def _mean_std(values: Sequence[float], column: str) -> str:
    """``mean ± std`` (sample standard deviation) of a metric over seeds; a single value or a cost as is."""
    values = [value for value in values if value is not None and not math.isnan(value)]
    if not values:
        return ""
    mean = sum(values) / len(values)
    if len(values) == 1 or column not in STANDARD_METRICS:
        return _format(float(mean), column)
    std = math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))
    return f"{mean:.3f} ± {std:.3f}"


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _missing_list(cells: Sequence[dict[str, Any]]) -> str:
    """``category/seed k (status)`` of the cells that did not finish, the first few of them."""
    names = [f"{row['category']}/seed {row['seed']} ({row['status']})" for row in cells]
    if len(names) > MAX_LISTED_MISSING:
        names = [*names[:MAX_LISTED_MISSING], f"+{len(names) - MAX_LISTED_MISSING} more"]
    return ", ".join(names)


def category_summary(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[list[str]]:
    """Per model x dataset x category: seeds finished and, per column, mean ± std over the finished seeds."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["dataset"], row["category"]), []).append(row)
    table = []
    for (model, dataset, category), cells in groups.items():
        ok = [row for row in cells if row["status"] == "ok"]
        values = [model, dataset, category, f"{len(ok)}/{len(cells)}"]
        values += [_mean_std([row[column] for row in ok], column) for column in columns]
        values.append(_missing_list([row for row in cells if row["status"] != "ok"]))
        table.append(values)
    return table


def cross_category_summary(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> tuple[list[list[str]], list[str]]:
    """Per model x dataset: the mean over categories of the per-category seed means, over the categories where
    *every* model has at least one finished cell (so no model is compared on an easier subset); returns the table
    and notes naming the categories left out and why. A model without any finished cell in a dataset is flagged and
    does not narrow the others' comparison.

    Models restricted to their own categories in the spec are grouped by category set, and each group is averaged
    over its own common categories."""
    table, notes = [], []
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        cells = [row for row in rows if row["dataset"] == dataset]
        groups: dict[tuple[str, ...], list[str]] = {}
        for model in dict.fromkeys(row["model"] for row in cells):
            own = tuple(dict.fromkeys(row["category"] for row in cells if row["model"] == model))
            groups.setdefault(own, []).append(model)
        if len(groups) > 1:
            notes.append(f"{dataset}: models run on different category sets; compare rows with the same categories.")
        finished = {(row["model"], row["category"]) for row in cells if row["status"] == "ok"}
        for categories, models in groups.items():
            # A model without any finished cell here (not run yet, or failed everywhere) cannot narrow the comparison.
            ranked = [model for model in models if any((model, c) in finished for c in categories)]
            for model in sorted(set(models) - set(ranked), key=models.index):
                notes.append(f"{dataset}: {model} has no finished cell; the other models are compared without it.")
            common = [c for c in categories if ranked and all((model, c) in finished for model in ranked)]
            for category in categories:
                if category not in common and ranked:
                    lacking = [model for model in ranked if (model, category) not in finished]
                    others = f" (compared with {', '.join(models)})" if len(groups) > 1 else ""
                    notes.append(f"{dataset}/{category} left out: no finished cell for {', '.join(lacking)}{others}.")
            for model in models:
                own = [row for row in cells if row["model"] == model]
                used = common if model in ranked else []
                shown = ", ".join(used) if len(groups) > 1 and 0 < len(used) <= 4 else f"{len(used)}/{len(categories)}"
                values = [model, dataset, shown]
                for column in columns:
                    means = []
                    for category in used:
                        seeds = [row[column] for row in own if row["category"] == category and row["status"] == "ok"]
                        seeds = [value for value in seeds if value is not None and not math.isnan(value)]
                        if seeds:
                            means.append(sum(seeds) / len(seeds))
                    values.append(_format(sum(means) / len(means), column) if means else "")
                missing = [row for row in own if row["status"] != "ok"]
                values.append(f"⚠ {len(missing)}: {_missing_list(missing)}" if missing else "")
                table.append(values)
    return table, notes


def write_reports(grid: GridSpec, rows: list[dict[str, Any]], output: Path) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and ``plots/*.png``; returns the written paths by kind."""
    import pandas as pd

    from anomalib_ext.cli.compare.plots import write_plots  # plots import this module's column names

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
    labels = [METRIC_LABELS[column] for column in [*shown_metrics, *shown_costs]]
    per_category = category_summary(rows, [*shown_metrics, *shown_costs])
    across, notes = cross_category_summary(rows, [*shown_metrics, *shown_costs])
    markdown = [
        f"# Comparison: `{grid.path}`",
        "",
        "## Per category: mean ± std over seeds",
        "",
        "Mean ± sample standard deviation over the seeds that finished (a single value when one seed finished); "
        "costs are means. `not ok` lists the cells without a result.",
        "",
        _markdown_table(["model", "dataset", "category", "seeds ok", *labels, "not ok"], per_category),
        "",
        "## Across categories",
        "",
        "Mean over categories of the per-category means, over only the categories where every model has a finished "
        "cell, so that all models are compared on the same categories. ⚠ flags a model with cells that did not "
        "finish (their categories are then averaged over fewer seeds, or left out for every model).",
        "",
        _markdown_table(["model", "dataset", "categories", *labels, "not finished"], across),
        "",
        *[f"* {note}" for note in notes],
        *([""] if notes else []),
        "## Per cell",
        "",
        _markdown_table([METRIC_LABELS.get(column, column) for column in columns], table_rows),
        "",
        "image/pixel AUROC, AUPRO (FPR limit 0.3) and mIoU (per-image IoU of the evaluated `pred_mask`, see docs/comparison.md) "
        "from Anomalib's `Engine.test`; fit/test seconds are wall-clock times of `Engine.fit`/`Engine.test`; peak RSS is "
        "the cell process's peak resident memory (including the Python/torch baseline).",
        "",
    ]
    markdown_path = output / "results.md"
    markdown_path.write_text("\n".join(markdown))
    paths = {"csv": csv_path, "markdown": markdown_path}
    paths.update(write_plots(grid, frame, output))
    return paths
