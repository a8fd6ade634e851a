"""Reading pdserve's boolean environment variables one way everywhere.

A value that is neither on nor off (``PDSERVE_NO_EAGER=maybe``) is an error naming the variable:
silently reading it as "off" would start a server configured other than the operator meant.
"""

from __future__ import annotations

from collections.abc import Mapping

from pdserve.errors import ConfigError

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def parse_bool(value: str | None, default: bool, name: str) -> bool:
    """``"1"/"true"/"yes"/"on"`` -> True, ``"0"/"false"/"no"/"off"`` -> False, unset/empty -> default."""
    if value is None or value.strip() == "":
        return default
    v = value.strip().lower()
    if v in _ON:
        return True
    if v in _OFF:
        return False
    raise ConfigError("environment", name, f"{value!r} is not a boolean", f"export {name}=1 or {name}=0")


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    return parse_bool(env.get(name), default, name)
