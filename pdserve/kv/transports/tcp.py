"""``tcp``: the payload travels in the ZMQ reply frames; works across hosts.

Prefill side, large block runs: no copy at all. Each contiguous region of the requested blocks
in the KV tensors (per layer and lead index, e.g. K and V; consecutive block ids merged) goes
out as its own zero-copy ZMQ frame, read by ZMQ's I/O thread straight from the KV cache. ZMQ
may hold those frames after the reply was queued (and even after the lease ended), so the
frames are tracked and the side channel keeps the request's blocks allocated until ZMQ released
them (``Outgoing.tracker``, see ``LeaseTable.hold``).

Small regions (short prompts, fragmented block ids) are cheaper to copy than to send as frames
(a tracked zero-copy frame costs ~10 us; a 48 KiB copy ~5 us): those pulls gather into a pooled
host buffer sent as one tracked zero-copy frame, which goes back to the pool once ZMQ has
released it.

Decode side: the frames are copied straight into the blocks (``scatter_from_parts``), no
intermediate join.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import zmq

from pdserve.kv.layout import BlockLayout
from pdserve.kv.transports.base import BufferPool, Outgoing, Transfer, Transport

ZERO_COPY_MIN_REGION = int(os.environ.get("PDSERVE_KV_TCP_ZERO_COPY_MIN", 256 << 10))
"""Mean region size (bytes) from which a pull is sent as frames straight from the KV cache."""


def as_buffer(t: torch.Tensor) -> memoryview:
    """A zero-copy memoryview of a CPU tensor's bytes (host copy first on accelerators)."""
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.numpy()).cast("B")


class TcpTransport(Transport):
    name = "tcp"

    def __init__(self, zero_copy_min_region: int | None = None) -> None:
        self._pool = BufferPool()
        self.zero_copy_min_region = (ZERO_COPY_MIN_REGION if zero_copy_min_region is None
                                     else zero_copy_min_region)

    def send(self, xfer: Transfer, layout: BlockLayout, block_ids: Sequence[int]) -> Outgoing:
        nbytes = layout.nbytes(len(block_ids))
        regions = layout.regions(block_ids) if nbytes else None
        if regions and nbytes >= self.zero_copy_min_region * len(regions):
            frames = [zmq.Frame(memoryview(r), copy=False, track=True) for r in regions]
            tracker = zmq.MessageTracker(*frames)
            xfer.handle = None  # nothing to recycle: the frames are the KV cache
            return Outgoing(extra={}, frames=frames, nbytes=nbytes, tracker=tracker)
        buf = self._pool.take(nbytes)
        layout.gather_into(block_ids, buf)
        frame = zmq.Frame(as_buffer(buf)[:nbytes], copy=False, track=True)
        xfer.handle = (buf, frame.tracker)  # not the frame: holding it would keep ZMQ's ref alive
        return Outgoing(extra={}, frames=[frame], nbytes=nbytes)

    def finish(self, xfer: Transfer) -> None:
        held, xfer.handle = xfer.handle, None
        if held is None:
            return
        buf, tracker = held
        # ZMQ may still hold the buffer (a peer stalled mid-receive, lease expired): leave that
        # one to the garbage collector rather than reuse memory that is still being sent
        if tracker is None or tracker.done:
            self._pool.give_back(buf)

    def receive(self, xfer, layout, block_ids, extra: dict[str, Any], frames: Sequence[Any]) -> None:
        if layout.nbytes(len(block_ids)) == 0:
            return
        if not frames:
            raise RuntimeError("tcp reply carried no payload frame")
        layout.scatter_from_parts(block_ids, [f.buffer if hasattr(f, "buffer") else f
                                              for f in frames])

    def close(self) -> None:
        self._pool.clear()
