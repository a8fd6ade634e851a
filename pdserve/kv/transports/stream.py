"""``tcp`` payload on a plain TCP stream: the kernel copies straight between the two KV caches.

ZMQ receives a frame into a buffer of its own (a fresh multi-megabyte buffer page-faults on
every message), and the decode side then copies it into its blocks. For CPU KV caches the
``tcp`` transport moves the payload on a plain TCP connection instead: the prefill side hands
the blocks' regions to ``sendmsg`` (gather), the decode side hands its blocks' regions to
``recvmsg_into`` (scatter); no user-space copy on either side. Control messages stay on the
ZMQ side channel.

The prefill worker listens on an ephemeral port of its side-channel address and names it in its
``tcp`` replies (with ``stream_header``: it can put a header before each payload). A decode
pull thread opens one connection per prefill worker, introduces it with a random token and
names the token in its pull hints. The prefill side replies, then sends what fits in the
socket buffer at once and the rest from a small thread pool; the blocks stay held until the
send ended. Any failure closes the connection (the stream may be out of step); the next pull
opens a new one.
A peer whose stream cannot be reached is pulled through ZMQ frames, as before.
``PDSERVE_KV_TCP_STREAM=0`` turns streams off.

With a header (asked for by the decode side once the peer offered it), each payload starts with
a magic, its byte count and the pull's transfer id. The decode side then waits for whichever
comes first, the ZMQ reply or the stream, and reads the payload at once: the reply's trip through
both ZMQ I/O threads is off the pull's path (it arrives later and is dropped as stale).
"""

from __future__ import annotations

import logging
import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pdserve.kv import tuning

log = logging.getLogger("pdserve.kv")

TOKEN_BYTES = 16
_ACK = b"\x01"
IOV_MAX = 1024
_HEADER = struct.Struct("<4sQH")  # magic, payload bytes, transfer id length (the id follows)
_MAGIC = b"PDKV"


def header(xfer_id: str, nbytes: int) -> bytes:
    """What precedes a payload on the stream when the decode side asked for it."""
    ident = xfer_id.encode()
    return _HEADER.pack(_MAGIC, nbytes, len(ident)) + ident


def enabled() -> bool:
    return tuning.switch("PDSERVE_KV_TCP_STREAM")


class SendDone:
    """Tracker of one payload send: the blocks stay held until ``done``."""

    def __init__(self) -> None:
        self.done = False


def _views(buffers: Sequence[Any]) -> list[memoryview]:
    return [v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes]


def _advance(views: list[memoryview], i: int, done: int) -> int:
    """``done`` more bytes of ``views`` (from ``views[i]`` on) went through: the index of the
    first view with bytes left, that view trimmed to them."""
    while done and i < len(views):
        if done >= views[i].nbytes:
            done -= views[i].nbytes
            i += 1
        else:
            views[i] = views[i][done:]
            done = 0
    return i


def _push(sock: socket.socket, views: list[memoryview], flags: int = 0) -> list[memoryview]:
    """``sendmsg`` from the front of ``views`` (gather: no copy in user space); what is left
    (nothing, unless ``flags`` has MSG_DONTWAIT and the socket buffer filled up)."""
    i = 0
    while i < len(views):
        try:
            sent = sock.sendmsg(views[i : i + IOV_MAX], [], flags)
        except BlockingIOError:
            break
        i = _advance(views, i, sent)
    return views[i:]


