"""SideChannelServer + Puller in one process: leases, parking, refusals, expiry, release, ZAP."""

from __future__ import annotations

import socket
import threading
import time
import uuid

import pytest
import torch
import zmq

from pdserve.kv import messages as m
from pdserve.kv.layout import BlockLayout
from pdserve.kv.leases import LeaseTable
from pdserve.kv.puller import Puller, PullError, PullTask
from pdserve.kv.side_channel import SideChannelServer
from pdserve.kv.transports import make_transports
from pdserve.kv.transports.base import RetryWithoutHints, Transport

pytestmark = pytest.mark.unit

HOST = "127.0.0.1"
NB = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def make_kv(seed: int, heads: int = 2):
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}": torch.randn(2, NB, heads, 4, 8, generator=g).to(torch.bfloat16)
            for i in range(3)}


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Pair:
    """A prefill side (server) and a decode side (puller) on 127.0.0.1."""

    def __init__(self, lease_wait: float = 2.0, timeout: float = 5.0,
                 allowed_peers: list[str] | None = None, decode_heads: int = 2) -> None:
        self.port = free_port()
        self.clock = FakeClock()
        self.leases = LeaseTable(clock=self.clock)
        self.src_kv, self.dst_kv = make_kv(1), make_kv(2, decode_heads)
        self.src, self.dst = BlockLayout(self.src_kv, NB), BlockLayout(self.dst_kv, NB)
        self.served: list[int] = []
        self.server_transports = make_transports()
        self.server = SideChannelServer(HOST, self.port, self.src, self.leases,
                                        self.server_transports, lease_wait_seconds=lease_wait,
                                        allowed_peers=allowed_peers, on_bytes=self.served.append)
        self.server.start()
        self.puller = Puller(self.dst, make_transports(), tp_rank=0, engine_id="dec",
                             timeout=timeout)

    def lease(self, req_id: str, block_ids: list[int], ttl: float = 60) -> None:
        self.leases.add(req_id, block_ids, self.clock.now + ttl)
        self.server.wake()

    def task(self, req_id: str, remote: list[int], local: list[int], transport: str = "shm"):
        return PullTask(f"d-{req_id}", req_id, HOST, self.port, remote, local, transport)

    def assert_copied(self, remote: list[int], local: list[int]) -> None:
        for name in self.src_kv:
            assert torch.equal(self.src_kv[name][:, remote].view(torch.uint8),
                               self.dst_kv[name][:, local].view(torch.uint8))

    def wait_finished(self, req_id: str, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        while time.monotonic() < deadline:
            seen |= self.leases.take_finished()
            if req_id in seen:
                return
            time.sleep(0.01)
        raise AssertionError(f"lease {req_id} was not finished")

    def close(self) -> None:
        self.server.stop()
        for t in [*self.server_transports.values(), *self.puller.transports.values()]:
            t.close()


@pytest.fixture()
def pair():
    p = Pair()
    yield p
    p.close()


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_pull_is_bit_exact_and_confirms(pair: Pair, transport: str) -> None:
    remote, local = [2, 3, 4, 9], [10, 11, 0, 5]
    pair.lease("r1", remote + [12])  # pulling a subset of the lease is fine
    xfer = pair.puller.pull(pair.task("r1", remote, local, transport))
    assert xfer.nbytes == pair.src.nbytes(4) and xfer.state.value == "done"
    pair.assert_copied(remote, local)
    pair.wait_finished("r1")  # the done message freed the lease at once
    assert pair.leases.get("r1") is None
    assert pair.served == [pair.src.nbytes(4)]


def test_repeated_pulls_reuse_buffers(pair: Pair) -> None:
    pair.puller.transports["shm"].direct = False  # the segment path
    for i in range(5):
        pair.lease(f"r{i}", [i, i + 1])
        pair.puller.pull(pair.task(f"r{i}", [i, i + 1], [i + 5, i + 6], "shm"))
        pair.assert_copied([i, i + 1], [i + 5, i + 6])
        pair.wait_finished(f"r{i}")
    assert len(pair.server_transports["shm"]._pool.names()) == 1


def test_pull_waits_for_a_late_lease(pair: Pair) -> None:
    """The decode side can be faster than the prefill engine's next step: the pull is parked."""
    timer = threading.Timer(0.3, pair.lease, args=("late", [1, 2]))
    timer.start()
    start = time.monotonic()
    pair.puller.pull(pair.task("late", [1, 2], [3, 4]))
    assert time.monotonic() - start >= 0.25
    pair.assert_copied([1, 2], [3, 4])
    timer.join()


def test_lease_never_granted_is_refused() -> None:
    p = Pair(lease_wait=0.3)
    try:
        start = time.monotonic()
        with pytest.raises(PullError, match="no KV lease for request ghost"):
            p.puller.pull(p.task("ghost", [1], [1]))
        assert time.monotonic() - start < 5
    finally:
        p.close()


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_pull_after_expiry_is_refused_before_the_reap(pair: Pair, transport: str) -> None:
    """A lease past its expiry is never served, even before the engine's next reap frees it."""
    pair.lease("late", [1, 2], ttl=30)
    pair.clock.now += 31
    with pytest.raises(PullError, match="already ended"):
        pair.puller.pull(pair.task("late", [1, 2], [3, 4], transport))
    assert pair.served == []
    pair.wait_finished("late")  # the refused pull's done (ok=False) freed it before the reap
    assert pair.leases.get("late") is None and pair.leases.reap_expired() == []


def test_pull_times_out_cleanly() -> None:
    p = Pair(lease_wait=30, timeout=0.4)
    p.puller.silent_peer_seconds, p.puller.silent_after = 600, 0.3  # silent far longer than this test
    try:
        start = time.monotonic()
        with pytest.raises(PullError, match="timed out"):
            p.puller.pull(p.task("ghost", [1], [1]))
        assert time.monotonic() - start < 5
        # right after, pulls there fail at once instead of queueing behind another timeout ...
        p.lease("ok", [4])
        start = time.monotonic()
        with pytest.raises(PullError, match="not tried: a pull there timed out less than 600s ago"):
            p.puller.pull(p.task("ok", [4], [6]))
        assert time.monotonic() - start < 1.0  # no round trip (the pull timeout is 0.4 s)
        p.wait_finished("ok")  # (that request's lease is released: it failed)
        # ... then, once the silent window is over (moved into the past here, not slept through),
        # the puller recovers: the next pull works (a fresh socket, the stale reply is dropped)
        key = (HOST, p.port)
        with p.puller._peers_lock:
            assert p.puller._silent[key] > time.monotonic() + 500
            p.puller._silent[key] = time.monotonic() - 1
        p.lease("ok2", [4])
        p.puller.pull(p.task("ok2", [4], [6]))
        p.assert_copied([4], [6])
    finally:
        p.close()


def test_a_pull_that_ran_out_of_budget_says_nothing_of_the_peer(pair: Pair) -> None:
    """A load that queued behind other pulls may start with little time left; its timeout must
    not make the peer 'silent' for the loads after it."""
    pair.puller.silent_peer_seconds, pair.puller.silent_after = 5.0, 1.0
    with pytest.raises(PullError, match="timed out"):
        pair.puller.pull(pair.task("ghost", [1], [1]), deadline=time.monotonic() + 0.1)
    pair.lease("ok", [4])
    pair.puller.pull(pair.task("ok", [4], [6]))  # tried, and served
    pair.assert_copied([4], [6])


def test_a_load_that_waited_out_its_timeout_in_the_queue_fails_at_once(pair: Pair) -> None:
    """The load timeout counts from when the engine asked for the load: a pull whose deadline
    passed while it waited for a pull thread fails without a round trip and releases the lease."""
    pair.lease("late", [1])
    with pytest.raises(PullError, match="waited .* for a free pull thread"):
        pair.puller.pull(pair.task("late", [1], [1]), deadline=time.monotonic() - 1)
    pair.wait_finished("late")  # released at once, not left to expire


def test_blocks_not_leased_are_refused(pair: Pair) -> None:
    pair.lease("r", [1, 2])
    with pytest.raises(PullError, match=r"blocks \[3\] are not leased to request r"):
        pair.puller.pull(pair.task("r", [1, 3], [1, 3]))
    pair.wait_finished("r")  # the refused pull's done (ok=False) freed the lease
    assert pair.leases.get("r") is None and pair.served == []


def test_unknown_transport_is_refused(pair: Pair) -> None:
    pair.lease("r", [1])
    pair.puller.transports["carrier-pigeon"] = pair.puller.transports["tcp"]
    with pytest.raises(PullError, match="unknown transport 'carrier-pigeon'"):
        pair.puller.pull(pair.task("r", [1], [1], "carrier-pigeon"))
    pair.wait_finished("r")
    assert pair.leases.get("r") is None and pair.served == []


def test_layout_mismatch_is_refused_with_a_clear_message() -> None:
    p = Pair(decode_heads=1)  # another model / TP size: other KV shape
    try:
        p.lease("r", [1])
        with pytest.raises(PullError, match="KV cache layouts differ between prefill and decode"):
            p.puller.pull(p.task("r", [1], [1]))
        p.wait_finished("r")
        assert p.leases.get("r") is None and p.served == []
    finally:
        p.close()


def test_a_transport_error_fails_the_pull_and_frees_the_lease(pair: Pair, monkeypatch) -> None:
    """Anything the transport raises becomes a PullError naming the peer; the confirmation
    (ok=False) still goes out, so the prefill side frees the blocks at once."""
    def broken(*args) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pair.puller.transports["tcp"], "receive", broken)
    pair.lease("r", [1, 2])
    copied: list = []
    with pytest.raises(PullError, match=rf"KV pull from {HOST}:{pair.port} failed: disk on fire") as exc:
        pair.puller.pull(pair.task("r", [1, 2], [3, 4], "tcp"), on_copied=copied.append)
    assert isinstance(exc.value.__cause__, RuntimeError) and copied == []
    pair.wait_finished("r")
    assert pair.leases.get("r") is None
    deadline = time.monotonic() + 3
    while pair.server._inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pair.server._inflight == {}  # the served transfer was dropped on the done message


