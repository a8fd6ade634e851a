"""Free a prefill's KV lease that no decode instance will ever pull.

A prefill instance keeps a finished prompt's KV blocks leased until a decode instance pulls them
or the lease expires (``--kv-lease-seconds``, 30 s by default). Once a decode instance has the
request, its connector confirms or releases the lease itself. But when the scheduler gives up
before any decode instance got the request (the client left between prefill and decode, no
decode slot, the decode instance refused the request before its engine saw it), only the expiry
would free the blocks: under a wave of client timeouts the prefill's cache would fill with dead
leases. The scheduler sends the same ``Release`` a decode worker would, to every TP rank's side
channel, fire-and-forget (the expiry stays the backstop).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import zmq

from pdserve.kv import messages as m
from pdserve.kv.params import parse_remote

log = logging.getLogger("pdserve.scheduler")

MAX_SOCKETS = 64  # one DEALER per prefill side channel, least recently used closed first


class LeaseReleaser:
    def __init__(self, max_sockets: int = MAX_SOCKETS) -> None:
        self._ctx = zmq.Context.instance()
        self._socks: OrderedDict[str, zmq.Socket] = OrderedDict()
        self._max = max_sockets

    def release(self, kv_transfer_params: dict[str, Any], reason: str) -> int:
        """Send ``Release`` for the lease these params (a prefill's answer) describe; the number
        of side channels it was queued for (0: params unusable or nothing could be queued)."""
        remote = parse_remote(kv_transfer_params)
        if isinstance(remote, str):
            log.debug("not releasing a lease: %s", remote)
            return 0
        msg = m.encode(m.Release(remote.remote_request_id, reason))
        sent = 0
        for rank in range(remote.tp_size or 1):
            addr = f"tcp://{_host(remote.remote_host)}:{remote.remote_port + rank}"
            try:
                self._socket(addr).send(msg, zmq.NOBLOCK)
                sent += 1
            except zmq.ZMQError as exc:  # no route yet or queue full: the lease expires instead
                log.debug("release of %s to %s not sent: %s", remote.remote_request_id, addr, exc)
        return sent

    def _socket(self, addr: str) -> zmq.Socket:
        sock = self._socks.get(addr)
        if sock is not None:
            self._socks.move_to_end(addr)
            return sock
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)  # a queued release still goes out shortly before close
        sock.setsockopt(zmq.IPV6, 1)
        sock.connect(addr)
        self._socks[addr] = sock
        while len(self._socks) > self._max:
            self._socks.popitem(last=False)[1].close()
        return sock

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close(linger=0)
        self._socks.clear()


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
