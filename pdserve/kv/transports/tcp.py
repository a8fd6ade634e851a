"""``tcp``: the payload travels in the ZMQ reply frames; works across hosts.

The prefill side gathers the blocks into one contiguous buffer and hands it to ZMQ without a
copy (``copy=False`` keeps a reference until the kernel took it); the decode side scatters
straight from the received frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pdserve.kv.layout import BlockLayout
from pdserve.kv.transports.base import Outgoing, Transfer, Transport


def as_buffer(t: torch.Tensor) -> memoryview:
    """A zero-copy memoryview of a CPU tensor's bytes (host copy first on accelerators)."""
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.numpy()).cast("B")


class TcpTransport(Transport):
    name = "tcp"

    def send(self, xfer: Transfer, layout: BlockLayout, block_ids: Sequence[int]) -> Outgoing:
        buf = layout.gather(block_ids)
        return Outgoing(extra={}, frames=[as_buffer(buf)], nbytes=buf.numel())

    def receive(self, xfer, layout, block_ids, extra: dict[str, Any], frames: Sequence[Any]) -> None:
        if not frames:
            raise RuntimeError("tcp reply carried no payload frame")
        frame = frames[0]
        data = frame.buffer if hasattr(frame, "buffer") else frame
        layout.scatter_from(block_ids, torch.frombuffer(data, dtype=torch.uint8))
