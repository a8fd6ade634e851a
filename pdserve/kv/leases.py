"""Prefill-side block leases: blocks stay held until the decode side confirms, or time runs out.

The scheduler half of the connector grants a lease when a request that will be decoded
elsewhere finishes; the worker half serves pulls only for leased blocks and reports the
request as "finished sending" (so vLLM frees the blocks) on confirmation or expiry. Nothing is
stranded by a lost request, a dead decode instance or an aborted client.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Lease:
    req_id: str
    block_ids: list[int]
    expires_at: float  # time.time() based: the decode side sees it too
    pulls: int = 0


class LeaseTable:
    """Thread-safe: the engine thread adds/reaps, the side-channel thread reads/completes."""

    def __init__(self, clock=time.time) -> None:
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._finished: set[str] = set()
        self._cond = threading.Condition()
        self.expired_total = 0
        self.completed_total = 0

    def add(self, req_id: str, block_ids: list[int], expires_at: float) -> None:
        with self._cond:
            self._leases[req_id] = Lease(req_id, list(block_ids), expires_at)
            self._cond.notify_all()

    def wait_for(self, req_id: str, timeout: float) -> Lease | None:
        """The lease of ``req_id``, waiting up to ``timeout`` for it to be granted."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while req_id not in self._leases:
                if req_id in self._finished:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._leases[req_id]

    def get(self, req_id: str) -> Lease | None:
        with self._cond:
            return self._leases.get(req_id)

    def complete(self, req_id: str) -> bool:
        """The decode side is done with (or gave up) ``req_id``: free it at the next step."""
        with self._cond:
            lease = self._leases.pop(req_id, None)
            if lease is None:
                return False
            self._finished.add(req_id)
            self.completed_total += 1
            return True

    def reap_expired(self) -> list[str]:
        now = self._clock()
        with self._cond:
            expired = [r for r, lease in self._leases.items() if lease.expires_at <= now]
            for req_id in expired:
                del self._leases[req_id]
                self._finished.add(req_id)
            self.expired_total += len(expired)
        for req_id in expired:
            log.warning("KV lease of request %s expired: no decode instance pulled it; "
                        "freeing its blocks", req_id)
        return expired

    def take_finished(self) -> set[str]:
        with self._cond:
            done, self._finished = self._finished, set()
            return done

    def __len__(self) -> int:
        with self._cond:
            return len(self._leases)
