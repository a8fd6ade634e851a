"""Can this host listen on an address? One bind test for every check that asks.

Used before anything slow starts (the scheduler's wait for its instances, vLLM loading a model,
``pdserve up`` starting daemons), so a taken port or an address of another host fails at once.
"""

from __future__ import annotations

import socket


def bind_failure(host: str, port: int = 0) -> OSError | None:
    """The error binding ``host:port`` gives here, or None if it works (port 0: just the address).
    SO_REUSEADDR as the servers set it: a port in TIME_WAIT is no conflict."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        return exc
    return None
