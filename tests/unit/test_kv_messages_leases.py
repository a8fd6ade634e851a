"""Side-channel message encoding, and the prefill-side lease table."""

from __future__ import annotations

import threading
import time

import msgpack
import pytest

from pdserve.kv import messages as m
from pdserve.kv.lease_board import LeaseBoard, tag_of
from pdserve.kv.leases import ENDED_MEMORY, LeaseTable

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("msg", [
    m.PullRequest("x1", "req-1", [3, 4, 9], "shm", "abcd", tp_rank=1, peer="dec-0"),
    m.PullRequest("x2", "req-2", [], "tcp", ""),
    m.PullRequest("x3", "req-3", [1], "shm", "f", hints={"cma": True}),
    m.PullReply("x1", True, nbytes=123, extra={"shm": "psm_1", "nbytes": 123}),
    m.PullReply("x1", False, error="no lease"),
    m.Done("x1", "req-1", ok=False),
    m.Release("req-1", reason="prefix hit"),
])
def test_round_trip(msg) -> None:
    data = m.encode(msg)
    assert isinstance(data, bytes)
    assert m.decode(data) == msg
    assert m.decode(memoryview(data)) == msg


@pytest.mark.parametrize("data", [
    b"",
    b"\xc1garbage",
    msgpack.packb([1, 2, 3]),
    msgpack.packb({"op": "nope"}),
    msgpack.packb({"no_op": 1}),
    msgpack.packb({"op": "pull", "xfer_id": "x"}),  # missing fields
    msgpack.packb({"op": "pull", "xfer_id": "x", "req_id": "r", "block_ids": "1,2",
                   "transport": "shm", "layout": "f"}),  # wrongly typed
    msgpack.packb({"op": "pull", "xfer_id": "x", "req_id": "r", "block_ids": [1, "2"],
                   "transport": "shm", "layout": "f"}),
    msgpack.packb({"op": "reply", "xfer_id": 5, "ok": True}),
    msgpack.packb({"op": "done", "xfer_id": "x", "req_id": "r", "ok": 1}),
])
def test_garbage_raises_protocol_error(data: bytes) -> None:
    with pytest.raises(m.ProtocolError):
        m.decode(data)


def test_fields_of_newer_peers_are_ignored() -> None:
    """A newer peer's additions (e.g. pull hints) must not make this side drop its messages."""
    got = m.decode(msgpack.packb({"op": "done", "xfer_id": "x", "req_id": "r", "future": {"a": 1}}))
    assert got == m.Done("x", "r")


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_add_get_complete_take_finished() -> None:
    t = LeaseTable(clock=FakeClock())
    t.add("a", [1, 2], expires_at=2000)
    t.add("b", [3], expires_at=2000)
    assert len(t) == 2 and t.get("a").block_ids == [1, 2]
    assert t.complete("a") is True
    assert t.complete("a") is False  # twice: no double free
    assert t.complete("unknown") is False
    assert t.get("a") is None and len(t) == 1
    assert t.take_finished() == {"a"}
    assert t.take_finished() == set()
    assert t.completed_total == 1


def test_reap_expired_with_fake_clock() -> None:
    clock = FakeClock(1000)
    t = LeaseTable(clock=clock)
    t.add("early", [1], expires_at=1010)
    t.add("late", [2], expires_at=1030)
    assert t.reap_expired() == []
    clock.now = 1010  # expiry is inclusive
    assert t.reap_expired() == ["early"]
    assert t.get("early") is None and t.get("late") is not None
    assert t.take_finished() == {"early"}
    clock.now = 5000
    assert t.reap_expired() == ["late"]
    assert t.reap_expired() == []
    assert t.expired_total == 2 and t.take_finished() == {"late"}


def test_wait_for_present_absent_and_finished() -> None:
    t = LeaseTable()
    t.add("a", [1], time.time() + 60)
    assert t.wait_for("a", 0).req_id == "a"
    start = time.monotonic()
    assert t.wait_for("missing", 0.05) is None
    assert 0.04 <= time.monotonic() - start < 3
    t.complete("a")
    start = time.monotonic()
    assert t.wait_for("a", 5) is None  # already finished: no waiting
    assert time.monotonic() - start < 4


def test_wait_for_wakes_when_lease_is_added() -> None:
    t = LeaseTable()
    timer = threading.Timer(0.05, t.add, args=("late", [7], time.time() + 60))
    timer.start()
    start = time.monotonic()
    lease = t.wait_for("late", 5)
    assert lease is not None and lease.block_ids == [7]
    assert time.monotonic() - start < 4
    timer.join()


