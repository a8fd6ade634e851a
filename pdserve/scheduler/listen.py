"""Checks of the scheduler's own listening address, made before it waits for the instances.

Waiting for the instances can take as long as ``--startup-timeout`` (30 minutes by default): a
port that is taken, an address this host does not have, or a port that is one of the instances'
own should fail at once, as one message, not as a traceback after the wait.
"""

from __future__ import annotations


from pdserve.errors import ConfigError
from pdserve.net import bind_failure
from pdserve.scheduler.config import SchedulerConfig

_ANY = ("0.0.0.0", "::", "")
_FIX = ("give the scheduler a free port of this host (--port, or PDSERVE_SCHEDULER_PORT / the deployment "
        "file) and an address it has (--host)")


def bind_error(host: str, port: int, exc: OSError) -> ConfigError:
    return ConfigError("flags", "--host/--port", f"the scheduler cannot listen on {host}:{port}: "
                       f"{exc.strerror or exc}", _FIX)


def check_listen_address(cfg: SchedulerConfig) -> None:
    """Raise ConfigError if the scheduler's port is an instance's, or cannot be bound here."""
    for inst in cfg.instances:  # the same port on another host is fine
        if inst.port == cfg.port and (inst.host == cfg.host or (cfg.host in _ANY and bind_failure(inst.host) is None)):
            raise ConfigError("NODE_PORTS", f"entry {inst.global_index + 1}",
                              f"port {inst.port} is {inst.role} instance {inst.index}'s, and also the "
                              f"scheduler's own --port", f"{_FIX}; NODE_PORTS lists the instances' ports only")
    exc = bind_failure(cfg.host, cfg.port)
    if exc is not None:
        raise bind_error(cfg.host, cfg.port, exc)
