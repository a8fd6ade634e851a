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
from collections import OrderedDict
from dataclasses import dataclass

from pdserve.kv.lease_board import LeaseBoard

log = logging.getLogger(__name__)

ENDED_MEMORY = 4096  # ended leases remembered, to refuse late pulls at once


@dataclass
class Lease:
    req_id: str
    block_ids: list[int]
    expires_at: float  # time.time() based: the decode side sees it too
    pulls: int = 0


class Pin:
    """Holds a lease's blocks while a pull gathers or queues them (``done`` once it stops)."""

    done: bool = False


class LeaseTable:
    """Thread-safe: the engine thread adds/reaps, the side-channel thread reads/completes."""

    def __init__(self, clock=time.time, board: LeaseBoard | None = None) -> None:
        self._clock = clock
        self.board = board
        """When set, each lease's blocks are tagged on it while the lease lasts (for same-host
        decode workers that read the blocks directly, see ``lease_board``)."""
        self._leases: dict[str, Lease] = {}
        self._finished: set[str] = set()
        self._held: dict[str, list] = {}  # req_id → trackers of frames still read from its blocks
        self._ended: OrderedDict[str, None] = OrderedDict()  # recently ended leases (bounded)
        self._cond = threading.Condition()
        self.expired_total = 0
        self.completed_total = 0

    def add(self, req_id: str, block_ids: list[int], expires_at: float) -> None:
        with self._cond:
            self._leases[req_id] = Lease(req_id, list(block_ids), expires_at)
            if self.board is not None:
                self.board.post(req_id, block_ids)
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

    def pin(self, req_id: str) -> tuple[Lease, Pin] | None:
        """``req_id``'s live lease, with its blocks kept allocated until the returned pin is done.

        A pull reads the blocks after this returns (gather, zero-copy frames): without the pin, an
        expiry or a confirmation on another thread could report them free meanwhile, and vLLM
        would hand them to another request while they are still being sent. A lease past its
        expiry is refused here, before the next reap notices it.
        """
        with self._cond:
            lease = self._leases.get(req_id)
            if lease is None or lease.expires_at <= self._clock():
                return None
            pin = Pin()
            self._held.setdefault(req_id, []).append(pin)
            return lease, pin

    def complete(self, req_id: str) -> bool:
        """The decode side is done with (or gave up) ``req_id``: free it at the next step."""
        with self._cond:
            lease = self._leases.pop(req_id, None)
            if lease is None:
                return False
            self._untag(lease)
            self._finished.add(req_id)
            self.completed_total += 1
            return True

    def reap_expired(self) -> list[str]:
        now = self._clock()
        with self._cond:
            expired = [r for r, lease in self._leases.items() if lease.expires_at <= now]
            for req_id in expired:
                self._untag(self._leases.pop(req_id))
                self._finished.add(req_id)
            self.expired_total += len(expired)
        for req_id in expired:
            log.warning("KV lease of request %s expired: no decode instance pulled it; "
                        "freeing its blocks", req_id)
        return expired

    def _untag(self, lease: Lease) -> None:
        """The lease ended: before its blocks can be reported free (called under the lock)."""
        if self.board is not None:
            self.board.clear(lease.req_id, lease.block_ids)
        self._ended[lease.req_id] = None
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)

    def ended(self, req_id: str) -> bool:
        """Was ``req_id``'s lease confirmed or expired lately (a pull for it can never succeed)?"""
        with self._cond:
            return req_id in self._ended

    def hold(self, req_id: str, tracker) -> None:
        """Keep ``req_id``'s blocks allocated until ``tracker.done``, however the lease ends.

        For zero-copy sends: ZMQ reads the frames straight from the KV cache after the reply
        was queued, possibly after the decode side confirmed or the lease expired. The request
        is reported finished (its blocks freed) only once every tracker is done.
        """
        with self._cond:
            self._held.setdefault(req_id, []).append(tracker)

    def held(self) -> int:
        """Requests whose end is deferred because ZMQ still holds frames of their blocks."""
        with self._cond:
            return sum(1 for r in self._finished if r in self._held)

    def take_finished(self) -> set[str]:
        with self._cond:
            done: set[str] = set()
            waiting: set[str] = set()
            for req_id in self._finished:
                trackers = self._held.get(req_id)
                if trackers:
                    trackers[:] = [t for t in trackers if not t.done]
                if trackers:
                    waiting.add(req_id)  # ZMQ still reads these blocks: report them later
                else:
                    self._held.pop(req_id, None)
                    done.add(req_id)
            self._finished = waiting
            return done

    def __len__(self) -> int:
        with self._cond:
            return len(self._leases)
