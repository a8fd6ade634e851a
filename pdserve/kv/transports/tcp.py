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

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import zmq

from pdserve.kv import tuning
from pdserve.kv.layout import BlockLayout
from pdserve.kv.transports.base import BufferPool, Outgoing, Transfer, Transport
from pdserve.kv.transports.stream import SendDone, StreamClient, StreamServer, header
from pdserve.kv.transports.stream import enabled as stream_enabled

log = logging.getLogger("pdserve.kv")

ZERO_COPY_MIN_REGION = tuning.size("PDSERVE_KV_TCP_ZERO_COPY_MIN")
"""Mean region size (bytes) from which a pull is sent as frames straight from the KV cache."""


def as_buffer(t: torch.Tensor) -> memoryview:
    """A zero-copy memoryview of a CPU tensor's bytes (host copy first on accelerators)."""
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.numpy()).cast("B")


class TcpTransport(Transport):
    name = "tcp"

    def __init__(self, zero_copy_min_region: int | None = None, stream: bool | None = None,
                 stream_timeout: float = 60.0) -> None:
        self._pool = BufferPool()
        self.zero_copy_min_region = (ZERO_COPY_MIN_REGION if zero_copy_min_region is None
                                     else zero_copy_min_region)
        self.stream = stream_enabled() if stream is None else stream
        self.stream_timeout = stream_timeout
        self._server: StreamServer | None = None  # prefill side
        self._client = StreamClient()  # decode side
        self._stream_ports: dict[tuple[str, int], int] = {}  # decode: peer → its stream port
        self._no_stream: set[tuple[str, int]] = set()  # decode: peers whose stream is unreachable
        self._headered: set[tuple[str, int]] = set()  # decode: peers that head their payloads

    # prefill side
    def attach(self, leases, host: str, allowed_peers: Sequence[str] = ()) -> None:
        if self.stream and self._server is None:
            try:
                self._server = StreamServer(host, allowed_peers, send_timeout=self.stream_timeout)
            except OSError as exc:
                log.warning("KV tcp stream not offered (%s): payloads go in ZMQ frames", exc)

    def send(self, xfer: Transfer, layout: BlockLayout, block_ids: Sequence[int]) -> Outgoing:
        out = self._send(xfer, layout, block_ids)
        if self._server is not None:  # tells the decode side where to open a stream
            out.extra.update(stream_port=self._server.port, stream_header=True)
        return out

    def _send(self, xfer: Transfer, layout: BlockLayout, block_ids: Sequence[int]) -> Outgoing:
        nbytes = layout.nbytes(len(block_ids))
        regions = layout.regions(block_ids) if nbytes else None
        token = _token(xfer.hints.get("stream"))
        if regions and token and self._server is not None and self._server.has(token):
            tracker = SendDone()  # the blocks stay held until the payload is sent
            head = header(xfer.xfer_id, nbytes) if xfer.hints.get("stream_header") else b""
            xfer.handle = _PendingSend(token, regions, tracker, head)  # sent right after the reply
            return Outgoing(extra={"stream": True}, frames=[], nbytes=nbytes, tracker=tracker)
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

    def after_reply(self, xfer: Transfer) -> None:
        """Reply first, then payload: the decode side is already in ``recvmsg_into`` (copying
        out of its socket) while this side still copies in."""
        held = xfer.handle
        if isinstance(held, _PendingSend) and self._server is not None:
            xfer.handle = None
            self._server.send(held.token, held.regions, held.tracker, held.head)

    def finish(self, xfer: Transfer) -> None:
        held, xfer.handle = xfer.handle, None
        if held is None:
            return
        if isinstance(held, _PendingSend):  # the reply never went out: nothing will be sent
            held.tracker.done = True
            return
        buf, tracker = held
        # ZMQ may still hold the buffer (a peer stalled mid-receive, lease expired): leave that
        # one to the garbage collector rather than reuse memory that is still being sent
        if tracker is None or tracker.done:
            self._pool.give_back(buf)

    # decode side
    def hints(self, layout: BlockLayout, remote: tuple[str, int]) -> dict[str, Any]:
        port = self._stream_ports.get(remote)
        if not self.stream or port is None or remote in self._no_stream or layout.bases() is None:
            return {}
        try:
            hints: dict[str, Any] = {"stream": self._client.token((remote[0], port)).hex()}
        except OSError as exc:
            log.info("KV tcp stream to %s:%d unreachable (%s); using ZMQ frames", remote[0], port,
                     exc)
            self._no_stream.add(remote)
            return {}
        if remote in self._headered:
            hints["stream_header"] = True
        return hints

    def payload_fd(self, xfer: Transfer) -> int | None:
        """The stream, when the payload will come on it with a header: the puller may read it
        before the ZMQ reply arrived."""
        if not xfer.hints.get("stream_header") or xfer.remote is None:
            return None
        port = self._stream_ports.get(xfer.remote)
        return None if port is None else self._client.fileno((xfer.remote[0], port))

    def payload_ready(self, xfer: Transfer) -> bool:
        """Readable because the prefill worker closed the stream (it restarted, say): drop it."""
        if xfer.remote is None or xfer.remote not in self._stream_ports:
            return False
        addr = (xfer.remote[0], self._stream_ports[xfer.remote])
        if self._client.closed_by_peer(addr):
            self._client.drop(addr)
            return False
        return True

    def receive(self, xfer, layout, block_ids, extra: dict[str, Any], frames: Sequence[Any]) -> None:
        port = extra.get("stream_port")
        if xfer.remote is not None and isinstance(port, int):
            if self._stream_ports.get(xfer.remote) != port:  # new (or restarted) peer: try it
                self._no_stream.discard(xfer.remote)
                self._headered.discard(xfer.remote)
            self._stream_ports[xfer.remote] = port
            if extra.get("stream_header"):
                self._headered.add(xfer.remote)
        if layout.nbytes(len(block_ids)) == 0:
            return
        if extra.get("stream") or extra.get("early"):
            if xfer.remote is None or xfer.remote not in self._stream_ports:
                raise RuntimeError("tcp stream payload announced for an unknown stream")
            addr = (xfer.remote[0], self._stream_ports[xfer.remote])
            dst = layout.regions(block_ids)
            if dst is None:
                raise RuntimeError("tcp stream payload, but our KV cache has no plain regions")
            expect = ((xfer.xfer_id, layout.nbytes(len(block_ids)))
                      if xfer.hints.get("stream_header") else None)
            timeout = self.stream_timeout
            if xfer.deadline is not None:  # the pull's own deadline, when sooner
                timeout = max(0.001, min(timeout, xfer.deadline - time.monotonic()))
            self._client.receive(addr, dst, timeout, expect)
            return
        if not frames:
            raise RuntimeError("tcp reply carried no payload frame")
        layout.scatter_from_parts(block_ids, [f.buffer if hasattr(f, "buffer") else f
                                              for f in frames])

    def close(self) -> None:
        self._pool.clear()
        self._client.close()
        if self._server is not None:
            self._server.close()
            self._server = None


@dataclass
class _PendingSend:
    """A stream payload held between the reply and its send."""

    token: bytes
    regions: list[Any]
    tracker: SendDone
    head: bytes = b""  # the payload's header, when the decode side asked for one


def _token(value: Any) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None
