"""``python -m pdserve.scheduler [flags]``: the scheduler command alone (same as ``pdserve scheduler``)."""

import sys

from pdserve.cli import main

raise SystemExit(main(["scheduler", *sys.argv[1:]]))