class FakePrefill:
    """A ROUTER standing in for the prefill side: answers each pull request with the messages
    ``answer(request)`` returns, in order, and records every message it receives."""

    def __init__(self, answer) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port(f"tcp://{HOST}")
        self.answer = answer
        self.got: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(20):
                continue
            ident, header, *_ = self.sock.recv_multipart()
            msg = m.decode(header)
            self.got.append(msg)
            if isinstance(msg, m.PullRequest):
                for reply in self.answer(msg):
                    self.sock.send_multipart([ident, m.encode(reply)])

    def wait_done(self) -> None:
        """Until the puller's confirmation arrived (always the last thing a pull sends)."""
        deadline = time.monotonic() + 5
        while not any(isinstance(msg, m.Done) for msg in self.got) and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(linger=0)


class Recording(Transport):
    """A decode-side transport: offers ``hints``, records what it receives, raises ``fail`` in turn."""

    name = "rec"

    def __init__(self, hints: dict | None = None, fail: list[Exception] | None = None) -> None:
        self._hints = hints or {}
        self.fail = list(fail or [])
        self.received: list[tuple[str, dict]] = []

    def send(self, xfer, layout, block_ids):  # pragma: no cover - decode side only
        raise AssertionError

    def hints(self, layout, remote) -> dict:
        return dict(self._hints)

    def receive(self, xfer, layout, block_ids, extra, frames) -> None:
        self.received.append((xfer.xfer_id, extra))
        if self.fail:
            raise self.fail.pop(0)


