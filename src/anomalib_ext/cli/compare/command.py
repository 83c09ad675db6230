"""``anomalib-ext compare`` command line: arguments, dry run, exit status."""

from __future__ import annotations

import argparse
import shlex
import signal
from pathlib import Path
from typing import Any

from anomalib_ext.cli.compare.runner import run_grid
from anomalib_ext.cli.compare.spec import cell_arguments, grid_cells, load_grid


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
    parser.add_argument(
        "--progress-every",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="while a cell runs, print its elapsed time, last log line and the time left this often (default 60)",
    )


def _exit_on_sigterm(signum: int, frame: Any) -> None:  # noqa: ANN401, ARG001
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    """Run the grid; exit status 1 when any cell failed (the table and plots are written either way), else 0."""
    grid = load_grid(args.grid)
    output = Path(args.output or grid.output)
    if args.dry_run:
        for cell in grid_cells(grid):
            print(f"# {cell.label}\nanomalib train {shlex.join(cell_arguments(grid, cell))}")
        return 0
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that a terminated runner kills its running cell
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    rows = run_grid(
        grid,
        output,
        force=args.force,
        only=only,
        report_only=args.report_only,
        log=lambda line: print(line, flush=True),
        progress_every=args.progress_every,
    )
    ok = sum(row["status"] == "ok" for row in rows)
    failed = sum(row["status"] == "failed" for row in rows)
    print(f"\n{ok}/{len(rows)} cells ok, {failed} failed. Table: {output / 'results.md'}, plots: {output / 'plots'}")
    return 1 if failed else 0