def test_add_copies_block_ids() -> None:
    t = LeaseTable()
    ids = [1, 2]
    t.add("a", ids, time.time() + 60)
    ids.append(3)
    assert t.get("a").block_ids == [1, 2]


def test_empty_hints_are_left_out_for_older_peers() -> None:
    raw = msgpack.unpackb(m.encode(m.PullRequest("x", "r", [1], "tcp", "f")))
    assert "hints" not in raw


class _Tracker:
    def __init__(self) -> None:
        self.done = False


def test_hold_defers_finished_until_every_tracker_is_done() -> None:
    clock = FakeClock()
    t = LeaseTable(clock=clock)
    t.add("a", [1], 1010.0)
    t.add("b", [2], 1010.0)
    t1, t2 = _Tracker(), _Tracker()
    t.hold("a", t1)
    t.hold("a", t2)
    assert t.complete("a") and t.complete("b")
    assert t.take_finished() == {"b"}
    t1.done = True
    assert t.take_finished() == set() and t.held() == 1
    t2.done = True
    assert t.take_finished() == {"a"}
    assert t.take_finished() == set()


def test_pin_keeps_blocks_until_the_pull_is_done_even_if_the_lease_expires() -> None:
    clock = FakeClock()
    t = LeaseTable(clock=clock)
    t.add("a", [1, 2], 1010.0)
    pinned = t.pin("a")
    assert pinned is not None
    lease, pin = pinned
    assert lease.block_ids == [1, 2]
    clock.now = 1011.0  # expires while the pull still gathers its blocks
    assert t.reap_expired() == ["a"]
    assert t.take_finished() == set()  # not reported free: the send still reads them
    pin.done = True
    assert t.take_finished() == {"a"}
    assert t.take_finished() == set() and t.held() == 0


def test_pin_refuses_an_expired_lease_before_it_is_reaped() -> None:
    clock = FakeClock()
    t = LeaseTable(clock=clock)
    t.add("a", [1], 1010.0)
    clock.now = 1010.0
    assert t.pin("a") is None and t.pin("missing") is None
    assert t.reap_expired() == ["a"] and t.take_finished() == {"a"}


def test_ended_after_complete_and_after_expiry() -> None:
    clock = FakeClock(1000)
    t = LeaseTable(clock=clock)
    t.add("done", [1], expires_at=2000)
    t.add("lapsed", [2], expires_at=1010)
    assert not t.ended("done") and not t.ended("lapsed") and not t.ended("never")
    assert t.complete("done")
    assert t.ended("done") and not t.ended("lapsed")
    clock.now = 1010
    assert t.reap_expired() == ["lapsed"]
    assert t.ended("lapsed")
    assert t.take_finished() == {"done", "lapsed"}
    assert t.ended("done") and t.ended("lapsed")  # still known after vLLM freed the blocks
    assert not t.ended("never")  # a lease never granted has not ended: its pull may wait for it


def test_ended_memory_forgets_the_oldest_first() -> None:
    t = LeaseTable(clock=FakeClock(1000))
    for i in range(ENDED_MEMORY + 2):
        t.add(f"r{i}", [1], expires_at=2000)
        assert t.complete(f"r{i}")
    assert not t.ended("r0") and not t.ended("r1")  # evicted: the two oldest
    assert t.ended("r2") and t.ended(f"r{ENDED_MEMORY + 1}")
    assert len(t._ended) == ENDED_MEMORY


def test_re_adding_a_req_id_replaces_its_lease() -> None:
    clock = FakeClock(1000)
    board = LeaseBoard(8)
    t = LeaseTable(clock=clock, board=board)
    t.add("a", [1, 2], expires_at=1010)
    t.get("a").pulls = 3
    t.add("a", [3], expires_at=1030)
    assert len(t) == 1
    lease = t.get("a")
    assert (lease.block_ids, lease.expires_at, lease.pulls) == ([3], 1030, 0)
    assert board.tags[3] == tag_of("a")
    clock.now = 1010  # the first grant's expiry no longer applies
    assert t.reap_expired() == []
    pinned = t.pin("a")
    assert pinned is not None and pinned[0] is lease
    pinned[1].done = True
    assert t.complete("a") and not t.complete("a")
    assert board.tags[3] == 0 and t.completed_total == 1
    assert t.ended("a") and t.take_finished() == {"a"}
