"""Compare models on a grid of datasets x categories x seeds through the stock Anomalib Engine; write tables and plots.

Anomalib's own ``anomalib benchmark`` only loads models from a whitelist of Anomalib modules, so plugin models cannot
take part in it. This runner reads a grid spec (YAML, format in ``docs/comparison.md``) and, for every cell
(model x dataset x category x seed), runs exactly what ``anomalib train --config <model config> <overrides>`` runs --
``Engine.fit`` then ``Engine.test`` on objects built by Anomalib's own CLI parser, seeded -- in a fresh subprocess, so
that a crash, an out-of-memory kill or a timeout fails only that cell and peak memory is measured per cell.

Outputs under the output folder::

    results.csv            one row per cell: metrics, fit/test seconds, peak memory, status, error
    results.md             per category mean ± std over seeds, cross-category means on the categories every model
                           finished (missing cells flagged), and every cell
    plots/<metric>.png     a grouped bar chart per metric
    plots/maps_<dataset>_<category>.png   example anomaly maps of every model side by side
    cells/<model>/<dataset>/<category>/seed<k>/   per-cell log.txt, result.json, examples.npz, Anomalib's results

Finished cells are not recomputed on a rerun (unless their settings, config files or model code changed, or
``--force``); failed cells are retried. The exit status is 1 when any cell failed.

Modules: ``spec`` (grid file, cells, arguments), ``worker`` (inside a cell's process), ``examples`` (example maps
callback), ``process`` (one cell's subprocess, resume), ``runner`` (the grid loop and progress), ``report`` (tables),
``plots`` (figures), ``command`` (the command line).
"""

from anomalib_ext.cli.compare.command import add_arguments, run
from anomalib_ext.cli.compare.process import is_finished, read_result, run_cell, source_hash
from anomalib_ext.cli.compare.report import result_row, write_reports
from anomalib_ext.cli.compare.runner import run_grid
from anomalib_ext.cli.compare.spec import (
    Cell,
    DatasetEntry,
    GridSpec,
    GridSpecError,
    ModelEntry,
    cell_arguments,
    cell_fingerprint,
    grid_cells,
    load_grid,
)

__all__ = [
    "Cell",
    "DatasetEntry",
    "GridSpec",
    "GridSpecError",
    "ModelEntry",
    "add_arguments",
    "cell_arguments",
    "cell_fingerprint",
    "grid_cells",
    "is_finished",
    "load_grid",
    "read_result",
    "result_row",
    "run",
    "run_cell",
    "run_grid",
    "source_hash",
    "write_reports",
]
