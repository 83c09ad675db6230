"""``anomalib-ext`` console script: plugin tools that the stock ``anomalib`` command has no place for.

Training, testing and export go through the stock ``anomalib`` command (``anomalib train --model UFlowNFA ...``).
Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; modules are
imported only when their subcommand runs, so ``anomalib-ext --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS: dict[str, str] = {
    "compare": "anomalib_ext.cli.compare",
    "configs": "anomalib_ext.cli.configs",
    "demo": "anomalib_ext.cli.demo",
    "pretrain": "anomalib_ext.cli.pretrain",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the process exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="anomalib-ext", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), help="subcommand to run")
    if not arguments or arguments[0] not in SUBCOMMANDS:
        parser.parse_args(arguments)  # prints usage (and exits) for -h, a missing or an unknown subcommand
    module = importlib.import_module(SUBCOMMANDS[arguments[0]])
    subparser = argparse.ArgumentParser(prog=f"anomalib-ext {arguments[0]}", description=module.__doc__)
    module.add_arguments(subparser)
    return module.run(subparser.parse_args(arguments[1:]))


if __name__ == "__main__":
    raise SystemExit(main())
