"""Graceful drain: on SIGTERM/SIGINT stop taking new work, let in-flight requests finish.

A rolling restart or a scale-down sends SIGTERM. Cutting every in-flight stream at that moment
would fail requests that were seconds from done; waiting forever would block the restart. So:
new requests get 503 "draining" (with ``Connection: close``, so keep-alive clients reconnect to
another replica, and ``/health`` answers 503 so load balancers stop routing here), requests
already in flight run to their end for up to ``--drain-seconds``, and then the process exits 0.
A second signal ends the wait at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any


class Drain:
    """Counts in-flight requests and tells when they are done."""

    def __init__(self, gauge: Any | None = None) -> None:
        self.draining = False
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._gauge = gauge

    def enter(self) -> None:
        self.active += 1
        self._idle.clear()

    def leave(self) -> None:
        self.active -= 1
        if self.active <= 0:
            self.active = 0
            self._idle.set()

    def begin(self) -> None:
        self.draining = True
        if self._gauge is not None:
            self._gauge.set(1)

    async def wait_idle(self, timeout: float, cancel: asyncio.Event | None = None) -> bool:
        """True when every in-flight request finished within ``timeout`` (False: timed out or
        ``cancel`` was set, e.g. by a second signal)."""
        deadline = time.monotonic() + timeout
        waits = [asyncio.ensure_future(self._idle.wait())]
        if cancel is not None:
            waits.append(asyncio.ensure_future(cancel.wait()))
        try:
            await asyncio.wait(waits, timeout=max(0.0, deadline - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return self._idle.is_set() and self.active == 0