def _fake_pull(answer, transport: Recording, on_copied=None):
    fake = FakePrefill(answer)
    layout = BlockLayout({"l": torch.zeros(2, 4, 16)}, 4)
    puller = Puller(layout, {"rec": transport}, 0, "decode", timeout=5)
    try:
        try:
            return fake, puller.pull(PullTask("d-1", "r-1", HOST, fake.port, [0], [1], "rec"),
                                     on_copied=on_copied), None
        except PullError as exc:
            return fake, None, exc
    finally:
        fake.wait_done()
        fake.close()


def _ok(req: m.PullRequest) -> list:
    return [m.PullReply(req.xfer_id, True, nbytes=8, extra={"via": "reply"})]


def test_a_transport_error_sends_done_not_ok() -> None:
    copied: list = []
    rec = Recording(fail=[RuntimeError("disk on fire")])
    fake, xfer, exc = _fake_pull(_ok, rec, on_copied=copied.append)
    assert xfer is None and exc is not None and "failed: disk on fire" in str(exc)
    assert copied == []  # the caller is never told the blocks are in place
    req, done = fake.got
    assert isinstance(req, m.PullRequest) and done == m.Done(req.xfer_id, "r-1", ok=False)


def test_retry_without_hints_needs_hints_to_drop() -> None:
    """RetryWithoutHints when no hints were sent cannot be retried: the pull fails, one request."""
    rec = Recording(hints={}, fail=[RetryWithoutHints("peer memory not readable")])
    fake, xfer, exc = _fake_pull(_ok, rec)
    assert xfer is None and exc is not None and "failed: peer memory not readable" in str(exc)
    assert isinstance(exc.__cause__, RetryWithoutHints)
    req, done = fake.got
    assert isinstance(req, m.PullRequest) and req.hints == {}
    assert done == m.Done(req.xfer_id, "r-1", ok=False)


