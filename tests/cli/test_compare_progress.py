"""Progress reporting of the comparison runner: heartbeats while a cell runs, the last log line, the time estimate."""

from __future__ import annotations

import sys
from pathlib import Path

from anomalib_ext.cli.compare.process import last_log_line, run_isolated
from anomalib_ext.cli.compare.runner import Estimate, format_duration


def test_run_isolated_reports_while_the_process_runs_and_returns_its_exit_code(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    script = "import sys, time; print('Epoch 1/3', flush=True); time.sleep(1.0); sys.exit(3)"
    waits: list[float] = []
    with log.open("w") as stream:
        code = run_isolated([sys.executable, "-c", script], stream, timeout=None, on_wait=waits.append, wait_every=0.2)
    assert code == 3
    assert waits and waits == sorted(waits) and waits[0] >= 0.2
    assert last_log_line(log) == "Epoch 1/3"


def test_run_isolated_kills_at_the_timeout(tmp_path: Path) -> None:
    with (tmp_path / "log.txt").open("w") as stream:
        assert run_isolated([sys.executable, "-c", "import time; time.sleep(30)"], stream, timeout=0.5) is None


def test_last_log_line_reads_progress_bar_updates_without_colours(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.write_text(
        "starting\nEpoch 0:  10%|#  | 1/10\rEpoch 0:  50%|#####  | 5/10\r\x1b[32mEpoch 0:  60%\x1b[0m 6/10\r\n\n"
    )
    assert last_log_line(log) == "Epoch 0:  60% 6/10"
    assert last_log_line(tmp_path / "missing.txt") == ""


def test_estimate_uses_each_models_measured_time_and_says_when_it_cannot_tell() -> None:
    estimate = Estimate()
    assert estimate.left(["A"]).startswith("time left unknown")
    estimate.add("A", {"status": "ok", "wall_seconds": 100.0})
    estimate.add("A", {"status": "ok", "fit_seconds": 250.0, "test_seconds": 50.0})  # from disk: fit + test
    estimate.add("B", {"status": "failed", "wall_seconds": 1.0})  # failures say nothing about the time a cell takes
    assert estimate.cell_seconds("A") == 200.0
    assert estimate.cell_seconds("B") == 200.0  # no B measured yet: the mean over all measured cells
    assert estimate.left(["A", "B"], running="A", elapsed=150.0) == "about 7 min 30 s left"
    assert estimate.left([]) == "nothing left"


def test_format_duration() -> None:
    assert [format_duration(s) for s in (5, 65, 3 * 3600 + 20 * 60)] == ["5 s", "1 min 5 s", "3 h 20 min"]
