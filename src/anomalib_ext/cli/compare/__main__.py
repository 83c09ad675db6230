"""``python -m anomalib_ext.cli.compare ...`` is ``anomalib-ext compare ...``."""

import sys

from anomalib_ext.cli.main import main

raise SystemExit(main(["compare", *sys.argv[1:]]))
