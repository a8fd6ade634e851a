"""The lease board: a block carries a request's tag exactly while that request's lease holds it."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.kv.lease_board import LeaseBoard, tag_of
from pdserve.kv.leases import LeaseTable

pytestmark = pytest.mark.unit


def tags(board: LeaseBoard, ids: list[int]) -> list[int]:
    return [int(board.tags[i]) for i in ids]


def test_tags_are_nonzero_and_differ() -> None:
    assert tag_of("a") != tag_of("b")
    assert all(tag_of(str(i)) != 0 for i in range(1000))


def test_post_and_clear_only_own_tags() -> None:
    board = LeaseBoard(8)
    board.post("a", [1, 2, 3])
    board.post("b", [3, 4])  # block 3 shared (prefix cache): the newest lease tags it
    assert tags(board, [1, 2, 3, 4]) == [tag_of("a")] * 2 + [tag_of("b")] * 2
    board.clear("a", [1, 2, 3])  # leaves b's tag on block 3
    assert tags(board, [1, 2, 3, 4]) == [0, 0, tag_of("b"), tag_of("b")]
    board.post("c", [-1, 7, 99])  # out-of-range ids are ignored, not an IndexError
    assert int(board.tags[7]) == tag_of("c")
    board.reset()
    assert not np.any(board.tags)


def test_lease_table_untags_before_the_blocks_are_reported_free() -> None:
    now = [1000.0]
    table = LeaseTable(clock=lambda: now[0], board=LeaseBoard(8))
    table.add("done", [1, 2], expires_at=2000)
    table.add("old", [5], expires_at=1010)
    assert tags(table.board, [1, 2, 5]) == [tag_of("done")] * 2 + [tag_of("old")]
    table.complete("done")
    assert tags(table.board, [1, 2]) == [0, 0]
    now[0] = 1010
    assert table.reap_expired() == ["old"]
    assert int(table.board.tags[5]) == 0
    assert table.take_finished() == {"done", "old"}
