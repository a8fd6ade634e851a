"""User-facing errors: one readable message, never a traceback.

Every configuration problem an operator can cause (a wrong ranktable, a NODE_PORTS mismatch,
a missing device) is raised as a :class:`ConfigError` that names the file, the field (a JSON
path such as ``server_group_list[1].server_list[0].device[2].rank_id``), what was found and
how to fix it. The CLI prints it and exits non-zero.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``plural(1, "port")`` -> ``1 port``, ``plural(2, "entry", "entries")`` -> ``2 entries``: messages
    count things the user has to fix, so they should read right for one as well."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


class PdserveError(Exception):
    """Base class of errors that are shown to the user as one message (exit code 2)."""

    exit_code = 2


class ConfigError(PdserveError):
    """A problem in a file, an environment variable or a flag the user gave."""

    def __init__(self, source: str | None, field: str | None, found: str, fix: str) -> None:
        self.source = source
        self.field = field
        self.found = found
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        where = self.source or "<input>"
        if self.field:
            where = f"{where}: {self.field}"
        return f"{where}: {self.found}\n  fix: {self.fix}"


class ConfigErrors(PdserveError):
    """Several :class:`ConfigError` found in one pass (validate reports them all at once)."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("\n".join(f"error: {e.render()}" for e in errors))


class ShortErrorParser(argparse.ArgumentParser):
    """A bad flag gets one line and a pointer to --help, not the whole usage (the scheduler alone
    has sixty flags: the error line ended up below a screenful of them)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n  (`{self.prog} --help` lists the flags)\n")
