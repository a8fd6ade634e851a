"""Decode side: pull a request's blocks from the prefill worker of the same TP rank.

Runs in a small thread pool next to the engine: a pull never blocks the engine's step loop,
and it is bounded by ``load_timeout_seconds`` so a dead or slow prefill instance fails the
request (or makes it recompute) instead of hanging it. After copying, the decode side confirms
with ``done`` so the prefill side frees the blocks at once instead of at lease expiry. The
caller learns that the blocks are in place (``on_copied``) before that message goes out: the
confirmation is off the request's path.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from pdserve.kv import messages as m
from pdserve.kv.layout import BlockLayout
from pdserve.kv.transports import Transport
from pdserve.kv.transports.base import RetryWithoutHints, Transfer, TransferState

log = logging.getLogger(__name__)


class PullError(RuntimeError):
    """A pull failed; the message says why, for the request's error."""


# After a pull to a prefill worker's side channel times out, further pulls to it fail at once for
# this long: its queue would otherwise hold every pull thread of this decode worker (and every
# load from healthy prefill instances behind them) for a full timeout each.
SILENT_PEER_SECONDS = 5.0


@dataclass
class PullTask:
    req_id: str  # our (decode) request id
    remote_req_id: str
    remote_host: str
    remote_port: int  # base side-channel port; rank r adds r
    remote_block_ids: list[int]
    local_block_ids: list[int]
    transport: str


