"""The ``tcp`` stream: sendmsg gather on one side, recvmsg_into scatter on the other, any cuts;
payloads larger than the socket buffers; failures close the connection instead of hanging."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

from pdserve.kv.transports.stream import SendDone, StreamClient, StreamServer, header

pytestmark = pytest.mark.unit

HOST = "127.0.0.1"


def _cut(buf: np.ndarray, cuts) -> list[np.ndarray]:
    edges = [0, *sorted(int(c) for c in cuts), buf.size]
    return [buf[a:b] for a, b in zip(edges, edges[1:]) if b > a]


def _wait(pred, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def server():
    s = StreamServer(HOST, send_timeout=5)
    yield s
    s.close()


@pytest.mark.parametrize("n", [1, 100_000, 24 << 20])  # the last is far beyond the socket buffers
def test_payload_arrives_exact_across_different_cuts(server: StreamServer, n: int) -> None:
    rng = np.random.default_rng(n)
    src = rng.integers(0, 255, n, dtype=np.uint8)
    dst = np.zeros(n, dtype=np.uint8)
    client = StreamClient()
    addr = (HOST, server.port)
    token = client.token(addr)
    assert _wait(lambda: server.has(token))
    tracker = SendDone()
    server.send(token, _cut(src, rng.integers(0, n, 11)), tracker)
    client.receive(addr, _cut(dst, rng.integers(0, n, 7)), timeout=20)
    assert np.array_equal(src, dst)
    assert _wait(lambda: tracker.done)
    assert client.token(addr) == token  # the connection is kept for the next pull


def test_receive_timeout_drops_the_connection(server: StreamServer) -> None:
    client = StreamClient()
    addr = (HOST, server.port)
    token = client.token(addr)
    with pytest.raises(TimeoutError):
        client.receive(addr, [np.zeros(10, dtype=np.uint8)], timeout=0.2)
    assert client.token(addr) != token  # never reused: the stream may be out of step


def test_dropped_streams_do_not_pile_up_on_the_prefill_side(server: StreamServer) -> None:
    """Each drop (an error, a timeout, a decode restart) reconnects with a new token; the server
    closes the connections whose peer is gone instead of keeping one file descriptor per drop."""
    client = StreamClient()
    addr = (HOST, server.port)
    for _ in range(20):
        token = client.token(addr)
        assert _wait(lambda: server.has(token))
        client.drop(addr)
    token = client.token(addr)
    assert _wait(lambda: server.has(token))
    assert len(server._conns) <= 2  # the live one, and at most the last drop not yet noticed


def test_sender_closing_mid_payload_fails_the_receive_fast(server: StreamServer) -> None:
    client = StreamClient()
    addr = (HOST, server.port)
    token = client.token(addr)
    assert _wait(lambda: server.has(token))
    server.send(token, [np.ones(1000, dtype=np.uint8)], SendDone())
    server.close()  # the payload stops short
    start = time.monotonic()
    with pytest.raises((ConnectionError, OSError)):
        client.receive(addr, [np.zeros(1 << 20, dtype=np.uint8)], timeout=10)
    assert time.monotonic() - start < 5


def test_send_to_a_vanished_reader_ends_the_tracker(server: StreamServer) -> None:
    client = StreamClient()
    addr = (HOST, server.port)
    token = client.token(addr)
    assert _wait(lambda: server.has(token))
    client.drop(addr)
    tracker = SendDone()
    server.send(token, [np.ones(64 << 20, dtype=np.uint8)], tracker)  # more than any buffer
    assert _wait(lambda: tracker.done)  # a reset, not a 5 s send timeout per se
    assert _wait(lambda: not server.has(token))
    unknown = SendDone()
    server.send(b"x" * 16, [np.ones(4, dtype=np.uint8)], unknown)
    assert unknown.done


def test_peers_outside_allowed_list_are_refused() -> None:
    s = StreamServer(HOST, allowed_peers=["10.9.9.9"])
    try:
        with pytest.raises(OSError):  # no acknowledgement: the pull uses ZMQ frames instead
            StreamClient().token((HOST, s.port))
        with socket.create_connection((HOST, s.port), timeout=2) as raw:
            raw.settimeout(2)
            assert raw.recv(1) == b""  # closed by the server
    finally:
        s.close()


def test_a_payload_never_sent_does_not_hold_its_blocks() -> None:
    """The reply failed before the send started: finish() must end the tracker, or the lease's
    blocks would stay held for good."""
    from pdserve.kv.transports.base import Transfer
    from pdserve.kv.transports.tcp import TcpTransport, _PendingSend

    tcp = TcpTransport(stream=False)
    tracker = SendDone()
    xfer = Transfer("x", "r", 1)
    xfer.handle = _PendingSend(b"t" * 16, [np.ones(4, dtype=np.uint8)], tracker)
    tcp.finish(xfer)
    assert tracker.done and xfer.handle is None


def test_headed_payload_is_checked_and_a_wrong_header_drops_the_connection(
        server: StreamServer) -> None:
    """With a header, the reader checks transfer id and size before the payload; a header for
    another transfer means the stream is out of step: the receive fails and the connection is
    not reused."""
    src = np.arange(5000, dtype=np.uint8)
    client = StreamClient()
    addr = (HOST, server.port)
    token = client.token(addr)
    assert _wait(lambda: server.has(token))
    assert client.fileno(addr) is not None
    dst = np.zeros_like(src)
    server.send(token, [src], SendDone(), header("xfer-1", src.nbytes))
    client.receive(addr, [dst], timeout=5, expect=("xfer-1", src.nbytes))
    assert np.array_equal(src, dst)

    server.send(token, [src], SendDone(), header("xfer-2", src.nbytes))
    with pytest.raises(ConnectionError, match="out of step"):
        client.receive(addr, [dst], timeout=5, expect=("xfer-3", src.nbytes))
    assert client.fileno(addr) is None  # dropped: the next pull opens a new connection


def test_a_stream_the_peer_closed_is_told_apart_from_a_payload() -> None:
    server = StreamServer(HOST, send_timeout=5)
    client = StreamClient()
    addr = (HOST, server.port)
    token = client.token(addr)
    assert _wait(lambda: server.has(token))
    assert not client.closed_by_peer(addr)  # open, nothing to read
    server.send(token, [np.ones(10, dtype=np.uint8)], SendDone())
    assert _wait(lambda: client.fileno(addr) is not None)
    time.sleep(0.1)
    assert not client.closed_by_peer(addr)  # data waiting
    client.receive(addr, [np.zeros(10, dtype=np.uint8)], timeout=5)
    server.close()  # a prefill restart
    assert _wait(lambda: client.closed_by_peer(addr))
