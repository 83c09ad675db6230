"""Running one cell in its own process group: resume check, job file, log, timeout, kill on interrupt, the failure
message when the worker left no result."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from anomalib_ext.cli.compare.spec import (
    EXAMPLES_FILE,
    JOB_FILE,
    LOG_FILE,
    RESULT_FILE,
    Cell,
    GridSpec,
    cell_arguments,
    cell_fingerprint,
)

WORKER_MODULE = "anomalib_ext.cli.compare.worker"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def source_hash(folders: Sequence[str | Path]) -> str:
    """Hash of the ``*.py`` files under ``folders`` (names and contents); a missing folder hashes as empty."""
    digest = hashlib.sha256()
    for folder in map(Path, folders):
        for path in sorted(folder.rglob("*.py")) if folder.is_dir() else []:
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def is_finished(result: dict[str, Any] | None, fingerprint: str) -> bool:
    """A cell is done when it succeeded with the same settings and its model's source code is unchanged since."""
    return bool(
        result
        and result.get("status") == "ok"
        and result.get("fingerprint") == fingerprint
        and result.get("source_hash") == source_hash(result.get("source_dirs", []))
    )


def read_result(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / RESULT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def unfinished_result(directory: Path) -> dict[str, Any]:
    """Status of a cell without a result: started (a job file exists) but not finished, or never run."""
    return {"status": "unfinished" if (directory / JOB_FILE).is_file() else "not run"}


def last_log_line(log: Path, max_bytes: int = 8192) -> str:
    """The last non-empty line of ``log`` (progress bars' carriage-return updates count as lines, colours removed)."""
    try:
        with log.open("rb") as stream:
            stream.seek(max(0, log.stat().st_size - max_bytes))
            text = stream.read().decode(errors="replace")
    except OSError:
        return ""
    lines = (ANSI_ESCAPE.sub("", line).strip() for line in reversed(re.split(r"[\r\n]", text)))
    return next((line for line in lines if line), "")


def _last_error_line(log: Path) -> str:
    """The exception line of a traceback in ``log`` (or its last non-empty line)."""
    try:
        text = log.read_text(errors="replace").splitlines()[-200:]
    except OSError:
        return ""
    for line in reversed(text):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*", line.strip()):
            return line.strip()
    return next((line.strip() for line in reversed(text) if line.strip()), "")


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_isolated(
    command: list[str],
    stream,  # noqa: ANN001 - a writable file
    timeout: float | None,
    on_wait: Callable[[float], None] | None = None,
    wait_every: float = 60.0,
) -> int | None:
    """Run ``command`` in its own process group; return its exit code, or ``None`` after killing it at ``timeout``.

    ``on_wait(elapsed_seconds)`` is called every ``wait_every`` seconds while it runs. The whole group is killed on a
    timeout or when the runner itself is interrupted, so no cell process (nor a DDP rank it started) outlives the runner.
    """
    process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True)
    start = time.monotonic()
    try:
        while True:
            elapsed = time.monotonic() - start
            left = None if timeout is None else timeout - elapsed
            if left is not None and left <= 0:
                _kill_group(process)
                return None
            try:
                return process.wait(timeout=wait_every if left is None else min(wait_every, left))
            except subprocess.TimeoutExpired:
                if on_wait is not None and (timeout is None or time.monotonic() - start < timeout):
                    on_wait(time.monotonic() - start)
    except BaseException:
        _kill_group(process)
        raise


def run_cell(
    grid: GridSpec,
    cell: Cell,
    output: Path,
    force: bool = False,
    on_wait: Callable[[float], None] | None = None,
    wait_every: float = 60.0,
) -> tuple[dict[str, Any], bool]:
    """Run one cell in a subprocess unless it already finished with the same fingerprint; returns (result, skipped).

    The worker's stdout and stderr (Lightning's progress bar included) go to the cell's ``log.txt``.
    """
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
    job_file = directory / JOB_FILE
    job_file.write_text(json.dumps(job, indent=2))
    log = directory / LOG_FILE
    command = [sys.executable, "-m", WORKER_MODULE, str(job_file.resolve())]
    start = time.perf_counter()
    with log.open("w") as stream:
        stream.write(f"# equivalent: anomalib train {shlex.join(job['arguments'])}\n")
        stream.flush()
        returncode = run_isolated(command, stream, grid.timeout, on_wait=on_wait, wait_every=wait_every)
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
    result["wall_seconds"] = time.perf_counter() - start
    (directory / RESULT_FILE).write_text(json.dumps(result, indent=2))
    return result, False