class Puller:
    def __init__(self, layout: BlockLayout, transports: dict[str, Transport], tp_rank: int,
                 engine_id: str, timeout: float, torch_dist_port_offset: int = 100,
                 silent_peer_seconds: float = 0.0, silent_after: float = 0.0) -> None:
        self.layout = layout
        self.transports = transports
        self.tp_rank = tp_rank
        self.engine_id = engine_id
        self.timeout = timeout
        self.torch_dist_port_offset = torch_dist_port_offset
        self._ctx = zmq.Context.instance()
        self._local = threading.local()
        # transfer ids: unique across decode workers (random prefix), cheap per pull (counter)
        self._id_prefix = os.urandom(8).hex()
        self._seq = itertools.count()
        # 0: off. A pull with no answer for longer than the side channel parks one (silent_after)
        # means the side channel is not answering; pulls there then fail at once for this long
        self.silent_peer_seconds = silent_peer_seconds
        self.silent_after = silent_after  # the prefill side's lease_wait_seconds: it answers a parked pull by then
        self._silent: dict[tuple[str, int], float] = {}  # side channels that just timed out → until when
        self._peers_lock = threading.Lock()

    def _xfer_id(self) -> str:
        return f"{self._id_prefix}{next(self._seq):x}"

    def _socket(self, host: str, port: int) -> zmq.Socket:
        """One DEALER per (thread, peer), reused: no reconnect per pull."""
        socks = getattr(self._local, "socks", None)
        if socks is None:
            socks = self._local.socks = {}
        key = (host, port)
        sock = socks.get(key)
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # a DEALER blocks on send while it has no connected peer (prefill down, or the
            # peer refused us): bound that wait by the pull timeout, never hang
            sock.setsockopt(zmq.SNDTIMEO, max(1, int(self.timeout * 1000)))
            sock.connect(f"tcp://{host}:{port}")
            socks[key] = sock
        return sock

    def _drop_socket(self, host: str, port: int) -> None:
        sock = getattr(self._local, "socks", {}).pop((host, port), None)
        if sock is not None:
            sock.close(linger=0)

    def pull(self, task: PullTask, on_copied: Callable[[Transfer], None] | None = None,
             deadline: float | None = None) -> Transfer:
        """Copy the blocks; raise :class:`PullError` on failure or timeout. ``on_copied`` is
        called once they are in place, before the confirmation is sent. ``deadline``
        (``time.monotonic()``): when the load was asked for plus the load timeout, so time spent
        queued behind other pulls counts; default: the timeout from now."""
        port = task.remote_port + self.tp_rank
        now = time.monotonic()
        deadline = now + self.timeout if deadline is None else deadline
        if deadline <= now:
            self.release(task.remote_host, task.remote_port, task.remote_req_id, "load timeout")
            raise PullError(f"KV pull of request {task.remote_req_id} waited {self.timeout:.0f}s for a "
                            "free pull thread (other pulls hung on an unresponsive prefill instance?)")
        with self._peers_lock:
            silent_until = self._silent.get((task.remote_host, port), 0.0)
        if silent_until > now and self.silent_peer_seconds:  # one pull just waited out the timeout there: do not queue behind it
            self.release(task.remote_host, task.remote_port, task.remote_req_id, "side channel not answering")
            raise PullError(f"KV pull of request {task.remote_req_id} from {task.remote_host}:{port} "
                            f"not tried: a pull there timed out less than {self.silent_peer_seconds:g}s ago")
        xfer = Transfer(self._xfer_id(), task.req_id, len(task.local_block_ids),
                        peer=f"{self.engine_id}/{self.tp_rank}")
        transport = self.transports[task.transport]
        sock = self._socket(task.remote_host, port)
        xfer.remote = (task.remote_host, port)
        xfer.deadline = deadline
        ok = False
        try:
            nbytes = transport.pull_direct(xfer, self.layout, task.remote_block_ids,
                                           task.local_block_ids, task.remote_req_id)
            if nbytes is not None:  # copied without a round trip; confirm below as usual
                xfer.nbytes, xfer.direct, ok = nbytes, True, True
                xfer.mark(TransferState.DONE)
                return xfer
            hints = transport.hints(self.layout, xfer.remote)
            while True:
                req = m.PullRequest(xfer.xfer_id, task.remote_req_id, task.remote_block_ids,
                                    task.transport, self.layout.fingerprint, self.tp_rank,
                                    self.engine_id, hints=hints)
                xfer.hints = hints
                sock.send(m.encode(req))
                xfer.mark(TransferState.RECEIVING)
                transport.before_reply(xfer, self.layout,
                                       (task.remote_host, port + self.torch_dist_port_offset))
                frames = self._await_reply(sock, xfer.xfer_id, deadline, task, transport, xfer)
                if frames is None:  # the payload came first (the reply follows, dropped as stale)
                    transport.receive(xfer, self.layout, task.local_block_ids, {"early": True}, [])
                    xfer.nbytes = self.layout.nbytes(len(task.local_block_ids))
                    break
                reply = m.decode(frames[0].buffer)
                assert isinstance(reply, m.PullReply)
                if not reply.ok:
                    raise PullError(
                        f"prefill instance {task.remote_host}:{port} refused: {reply.error}")
                try:
                    transport.receive(xfer, self.layout, task.local_block_ids, reply.extra,
                                      frames[1:])
                except RetryWithoutHints as exc:
                    if not hints:
                        raise
                    log.info("KV pull from %s:%d: %s; pulling again without %s",
                             task.remote_host, port, exc, sorted(hints))
                    hints = {}
                    xfer.xfer_id = self._xfer_id()  # a late first reply must not be taken
                    continue
                xfer.nbytes = reply.nbytes
                break
            ok = True
            xfer.mark(TransferState.DONE)
            return xfer
        except PullError:
            xfer.mark(TransferState.FAILED)
            raise
        except Exception as exc:
            xfer.mark(TransferState.FAILED, str(exc))
            self._drop_socket(task.remote_host, port)
            raise PullError(f"KV pull from {task.remote_host}:{port} failed: {exc}") from exc
        finally:
            try:
                if ok and on_copied is not None:
                    on_copied(xfer)
            finally:  # confirm either way: the prefill side frees the blocks now, not at expiry
                try:
                    self._socket(task.remote_host, port).send(
                        m.encode(m.Done(xfer.xfer_id, task.remote_req_id, ok)), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass

    def _await_reply(self, sock: zmq.Socket, xfer_id: str, deadline: float, task: PullTask,
                     transport: Transport | None = None, xfer: Transfer | None = None):
        """The reply's frames; None if the transport's payload arrived first."""
        sent = time.monotonic()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        payload_fd = None if transport is None or xfer is None else transport.payload_fd(xfer)
        if payload_fd is not None:
            poller.register(payload_fd, zmq.POLLIN)
        while True:
            left = deadline - time.monotonic()
            events = dict(poller.poll(int(left * 1000))) if left > 0 else {}
            if payload_fd is not None and payload_fd in events and sock not in events:
                assert transport is not None and xfer is not None
                if transport.payload_ready(xfer):
                    return None
                poller.unregister(payload_fd)  # not a payload: the reply tells
                payload_fd = None
                continue
            if sock not in events:
                self._drop_socket(task.remote_host, task.remote_port + self.tp_rank)
                waited = time.monotonic() - sent
                if self.silent_peer_seconds and waited > self.silent_after:
                    # no answer for longer than the side channel parks a pull: it is not answering
                    # (a pull that merely ran out of budget after queueing says nothing of the peer)
                    with self._peers_lock:
                        self._silent[(task.remote_host, task.remote_port + self.tp_rank)] = \
                            time.monotonic() + self.silent_peer_seconds
                raise PullError(
                    f"KV pull of request {task.remote_req_id} from "
                    f"{task.remote_host}:{task.remote_port + self.tp_rank} timed out after "
                    f"{waited:.1f}s (prefill instance dead or overloaded?)"
                )
            frames = sock.recv_multipart(copy=False)
            header = m.decode(frames[0].buffer)
            if isinstance(header, m.PullReply) and header.xfer_id == xfer_id:
                return frames
            log.debug("dropping stale side-channel reply %s", getattr(header, "xfer_id", "?"))

    def release(self, remote_host: str, remote_port: int, remote_req_id: str, reason: str) -> None:
        """Tell the prefill side we will not pull (full local prefix hit, abort)."""
        try:
            self._socket(remote_host, remote_port + self.tp_rank).send(
                m.encode(m.Release(remote_req_id, reason)), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("release of %s not sent: %s", remote_req_id, exc)
