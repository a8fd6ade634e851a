"""--log-level / PDSERVE_LOG_LEVEL: a level that does not exist is a ConfigError listing the valid ones."""

from __future__ import annotations

import logging

import pytest

from pdserve.errors import ConfigError
from pdserve.logs import LEVELS, parse_level, resolve_level

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("text", "level"), [("DEBUG", logging.DEBUG), ("info", logging.INFO),
                                             (" Warning ", logging.WARNING), ("warn", logging.WARNING),
                                             ("error", logging.ERROR), ("CRITICAL", logging.CRITICAL)])
def test_valid_levels_any_case(text: str, level: int) -> None:
    assert parse_level(text, "flags", "--log-level") == level


def test_flag_over_env_over_info() -> None:
    assert resolve_level(None, {}) == logging.INFO
    assert resolve_level(None, {"PDSERVE_LOG_LEVEL": " "}) == logging.INFO
    assert resolve_level(None, {"PDSERVE_LOG_LEVEL": "debug"}) == logging.DEBUG
    assert resolve_level("error", {"PDSERVE_LOG_LEVEL": "nonsense"}) == logging.ERROR  # the flag wins


def test_bad_flag_names_flag_value_and_valid_levels() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_level("LOUD", {})
    assert str(info.value) == ("flags: --log-level: 'LOUD' is not a logging level\n"
                               f"  fix: --log-level INFO (one of {', '.join(LEVELS)}, any case)")


@pytest.mark.parametrize("raw", ["foo", "10", "NOTSET"])
def test_bad_env_names_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_level(None, {"PDSERVE_LOG_LEVEL": raw})
    msg = str(info.value)
    assert msg.startswith(f"environment: PDSERVE_LOG_LEVEL: {raw!r} is not a logging level")
    assert "export PDSERVE_LOG_LEVEL=INFO" in msg and "DEBUG, INFO, WARNING, ERROR, CRITICAL" in msg