def recv_all(sock: socket.socket, buffers: Sequence[Any], deadline: float) -> None:
    """Fill the buffers in order with ``recvmsg_into`` (scatter); TimeoutError at ``deadline``."""
    views, i = _views(buffers), 0
    while i < len(views):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("KV payload did not arrive in time on the tcp stream")
        sock.settimeout(left)
        got = sock.recvmsg_into(views[i : i + IOV_MAX])[0]
        if got == 0:
            raise ConnectionError("the prefill side closed the tcp stream mid-payload")
        i = _advance(views, i, got)


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the other end closed a payload connection (the decode side never writes on it
    after its token, so anything readable is its EOF or a reset)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class StreamServer:
    """Prefill side: accepts decode workers' payload connections, sends payloads on them."""

    def __init__(self, host: str, allowed_peers: Sequence[str] = (), send_timeout: float = 60.0,
                 threads: int = 2) -> None:
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self.allowed = {p for p in allowed_peers if p}
        self.send_timeout = send_timeout
        self._conns: dict[bytes, socket.socket] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="pdserve-kv-stream")
        self._closed = False
        threading.Thread(target=self._accept_loop, name="pdserve-kv-stream-accept",
                         daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, addr = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._introduce, args=(conn, addr), daemon=True).start()

    def _introduce(self, conn: socket.socket, addr) -> None:
        if self.allowed and addr[0] not in self.allowed:
            log.warning("KV stream connection from %s refused (not in allowed_peers)", addr[0])
            conn.close()
            return
        try:
            conn.settimeout(5)
            token = _recv_exact(conn, TOKEN_BYTES)
            # blocking mode, so MSG_DONTWAIT really does not wait (Python's own timeout mode
            # would poll until writable); the kernel bounds a blocked send instead
            conn.settimeout(None)
            secs = int(self.send_timeout)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            struct.pack("ll", secs, int((self.send_timeout - secs) * 1e6)))
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            conn.close()
            return
        with self._lock:
            old = self._conns.pop(token, None)
            self._conns[token] = conn
            # a decode worker that dropped a stream (an error, a timeout, a restart) comes back
            # with a new token and never sends on the old one again: close what its peer closed
            gone = [(t, c) for t, c in self._conns.items() if c is not conn and _peer_closed(c)]
            for t, _ in gone:
                del self._conns[t]
        if old is not None:
            old.close()
        for _, c in gone:
            c.close()
        try:
            conn.sendall(_ACK)  # registered: pulls may name this token from now on
        except OSError:
            with self._lock:
                if self._conns.get(token) is conn:
                    del self._conns[token]
            conn.close()

    def has(self, token: bytes) -> bool:
        with self._lock:
            return token in self._conns

    def send(self, token: bytes, buffers: Sequence[Any], tracker: SendDone,
             head: bytes = b"") -> None:
        """Send ``head`` and a payload; ``tracker.done`` once the kernel took all of it (or it
        failed).

        What fits in the socket buffer goes at once, from the caller's thread (no thread
        hand-off); the rest from a pool thread, so a slow reader never blocks the side channel.
        """
        with self._lock:
            conn = self._conns.get(token)
        if conn is None:  # the decode side hung up: its pull fails there
            tracker.done = True
            return
        try:
            rest = _push(conn, _views([head, *buffers]), socket.MSG_DONTWAIT)
        except OSError as exc:
            self._failed(token, conn, exc)
            tracker.done = True
            return
        if not rest:
            tracker.done = True
            return
        self._pool.submit(self._send_rest, token, conn, rest, tracker)

    def _send_rest(self, token: bytes, conn: socket.socket, rest: list[memoryview],
                   tracker: SendDone) -> None:
        try:
            _push(conn, rest)
        except OSError as exc:
            self._failed(token, conn, exc)
        finally:
            tracker.done = True

    def _failed(self, token: bytes, conn: socket.socket, exc: OSError) -> None:
        log.info("KV stream send failed (%s); closing that connection", exc)
        with self._lock:
            if self._conns.get(token) is conn:
                del self._conns[token]
        conn.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            c.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


class StreamClient:
    """Decode side: one payload connection per (pull thread, prefill worker)."""

    def __init__(self, connect_timeout: float = 5.0) -> None:
        self.connect_timeout = connect_timeout
        self._local = threading.local()
        self._all: set[socket.socket] = set()  # every thread's connections, for close()
        self._lock = threading.Lock()

    def _conns(self) -> dict[tuple[str, int], tuple[socket.socket, bytes]]:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def token(self, addr: tuple[str, int]) -> bytes:
        """This thread's token for the stream to ``addr`` (connecting first); OSError if it
        cannot be reached."""
        conns = self._conns()
        known = conns.get(addr)
        if known is not None:
            return known[1]
        sock = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET,
                             socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout)
            sock.connect(addr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            token = secrets.token_bytes(TOKEN_BYTES)
            sock.sendall(token)
            if _recv_exact(sock, len(_ACK)) != _ACK:  # the server registered it (or refused us)
                raise ConnectionError("the prefill worker refused the tcp stream")
        except OSError:
            sock.close()
            raise
        conns[addr] = (sock, token)
        with self._lock:
            self._all.add(sock)
        return token

    def fileno(self, addr: tuple[str, int]) -> int | None:
        """This thread's stream socket to ``addr`` (to wait on it beside the side channel)."""
        known = self._conns().get(addr)
        return None if known is None else known[0].fileno()

    def closed_by_peer(self, addr: tuple[str, int]) -> bool:
        """Is this thread's stream to ``addr`` at its end (EOF or error, not data)?"""
        known = self._conns().get(addr)
        if known is None:
            return True
        sock = known[0]
        try:
            if not select.select([sock], [], [], 0)[0]:
                return False  # nothing to read: open
            return sock.recv(1, socket.MSG_PEEK) == b""  # readable: returns at once
        except OSError:
            return True

    def receive(self, addr: tuple[str, int], buffers: Sequence[Any], timeout: float,
                expect: tuple[str, int] | None = None) -> None:
        """Read a payload into ``buffers``; with ``expect`` = (transfer id, bytes), its header
        first (a mismatch means the stream is out of step: it is closed)."""
        known = self._conns().get(addr)
        if known is None:
            raise ConnectionError("no tcp stream to the prefill worker")
        deadline = time.monotonic() + timeout
        try:
            if expect is not None:
                xfer_id, nbytes = expect
                head = bytearray(_HEADER.size + len(xfer_id.encode()))
                recv_all(known[0], [head], deadline)
                magic, got, id_len = _HEADER.unpack_from(head)
                if (magic, got, bytes(head[_HEADER.size :])) != (_MAGIC, nbytes, xfer_id.encode()) \
                        or id_len != len(head) - _HEADER.size:
                    raise ConnectionError("the tcp stream is out of step (unexpected header)")
            recv_all(known[0], buffers, deadline)
        except BaseException:
            self.drop(addr)  # out of step now: never reuse it
            raise

    def drop(self, addr: tuple[str, int]) -> None:
        known = self._conns().pop(addr, None)
        if known is not None:
            with self._lock:
                self._all.discard(known[0])
            known[0].close()

    def close(self) -> None:
        with self._lock:
            socks, self._all = list(self._all), set()
        for sock in socks:
            sock.close()
