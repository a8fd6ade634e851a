"""One-line notices (not errors) from library calls; the CLI prints them on stderr."""

from __future__ import annotations

import sys
from collections.abc import Callable

Notify = Callable[[str], None]


def stderr_notice(message: str) -> None:
    print(f"pdserve: notice: {message}", file=sys.stderr)
