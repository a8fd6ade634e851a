"""Prefill side: serve leased blocks to decode workers over a ZMQ ROUTER socket.

One thread per worker, blocked in ``zmq.Poller.poll`` — event-driven, never spinning, so it
costs no CPU the engine needs. A pull for a lease that the engine has not registered yet (the
decode side can be faster than the next engine step) is parked and retried when the lease
arrives. Peers outside ``allowed_peers`` are refused by a ZAP authenticator (pyzmq's own).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from pdserve.kv import messages as m
from pdserve.kv.layout import BlockLayout
from pdserve.kv.leases import Lease, LeaseTable
from pdserve.kv.transports import Transport
from pdserve.kv.transports.base import Transfer, TransferState

log = logging.getLogger(__name__)

_WAKE = b"wake"
STALL_MS = 30_000  # a payload connection whose peer acknowledges nothing for this long is closed


class SideChannelServer:
    def __init__(
        self,
        host: str,
        port: int,
        layout: BlockLayout,
        leases: LeaseTable,
        transports: dict[str, Transport],
        lease_wait_seconds: float = 10.0,
        allowed_peers: list[str] | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.stall_ms = STALL_MS
        self.layout = layout
        self.leases = leases
        self.transports = transports
        self.lease_wait_seconds = lease_wait_seconds
        self.allowed_peers = [p for p in (allowed_peers or []) if p]
        self.on_bytes = on_bytes
        self._ctx = zmq.Context.instance()
        self._auth = None
        self._inflight: dict[str, tuple[Transfer, Transport]] = {}  # xfer_id → held resources
        self._inflight_lock = threading.Lock()
        self._parked: list[tuple[float, list[Any], m.PullRequest]] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        # a plain pipe wakes the poller: thread-safe, never lost (an inproc PAIR socket per
        # wake-up could drop the message when closed at once, costing a parked pull a second)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name=f"pdserve-kv-side-{port}", daemon=True)
        for transport in transports.values():
            transport.attach(leases, host, self.allowed_peers)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise RuntimeError(
                f"KV side channel cannot listen on {self.host}:{self.port}: {self._error}. "
                "Pick another port (kv_connector_extra_config.side_channel_port / --kv-port)."
            ) from self._error

    def wake(self) -> None:
        """Tell the server thread a lease was added (parked pulls can proceed)."""
        if self._stop.is_set() and not self._thread.is_alive():
            return  # the pipe is closed; its fd numbers may belong to someone else now
        try:
            os.write(self._wake_w, _WAKE[:1])
        except (BlockingIOError, OSError):
            pass  # the pipe is full: a wake-up is already pending

    def stop(self) -> None:
        self._stop.set()
        self.wake()
        self._thread.join(5)
        if self._auth is not None:
            self._auth.stop()

    def _start_auth(self, sock: zmq.Socket) -> None:
        if not self.allowed_peers:
            return
        from zmq.auth.thread import ThreadAuthenticator

        self._auth = ThreadAuthenticator(self._ctx)
        self._auth.start()
        self._auth.allow(*self.allowed_peers)
        sock.zap_domain = b"pdserve"

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        router = self._ctx.socket(zmq.ROUTER)
        wake = self._wake_r
        try:
            router.setsockopt(zmq.LINGER, 0)
            # a decode peer that freezes (SIGSTOP, a hung host) or drops off the network keeps its
            # TCP connection: zero-copy payload frames queued to it would pin their KV blocks for
            # as long as TCP retransmits (~15 min) or, while its kernel still answers the window
            # probes, forever. Data unacknowledged this long closes the connection instead: the
            # frames are dropped, their trackers finish, the lease's blocks can be freed. (ZMTP
            # heartbeats cannot do this: a ping waits behind the stuck payload.)
            router.setsockopt(zmq.TCP_MAXRT, self.stall_ms)
            self._start_auth(router)
            router.bind(f"tcp://{self.host}:{self.port}")
        except Exception as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        log.info("KV side channel listening on %s:%d", self.host, self.port)
        try:
            while not self._stop.is_set():
                timeout = None  # nothing parked: sleep until a message or a wake-up
                if self._parked:  # parked pulls time out: wake up for the first deadline
                    first = min(deadline for deadline, _, _ in self._parked)
                    timeout = max(10, min(1000, int((first - time.monotonic()) * 1000) + 1))
                events = dict(poller.poll(timeout))
                if wake in events:
                    try:
                        while os.read(wake, 4096):
                            pass
                    except BlockingIOError:
                        pass
                if router in events:
                    while router.poll(0):
                        frames = router.recv_multipart(copy=False)
                        try:
                            self._handle(router, frames)
                        except Exception:  # never let one bad message stop the side channel
                            log.exception("KV side channel: handling a message failed")
                if self._parked:
                    self._retry_parked(router)
        finally:
            router.close(linger=0)
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _handle(self, router: zmq.Socket, frames: list[Any]) -> None:
        if len(frames) < 2:
            log.warning("dropping side-channel message without a header frame")
            return
        ident, header = frames[0], frames[1]
        try:
            msg = m.decode(header.buffer)
        except m.ProtocolError as exc:
            log.warning("dropping malformed side-channel message: %s", exc)
            return
        if isinstance(msg, m.PullRequest):
            self._pull(router, [ident], msg, deadline=time.monotonic() + self.lease_wait_seconds)
        elif isinstance(msg, m.Done):
            self._done(msg)
        elif isinstance(msg, m.Release):
            if self.leases.complete(msg.req_id):
                log.debug("lease of %s released by decode side (%s)", msg.req_id, msg.reason)

    def _reply(self, router: zmq.Socket, route: list[Any], reply: m.PullReply, frames=()) -> None:
        router.send_multipart([*route, m.encode(reply), *frames], copy=False)

    def _pull(self, router: zmq.Socket, route: list[Any], msg: m.PullRequest, deadline: float) -> None:
        pinned = self.leases.pin(msg.req_id)
        if pinned is None:
            if self.leases.ended(msg.req_id) or self.leases.get(msg.req_id) is not None:
                self._reply(router, route, m.PullReply(msg.xfer_id, False, error=(
                    f"no KV lease for request {msg.req_id}: it already ended (pulled and "
                    "confirmed, released, or expired)")))
                return
            if time.monotonic() < deadline:
                self._parked.append((deadline, route, msg))
                return
            self._reply(router, route, m.PullReply(msg.xfer_id, False,
                        error=f"no KV lease for request {msg.req_id} (expired or never granted)"))
            return
        lease, pin = pinned
        try:
            self._send(router, route, msg, lease)
        finally:
            pin.done = True  # any frames still read from the blocks are held by the send's tracker

    def _send(self, router: zmq.Socket, route: list[Any], msg: m.PullRequest, lease: Lease) -> None:
        error = self._check(msg, lease.block_ids)
        if error:
            self._reply(router, route, m.PullReply(msg.xfer_id, False, error=error))
            return
        transport = self.transports[msg.transport]
        xfer = Transfer(msg.xfer_id, msg.req_id, len(msg.block_ids), peer=f"{msg.peer}/{msg.tp_rank}",
                        hints=msg.hints, expires_at=lease.expires_at)
        try:
            out = transport.send(xfer, self.layout, msg.block_ids)
        except Exception as exc:
            log.exception("gathering KV blocks of %s failed", msg.req_id)
            self._reply(router, route, m.PullReply(msg.xfer_id, False, error=f"gather failed: {exc}"))
            return
        if out.tracker is not None:  # frames read from the blocks: keep them until ZMQ is done
            self.leases.hold(msg.req_id, out.tracker)
        xfer.nbytes = out.nbytes
        xfer.mark(TransferState.SENDING)
        lease.pulls += 1
        with self._inflight_lock:
            self._inflight[msg.xfer_id] = (xfer, transport)
        self._reply(router, route, m.PullReply(msg.xfer_id, True, nbytes=out.nbytes, extra=out.extra),
                    out.frames)
        transport.after_reply(xfer)
        if self.on_bytes:
            self.on_bytes(out.nbytes)

    def _check(self, msg: m.PullRequest, leased: list[int]) -> str:
        if msg.transport not in self.transports:
            return f"unknown transport {msg.transport!r}"
        if msg.layout != self.layout.fingerprint:
            return ("KV cache layouts differ between prefill and decode instance (model, dtype, "
                    "block size or tensor-parallel size); serve the same model with the same "
                    "--tensor-parallel-size, --block-size and --dtype on both")
        allowed = set(leased)
        stray = [b for b in msg.block_ids if b not in allowed]
        if stray:
            return f"blocks {stray[:8]} are not leased to request {msg.req_id}"
        return ""

    def _retry_parked(self, router: zmq.Socket) -> None:
        parked, self._parked = self._parked, []
        for deadline, route, msg in parked:
            self._pull(router, route, msg, deadline)

    def _done(self, msg: m.Done) -> None:
        with self._inflight_lock:
            held = self._inflight.pop(msg.xfer_id, None)
            # earlier pulls of the same request that the decode side retried (without hints)
            stale = [k for k, (x, _) in self._inflight.items() if x.req_id == msg.req_id]
            older = [self._inflight.pop(k) for k in stale]
        for xfer, transport in older:
            transport.finish(xfer)
            xfer.mark(TransferState.FAILED, "superseded")
        if held is not None:
            xfer, transport = held
            transport.finish(xfer)
            xfer.mark(TransferState.DONE if msg.ok else TransferState.FAILED)
        self.leases.complete(msg.req_id)

    def forget(self, req_ids: set[str]) -> None:
        """Leases ended without a confirmation (expired): drop what their pulls still hold."""
        if not req_ids:
            return
        with self._inflight_lock:
            gone = [k for k, (x, _) in self._inflight.items() if x.req_id in req_ids]
            held = [self._inflight.pop(k) for k in gone]
        for xfer, transport in held:
            transport.finish(xfer)
            xfer.mark(TransferState.FAILED, "lease expired")
