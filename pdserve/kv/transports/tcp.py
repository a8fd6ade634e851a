"""``tcp``: the payload travels in the ZMQ reply frames; works across hosts.

The prefill side gathers the blocks into a pooled host buffer and hands it to ZMQ without a
copy (a tracked zero-copy frame: the buffer goes back to the pool only once ZMQ has released
it); the decode side scatters straight from the received frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import zmq

from pdserve.kv.layout import BlockLayout
from pdserve.kv.transports.base import BufferPool, Outgoing, Transfer, Transport


def as_buffer(t: torch.Tensor) -> memoryview:
    """A zero-copy memoryview of a CPU tensor's bytes (host copy first on accelerators)."""
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.numpy()).cast("B")


class TcpTransport(Transport):
    name = "tcp"

    def __init__(self) -> None:
        self._pool = BufferPool()

    def send(self, xfer: Transfer, layout: BlockLayout, block_ids: Sequence[int]) -> Outgoing:
        nbytes = layout.nbytes(len(block_ids))
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
        if not frames:
            raise RuntimeError("tcp reply carried no payload frame")
        frame = frames[0]
        data = frame.buffer if hasattr(frame, "buffer") else frame
        if len(data) == 0:
            return
        layout.scatter_from(block_ids, torch.frombuffer(data, dtype=torch.uint8))

    def close(self) -> None:
        self._pool.clear()
