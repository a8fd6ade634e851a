"""Global admission: at most --max-inflight requests in flight, a bounded FIFO of waiters.

Shedding load early with a 429 and ``Retry-After`` is kinder than letting every request slow
down until all of them time out: the queue absorbs bursts, its bound and timeout cap the wait.
"""

from __future__ import annotations

import asyncio
from collections import deque

from pdserve.scheduler.errors import overloaded
from pdserve.scheduler.pool import QueueCounter


class Admission:
    def __init__(self, max_inflight: int, queue: QueueCounter, queue_timeout: float) -> None:
        self.max_inflight = max_inflight
        self.queue = queue
        self.queue_timeout = queue_timeout
        self.inflight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.max_inflight <= 0 or (self.inflight < self.max_inflight and not self._waiters):
            self.inflight += 1
            return
        self.queue.enter(self.queue_timeout)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(self.queue_timeout):
                await fut
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                return  # the slot arrived together with the timeout: keep it
            raise overloaded(f"server overloaded: {self.inflight} requests in flight (--max-inflight "
                             f"{self.max_inflight}) and no slot freed within {self.queue_timeout:g} s",
                             self.queue_timeout) from None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # we were handed a slot but the client left: pass it on
            raise
        finally:
            self.queue.leave()
            try:
                self._waiters.remove(fut)
            except ValueError:
                pass

    def release(self) -> None:
        """Hand the slot to the oldest live waiter, or free it."""
        if self.max_inflight <= 0:
            self.inflight -= 1
            return
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.inflight -= 1