def test_retry_without_hints_pulls_again_under_a_new_id() -> None:
    rec = Recording(hints={"cma": True}, fail=[RetryWithoutHints("peer memory not readable")])
    fake, xfer, exc = _fake_pull(_ok, rec)
    assert exc is None and xfer is not None and xfer.nbytes == 8 and xfer.hints == {}
    first, second, done = fake.got
    assert first.hints == {"cma": True} and second.hints == {}
    assert second.xfer_id != first.xfer_id == rec.received[0][0]
    assert done == m.Done(second.xfer_id, "r-1", ok=True) and xfer.xfer_id == second.xfer_id


def test_a_stale_reply_is_dropped() -> None:
    """A late reply to an earlier pull on the same socket (other xfer_id), or a message that is no
    reply at all, is skipped; the pull takes the reply to its own request."""
    def stale_first(req: m.PullRequest) -> list:
        return [m.PullReply("not-" + req.xfer_id, True, nbytes=1, extra={"via": "stale"}),
                m.Done(req.xfer_id, "r-1"),
                m.PullReply(req.xfer_id, True, nbytes=8, extra={"via": "reply"})]

    rec = Recording()
    fake, xfer, exc = _fake_pull(stale_first, rec)
    assert exc is None and xfer is not None and xfer.nbytes == 8
    assert rec.received == [(xfer.xfer_id, {"via": "reply"})]
    assert fake.got[-1] == m.Done(xfer.xfer_id, "r-1", ok=True)


