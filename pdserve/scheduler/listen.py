"""Checks of the scheduler's own listening address, made before it waits for the instances.

Waiting for the instances can take as long as ``--startup-timeout`` (30 minutes by default): a
port that is taken, an address this host does not have, or a port that is one of the instances'
own should fail at once, as one message, not as a traceback after the wait.
"""

from __future__ import annotations

import socket

from pdserve.errors import ConfigError
from pdserve.scheduler.config import SchedulerConfig

_ANY = ("0.0.0.0", "::", "")
_FIX = ("give the scheduler a free port of this host (--port, or PDSERVE_SCHEDULER_PORT / the deployment "
        "file) and an address it has (--host)")


def bind_error(host: str, port: int, exc: OSError) -> ConfigError:
    return ConfigError("flags", "--host/--port", f"the scheduler cannot listen on {host}:{port}: "
                       f"{exc.strerror or exc}", _FIX)


def _is_local(host: str) -> bool:
    """Whether ``host`` is an address of this machine (loopback included): one it can bind."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def check_listen_address(cfg: SchedulerConfig) -> None:
    """Raise ConfigError if the scheduler's port is an instance's, or cannot be bound here."""
    for inst in cfg.instances:  # the same port on another host is fine
        if inst.port == cfg.port and (inst.host == cfg.host or (cfg.host in _ANY and _is_local(inst.host))):
            raise ConfigError("NODE_PORTS", f"entry {inst.global_index + 1}",
                              f"port {inst.port} is {inst.role} instance {inst.index}'s, and also the "
                              f"scheduler's own --port", f"{_FIX}; NODE_PORTS lists the instances' ports only")
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp: TIME_WAIT is no conflict
        try:
            s.bind((cfg.host, cfg.port))
        except OSError as exc:
            raise bind_error(cfg.host, cfg.port, exc) from None
