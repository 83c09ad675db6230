"""Cost of the interpreter-start hook (``anomalib_ext_autoload.pth``) on every Python start.

Runs ``python -X importtime -c pass`` repeatedly and reports the cumulative import time of ``anomalib_ext._autoload``
(which includes ``anomalib_ext/__init__.py``), plus the wall time of ``python -c pass`` with the hook enabled and with
``ANOMALIB_EXT_DISABLE_AUTOLOAD=1`` (the module is still imported, but installs nothing).

Usage: python benchmarks/hook_startup.py [--runs 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def hook_import_microseconds() -> int:
    stderr = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, check=True).stderr
    for line in stderr.splitlines():
        if line.rstrip().endswith("anomalib_ext._autoload"):
            return int(line.split("|")[1])
    msg = "anomalib_ext._autoload was not imported at interpreter start: is the package installed?"
    raise RuntimeError(msg)


def wall_seconds(env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    runs = parser.parse_args().runs
    imports = [hook_import_microseconds() / 1000 for _ in range(runs)]
    enabled = [wall_seconds(dict(os.environ)) * 1000 for _ in range(runs)]
    disabled = [wall_seconds({**os.environ, "ANOMALIB_EXT_DISABLE_AUTOLOAD": "1"}) * 1000 for _ in range(runs)]
    print(f"runs: {runs}")
    print(f"hook import (cumulative, -X importtime): median {statistics.median(imports):.2f} ms, max {max(imports):.2f} ms")
    print(f"python -c pass, hook enabled:  median {statistics.median(enabled):.1f} ms")
    print(f"python -c pass, hook disabled: median {statistics.median(disabled):.1f} ms")


if __name__ == "__main__":
    main()
