"""The torch_dist transport makes one pair group per peer, even when pull threads race for it."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pdserve.kv.transports import torch_dist

pytestmark = pytest.mark.unit


THREADS = 4


class _Arrivals(dict):
    """``TorchDistTransport._creating``: every thread that found no group takes its per-pair
    creation lock from here (under the transport's lock) before it blocks on that lock."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.all_in = threading.Event()

    def setdefault(self, key, default=None):
        self.count += 1
        if self.count == THREADS:
            self.all_in.set()
        return super().setdefault(key, default)


def test_concurrent_first_pulls_create_one_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one rendezvous does not end before every other thread has reached the creation lock
    (no sleep that a slow host could outlast): all four are in ``_group`` at once."""
    made: list[int] = []
    t = torch_dist.TorchDistTransport(store_host="127.0.0.1", store_port=1)
    arrivals = t._creating = _Arrivals()

    def gated_make_group(store, rank: int, backend: str, timeout: float) -> object:
        made.append(rank)
        assert arrivals.all_in.wait(5), f"only {arrivals.count} of {THREADS} threads arrived"
        return object()

    monkeypatch.setattr(torch_dist, "_make_group", gated_make_group)
    monkeypatch.setattr(torch_dist.TorchDistTransport, "_server_store", lambda self: object())
    monkeypatch.setattr("torch.distributed.PrefixStore", lambda prefix, store: store)
    start = threading.Barrier(THREADS)
    got: list[object] = []

    def first_pull() -> None:
        start.wait(5)
        got.append(t._group("dec/0", 0, torch.device("cpu"), "h", 1))

    threads = [threading.Thread(target=first_pull) for _ in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert arrivals.all_in.is_set()  # the race really happened: all waited on one creation
    assert made == [0] and len(got) == THREADS and len({id(g) for g in got}) == 1
    assert t._group("dec/1", 0, torch.device("cpu"), "h", 1) is not got[0]  # another peer: its own


class _SlowGroup:
    """A pair group whose sends block until released, recording what was sent."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.sent: list[int] = []

    def send(self, bufs, dst: int, tag: int):
        self.gate.wait(5)
        self.sent.append(tag)
        return type("Work", (), {"wait": lambda self: True})()


def _queued(t: torch_dist.TorchDistTransport, xfer_id: str) -> torch_dist.Transfer:
    xfer = torch_dist.Transfer(xfer_id=xfer_id, req_id=f"req-{xfer_id}", n_blocks=1, peer="dec/0")
    xfer.handle = (torch.ones(8, dtype=torch.uint8), torch.device("cpu"))
    t.after_reply(xfer)
    return xfer


def test_sender_survives_a_transfer_finished_while_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    group = _SlowGroup()
    t = torch_dist.TorchDistTransport(store_host="127.0.0.1", store_port=1)
    monkeypatch.setattr(t, "_group", lambda *a, **k: group)
    released: list[torch.Tensor] = []
    monkeypatch.setattr(t, "_release", released.append)
    first = _queued(t, "a")    # blocks the sender in its send
    second = _queued(t, "b")   # waits in the queue ...
    t.finish(second)           # ... and its lease ends (or the decode side gives up) meanwhile
    third = _queued(t, "c")
    group.gate.set()
    deadline = time.monotonic() + 5
    while third.state is torch_dist.TransferState.PENDING and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.state is torch_dist.TransferState.DONE
    assert second.state is torch_dist.TransferState.FAILED and "abandoned" in second.error
    assert third.state is torch_dist.TransferState.DONE  # the thread lived on
    assert group.sent == [torch_dist.tag_for("a"), torch_dist.tag_for("c")]  # b was never sent
    assert len(released) == 1  # b's buffer went back to the pool; a and c wait for finish()
    t.close()
