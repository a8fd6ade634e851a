"""``cma.read``: process_vm_readv with iovec lists cut at different places on both sides.

Reads from this very process (its own pid), which needs no ptrace permission.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from pdserve.kv.transports import cma

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not cma.available(), reason="process_vm_readv is Linux-only")]


def _pieces(buf: np.ndarray, cuts: list[int]) -> list[tuple[int, int]]:
    base = buf.ctypes.data
    edges = [0, *sorted(cuts), buf.size]
    return [(base + a, b - a) for a, b in zip(edges, edges[1:]) if b > a]


@pytest.mark.parametrize("threads,split_min", [(1, 8 << 20), (2, 64), (3, 64)])
def test_read_any_cut_is_exact(threads: int, split_min: int) -> None:
    rng = np.random.default_rng(0)
    for n in (1, 4096, 100_003):
        src = rng.integers(0, 255, n, dtype=np.uint8)
        dst = np.zeros(n, dtype=np.uint8)
        remote = _pieces(src, list(rng.integers(0, n, 7)))
        local = _pieces(dst, list(rng.integers(0, n, 5)))
        assert cma.read(os.getpid(), local, remote, threads=threads, split_min=split_min) == n
        assert np.array_equal(src, dst)


def test_read_more_entries_than_iov_max() -> None:
    n = 3 * cma.IOV_MAX + 17
    src = np.arange(n, dtype=np.uint8)
    dst = np.zeros(n, dtype=np.uint8)
    remote = _pieces(src, list(range(1, n)))  # one byte per entry: 3 kernel calls at least
    cma.read(os.getpid(), [(dst.ctypes.data, n)], remote)
    assert np.array_equal(src, dst)


def test_size_mismatch_and_bad_address_fail_clearly() -> None:
    dst = np.zeros(8, dtype=np.uint8)
    with pytest.raises(ValueError, match="differ in size"):
        cma.read(os.getpid(), [(dst.ctypes.data, 8)], [(dst.ctypes.data, 4)])
    with pytest.raises(OSError):
        cma.read(os.getpid(), [(dst.ctypes.data, 8)], [(8, 8)])  # page 0 is never mapped
