"""The torch_dist transport makes one pair group per peer, even when pull threads race for it."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pdserve.kv.transports import torch_dist

pytestmark = pytest.mark.unit


def test_concurrent_first_pulls_create_one_group(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[int] = []

    def slow_make_group(store, rank: int, backend: str, timeout: float) -> object:
        made.append(rank)
        time.sleep(0.2)  # a rendezvous takes a while: the other threads arrive meanwhile
        return object()

    monkeypatch.setattr(torch_dist, "_make_group", slow_make_group)
    monkeypatch.setattr(torch_dist.TorchDistTransport, "_server_store", lambda self: object())
    monkeypatch.setattr("torch.distributed.PrefixStore", lambda prefix, store: store)
    t = torch_dist.TorchDistTransport(store_host="127.0.0.1", store_port=1)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(t._group("dec/0", 0, torch.device("cpu"), "h", 1)))
               for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(5)
    assert made == [0] and len(got) == 4 and len({id(g) for g in got}) == 1
    assert t._group("dec/1", 0, torch.device("cpu"), "h", 1) is not got[0]  # another peer: its own
