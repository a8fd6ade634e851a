"""The ``pdserve`` logging level: ``--log-level`` > ``PDSERVE_LOG_LEVEL`` > INFO.

A level that is not one of :data:`LEVELS` is a :class:`ConfigError` naming where it came from and
the valid names, instead of being taken silently as INFO.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from pdserve.errors import ConfigError

ENV_LOG_LEVEL = "PDSERVE_LOG_LEVEL"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse_level(value: str, source: str, name: str) -> int:
    """The ``logging`` level of ``value`` (case-insensitive; WARN is taken as WARNING)."""
    text = value.strip().upper()
    if text == "WARN":
        text = "WARNING"
    if text not in LEVELS:
        fix = f"{name} INFO" if name.startswith("-") else f"export {name}=INFO"
        raise ConfigError(source, name, f"{value!r} is not a logging level",
                          f"{fix} (one of {', '.join(LEVELS)}, any case)")
    return int(getattr(logging, text))


def resolve_level(flag: str | None, environ: Mapping[str, str] = os.environ) -> int:
    """``--log-level`` if given (None: not given), else ``PDSERVE_LOG_LEVEL``, else INFO."""
    if flag is not None:
        return parse_level(flag, "flags", "--log-level")
    raw = environ.get(ENV_LOG_LEVEL, "")
    if raw.strip():
        return parse_level(raw, "environment", ENV_LOG_LEVEL)
    return logging.INFO


def configure_logging(flag: str | None, environ: Mapping[str, str] = os.environ) -> None:
    """Check the level (a bad one raises :class:`ConfigError` before anything is logged), then
    configure the root logger as every ``pdserve`` command does."""
    logging.basicConfig(level=resolve_level(flag, environ), format=LOG_FORMAT)


__all__ = ["ENV_LOG_LEVEL", "LEVELS", "configure_logging", "parse_level", "resolve_level"]