def _raw_pull(port: int, req_id: str, blocks: list[int], fingerprint: str):
    """A pull that never confirms (a decode instance that died after the reply)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{HOST}:{port}")
    sock.send(m.encode(m.PullRequest(uuid.uuid4().hex, req_id, blocks, "shm", fingerprint)))
    assert sock.poll(3000), "no reply"
    reply = m.decode(sock.recv_multipart()[0])
    sock.close()
    return reply


@pytest.mark.parametrize("remote,local", [([2, 3, 4, 9], [10, 11, 0, 5]),  # runs of blocks
                                          ([7, 5, 3, 1], [0, 1, 2, 3]),  # none consecutive
                                          (list(range(NB)), list(range(NB - 1, -1, -1)))])
def test_tcp_zero_copy_frames_are_bit_exact_and_hold_the_blocks(pair: Pair, remote, local) -> None:
    tcp = pair.server_transports["tcp"]
    tcp.zero_copy_min_region = 0  # frames straight from the KV cache, however small
    held: list = []
    hold = pair.leases.hold
    pair.leases.hold = lambda req_id, tracker: (held.append(tracker), hold(req_id, tracker))
    pair.lease("r", remote)
    pair.puller.pull(pair.task("r", remote, local, "tcp"))
    pair.assert_copied(remote, local)
    assert len(held) == 1  # the reply's frames were tracked against the lease
    pair.wait_finished("r")  # finished only once ZMQ let go of the frames
    assert held[0].done
    assert tcp._pool._free == []  # no staging buffer was used


class FakeTracker:
    def __init__(self) -> None:
        self.done = False


def test_tracked_frames_defer_finished_sending_after_confirmation(pair: Pair) -> None:
    """Blocks whose frames ZMQ still holds are not reported finished (freed) on confirmation."""
    tracker = FakeTracker()
    pair.lease("r", [1, 2])
    pair.leases.hold("r", tracker)
    pair.puller.pull(pair.task("r", [1, 2], [3, 4], "tcp"))  # confirmed by a done message
    deadline = time.monotonic() + 3
    while pair.leases.get("r") is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pair.leases.get("r") is None  # the lease itself is over...
    assert pair.leases.take_finished() == set()  # ...but the blocks stay allocated
    assert pair.leases.held() == 1
    tracker.done = True
    assert pair.leases.take_finished() == {"r"}
    assert pair.leases.held() == 0


def test_tracked_frames_defer_finished_sending_after_expiry(pair: Pair) -> None:
    tracker = FakeTracker()
    pair.lease("r", [1, 2], ttl=30)
    pair.leases.hold("r", tracker)
    pair.clock.now += 31
    assert pair.leases.reap_expired() == ["r"]
    pair.server.forget({"r"})
    assert pair.leases.take_finished() == set()
    tracker.done = True
    assert pair.leases.take_finished() == {"r"}


def test_shm_direct_read_uses_no_segment(pair: Pair) -> None:
    shm = pair.server_transports["shm"]
    if not pair.puller.transports["shm"].direct:
        pytest.skip("process_vm_readv not available")
    pair.lease("r", [2, 3, 9])
    pair.puller.pull(pair.task("r", [2, 3, 9], [0, 1, 5], "shm"))
    pair.assert_copied([2, 3, 9], [0, 1, 5])
    assert shm._pool.names() == set()
    pair.wait_finished("r")


def test_shm_direct_read_not_permitted_falls_back_to_a_segment(pair: Pair, monkeypatch) -> None:
    import errno

    from pdserve.kv.transports import cma

    dec = pair.puller.transports["shm"]
    if not dec.direct:
        pytest.skip("process_vm_readv not available")
    calls = []

    def denied(*args, **kwargs):
        calls.append(args)
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(cma, "read", denied)
    for i in range(2):
        pair.lease(f"r{i}", [4, 5])
        pair.puller.pull(pair.task(f"r{i}", [4, 5], [i, 8 + i], "shm"))
        pair.assert_copied([4, 5], [i, 8 + i])
        pair.wait_finished(f"r{i}")
    assert len(calls) == 1  # the peer is remembered: the second pull asks for a segment at once
    assert len(pair.server_transports["shm"]._pool.names()) == 1
    assert pair.server._inflight == {}  # the superseded first pull was dropped too


def test_shm_direct_read_refuses_a_lease_about_to_end(pair: Pair) -> None:
    if not pair.puller.transports["shm"].direct:
        pytest.skip("process_vm_readv not available")
    pair.clock.now = time.time()
    pair.lease("r", [1], ttl=0.5)  # ends within the safety margin
    with pytest.raises(PullError, match="lease ends before the copy"):
        pair.puller.pull(pair.task("r", [1], [2], "shm"))


def test_lease_expiry_frees_the_shm_segment(pair: Pair) -> None:
    pair.lease("r", [1, 2], ttl=30)
    reply = _raw_pull(pair.port, "r", [1, 2], pair.src.fingerprint)
    assert reply.ok and reply.extra["shm"]
    pool = pair.server_transports["shm"]._pool
    assert [s.name for s in pool._free] == []  # held by the unconfirmed pull
    assert pair.leases.reap_expired() == []
    pair.clock.now += 31
    expired = pair.leases.reap_expired()
    assert expired == ["r"]
    pair.server.forget(set(expired))
    assert [s.name for s in pool._free] == [reply.extra["shm"]]  # back in the pool
    assert pair.server._inflight == {}
    # finished once the server thread let go of its pin (it does so just after the reply went out)
    pair.wait_finished("r")


def test_release_completes_the_lease(pair: Pair) -> None:
    pair.lease("r", [1, 2])
    pair.puller.release(HOST, pair.port, "r", "prefix cache hit")
    pair.wait_finished("r")
    assert pair.leases.get("r") is None


def test_garbage_does_not_stop_the_server(pair: Pair) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{HOST}:{pair.port}")
    sock.send(b"\xc1 not msgpack")
    sock.send_multipart([m.encode(m.Done("x", "nobody")), b"extra"])
    sock.close()
    pair.lease("r", [5])
    pair.puller.pull(pair.task("r", [5], [6]))
    pair.assert_copied([5], [6])


def test_out_of_range_blocks_fail_the_pull(pair: Pair) -> None:
    pair.lease("r", [NB + 5])
    with pytest.raises(PullError, match="out of range"):
        pair.puller.pull(pair.task("r", [NB + 5], [1]))
    pair.wait_finished("r")
    assert pair.leases.get("r") is None


def test_allowed_peers_refuse_other_addresses() -> None:
    p = Pair(timeout=0.5, allowed_peers=["127.0.0.2"])  # we connect from 127.0.0.1
    try:
        p.lease("r", [1])
        # ZAP drops the connection: the request cannot go out (EAGAIN, on a loaded host) or gets no answer
        with pytest.raises(PullError, match="timed out|Resource temporarily unavailable"):
            p.puller.pull(p.task("r", [1], [1]))
        assert p.leases.get("r") is not None and p.served == []
    finally:
        p.close()


def test_allowed_peers_admit_listed_addresses() -> None:
    p = Pair(allowed_peers=["127.0.0.1"])
    try:
        p.lease("r", [1, 2])
        p.puller.pull(p.task("r", [1, 2], [7, 8]))
        p.assert_copied([1, 2], [7, 8])
    finally:
        p.close()


@pytest.mark.parametrize("payload", [True, False])
def test_payload_ahead_of_the_reply_is_read_at_once(payload: bool) -> None:
    """A transport whose payload arrives before the side-channel reply (the headed tcp stream)
    is read without waiting for that reply; the request and then ``done`` still go out. If what
    turned readable is not a payload (the stream closed), the reply is awaited as usual."""
    import os

    from pdserve.kv.transports.base import Outgoing, Transport

    ctx = zmq.Context.instance()
    prefill = ctx.socket(zmq.ROUTER)  # takes requests; replies only when told below
    port = prefill.bind_to_random_port(f"tcp://{HOST}")
    ready_r, ready_w = os.pipe()
    os.write(ready_w, b"x")  # something is there already
    received: list[dict] = []

    class Early(Transport):
        name = "early"

        def send(self, xfer, layout, block_ids) -> Outgoing:  # pragma: no cover - decode only
            raise AssertionError

        def payload_fd(self, xfer):
            return ready_r

        def payload_ready(self, xfer) -> bool:
            return payload

        def receive(self, xfer, layout, block_ids, extra, frames) -> None:
            received.append(extra)

    def reply_when_asked() -> None:
        assert prefill.poll(5000)
        ident, raw = prefill.recv_multipart()
        req = m.decode(raw)
        prefill.send_multipart([ident, m.encode(m.PullReply(req.xfer_id, True, nbytes=7,
                                                            extra={"via": "reply"}))])

    layout = BlockLayout({"l": torch.zeros(2, 4, 16)}, 4)
    puller = Puller(layout, {"early": Early()}, 0, "decode", timeout=5)
    copied = []
    replier = None if payload else threading.Thread(target=reply_when_asked)
    try:
        if replier is not None:
            replier.start()
        xfer = puller.pull(PullTask("d-1", "r-1", HOST, port, [0], [1], "early"),
                           on_copied=copied.append)
        assert copied == [xfer]
        if payload:
            assert received == [{"early": True}] and xfer.nbytes == layout.nbytes(1)
            kinds = []
            for _ in range(2):
                assert prefill.poll(5000)
                kinds.append(type(m.decode(prefill.recv_multipart()[1])).__name__)
            assert kinds == ["PullRequest", "Done"]
        else:
            replier.join(5)
            assert received == [{"via": "reply"}] and xfer.nbytes == 7
            assert prefill.poll(5000)
            assert isinstance(m.decode(prefill.recv_multipart()[1]), m.Done)
    finally:
        prefill.close(linger=0)
        os.close(ready_r)
        os.close(ready_w)


_FROZEN_PEER = """
import os, signal, sys, time, zmq
from pdserve.kv import messages as m
port, fingerprint, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
sock = zmq.Context().socket(zmq.DEALER)
sock.setsockopt(zmq.RCVBUF, 4096)
sock.connect(f"tcp://127.0.0.1:{port}")
sock.send(m.encode(m.PullRequest("x1", "r1", list(range(n)), "tcp", fingerprint, 0, "dec/0")))
time.sleep(0.5)  # the pull is delivered, and parked: its lease is not there yet
os.kill(os.getpid(), signal.SIGSTOP)  # a hung decode host: its kernel still answers, it reads nothing
"""


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_a_frozen_decode_peer_does_not_pin_the_blocks_forever() -> None:
    """Zero-copy frames read straight from the KV cache: while ZMQ holds them, the lease's blocks
    stay allocated even past its expiry. A peer that acknowledges nothing for the stall limit
    loses its connection, the frames are dropped, and the blocks can be freed."""
    import subprocess
    import sys

    nb = 8
    big = {f"l{i}": torch.zeros(2, nb, 16, 128, 64, dtype=torch.bfloat16) for i in range(3)}  # 24 MiB
    layout = BlockLayout(big, nb)
    clock = FakeClock()
    leases = LeaseTable(clock=clock)
    transports = make_transports()
    port = free_port()
    server = SideChannelServer(HOST, port, layout, leases, transports)
    server.stall_ms = 1000
    server.start()
    peer = subprocess.Popen([sys.executable, "-c", _FROZEN_PEER, str(port), layout.fingerprint, str(nb)])
    try:
        deadline = time.monotonic() + 20
        while not _stopped(peer.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        leases.add("r1", list(range(nb)), clock.now + 60)  # the parked pull is served now
        server.wake()
        deadline = time.monotonic() + 5
        while "r1" not in leases._held and time.monotonic() < deadline:  # the payload is queued
            time.sleep(0.01)
        clock.now += 120  # and the lease ends while ZMQ still sends it
        assert leases.reap_expired() == ["r1"]
        assert "r1" not in leases.take_finished() and leases.held() == 1
        deadline = time.monotonic() + 10
        finished: set[str] = set()
        while "r1" not in finished and time.monotonic() < deadline:
            finished |= leases.take_finished()
            time.sleep(0.05)
        assert "r1" in finished
    finally:
        peer.kill()
        peer.wait()
        server.stop()
        for t in transports.values():
            t.close()
