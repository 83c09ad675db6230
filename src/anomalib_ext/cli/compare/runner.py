"""The grid loop: runs the cells one after another (resuming finished ones), reports progress with an estimate of the
time left, and rewrites the reports after every cell."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from anomalib_ext.cli.compare.process import (
    is_finished,
    last_log_line,
    read_result,
    run_cell,
    unfinished_result,
)
from anomalib_ext.cli.compare.report import result_row, write_reports
from anomalib_ext.cli.compare.spec import LOG_FILE, Cell, GridSpec, GridSpecError, cell_fingerprint, grid_cells


def format_duration(seconds: float) -> str:
    """``seconds`` as ``42 s``, ``12 min 5 s`` or ``3 h 20 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class Estimate:
    """Time left for the cells still to run: each costs the mean wall time of its model's measured cells (this run's
    and earlier runs' results on disk), or the mean over all measured cells when its model has none yet."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}

    def add(self, model: str, result: dict[str, Any] | None) -> None:
        if not result or result.get("status") != "ok":
            return
        seconds = result.get("wall_seconds")
        if seconds is None and result.get("fit_seconds") is not None:
            seconds = result["fit_seconds"] + (result.get("test_seconds") or 0.0)
        if seconds is not None:
            self.seconds.setdefault(model, []).append(float(seconds))

    def cell_seconds(self, model: str) -> float | None:
        measured = self.seconds.get(model) or [value for values in self.seconds.values() for value in values]
        return sum(measured) / len(measured) if measured else None

    def left(self, models: Sequence[str], running: str | None = None, elapsed: float = 0.0) -> str:
        """Estimate for ``models`` (one entry per cell still to start) plus what remains of the running cell."""
        costs = [self.cell_seconds(model) for model in models]
        if running is not None:
            current = self.cell_seconds(running)
            costs.append(None if current is None else max(0.0, current - elapsed))
        if any(cost is None for cost in costs):
            return "time left unknown until a cell of each model has finished"
        return f"about {format_duration(sum(costs))} left" if costs else "nothing left"


def run_grid(
    grid: GridSpec,
    output: Path | None = None,
    force: bool = False,
    only: Sequence[str] | None = None,
    report_only: bool = False,
    log: Callable[[str], None] = print,
    progress_every: float = 60.0,
) -> list[dict[str, Any]]:
    """Run every cell (resuming finished ones), write the reports after each cell, return the result rows.

    ``only``: names of the models whose cells run; the other cells are reported from what is on disk.
    ``report_only``: run nothing, only rewrite the reports from what is on disk.
    ``log`` receives a line when a cell starts, every ``progress_every`` seconds while it runs (elapsed time, the last
    line of its log -- usually Lightning's progress bar -- and the time left), and when it ends.
    """
    output = Path(output or grid.output)
    unknown = set(only or ()) - {model.name for model in grid.models}
    if unknown:
        msg = f"--only names unknown models {sorted(unknown)}; the grid has {[model.name for model in grid.models]}."
        raise GridSpecError(msg)
    cells = grid_cells(grid)
    to_run: list[Cell] = []
    estimate = Estimate()
    for cell in cells:
        if report_only or (only and cell.model.name not in only):
            continue
        previous = read_result(cell.directory(output))
        estimate.add(cell.model.name, previous)
        if force or not is_finished(previous, cell_fingerprint(grid, cell)):
            to_run.append(cell)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    for number, cell in enumerate(cells, start=1):
        if report_only or (only and cell.model.name not in only):
            rows.append(
                result_row(cell, read_result(cell.directory(output)) or unfinished_result(cell.directory(output)))
            )
            continue
        prefix = f"[{number}/{len(cells)}] {cell.label}"
        waiting = [other.model.name for other in to_run if other is not cell]
        if cell in to_run:
            log(
                f"{prefix}: started {datetime.now():%H:%M:%S} (log: {cell.directory(output) / LOG_FILE}); "
                f"{estimate.left(waiting, running=cell.model.name)}"
            )

        def heartbeat(elapsed: float, prefix: str = prefix, cell: Cell = cell, waiting: list[str] = waiting) -> None:
            line = last_log_line(cell.directory(output) / LOG_FILE)[:120]
            log(
                f"{prefix}: running for {format_duration(elapsed)} [{line}]; "
                f"{estimate.left(waiting, running=cell.model.name, elapsed=elapsed)}"
            )

        result, skipped = run_cell(grid, cell, output, force=force, on_wait=heartbeat, wait_every=progress_every)
        if cell in to_run:
            to_run.remove(cell)
        rows.append(result_row(cell, result))
        if skipped:
            status = "done before, skipped"
        else:
            estimate.add(cell.model.name, result)
            if result["status"] == "ok":
                status = f"ok in {format_duration(result.get('wall_seconds', 0))}"
            else:
                status = f"FAILED after {format_duration(result.get('wall_seconds', 0))}: {result.get('error', '')}"
        score = result.get("metrics", {}).get("image_AUROC")
        suffix = f", image AUROC {score:.3f}" if score is not None else ""
        progress = ""
        if not skipped:
            progress = (
                f" (elapsed {format_duration(time.monotonic() - started)}; "
                f"{estimate.left([other.model.name for other in to_run])})"
            )
        log(f"{prefix}: {status}{suffix}{progress}")
        pending = [result_row(other, {"status": "pending"}) for other in cells[number:]]
        write_reports(grid, rows + pending, output)
    write_reports(grid, rows, output)
    return rows
