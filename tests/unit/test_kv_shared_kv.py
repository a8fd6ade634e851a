"""Same-host KV sharing: re-backing a buffer in place keeps its bytes and address, and a second
mapping of the memfd sees the owner's later writes; the piece-wise memcpy is exact for any cuts."""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest
import torch

from pdserve.kv.layout import BlockLayout
from pdserve.kv.transports import shared_kv

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not shared_kv.enabled(), reason="needs Linux memfd")]


def _iov(buf: np.ndarray, cuts) -> np.ndarray:
    edges = [0, *sorted(int(c) for c in cuts), buf.size]
    return np.array([(buf.ctypes.data + a, b - a) for a, b in zip(edges, edges[1:]) if b > a],
                    dtype=np.int64)


@pytest.mark.parametrize("threads,split_min", [(1, 8 << 20), (2, 64)])
def test_memcpy_any_cuts_is_exact(threads: int, split_min: int) -> None:
    rng = np.random.default_rng(1)
    for n in (1, 5000, 300_001):
        src = rng.integers(0, 255, n, dtype=np.uint8)
        dst = np.zeros(n, dtype=np.uint8)
        shared_kv.memcpy(_iov(dst, rng.integers(0, n, 6)), _iov(src, rng.integers(0, n, 9)),
                         threads=threads, split_min=split_min)
        assert np.array_equal(src, dst)


def test_address_space_translates_inside_regions_only() -> None:
    space = shared_kv.AddressSpace([(1000, 100, 50_000), (5000, 10, 90_000)])
    got = space.translate(np.array([[1000, 100], [1050, 10], [5002, 8]], dtype=np.int64))
    assert got.tolist() == [[50_000, 100], [50_050, 10], [90_002, 8]]
    assert space.translate(np.array([[999, 2]], dtype=np.int64)) is None  # starts before
    assert space.translate(np.array([[1090, 11]], dtype=np.int64)) is None  # runs past the end
    assert space.translate(np.array([[2000, 1]], dtype=np.int64)) is None  # between regions


def test_share_rebacks_the_kv_buffer_in_place() -> None:
    buf = torch.randn(4, 2, 64, 3, 16, 64).to(torch.bfloat16)  # 3 MiB, like vLLM: one buffer, layer views
    kv = {f"layer.{i}": buf[i] for i in range(4)}
    before = buf.clone()
    ptr = buf.data_ptr()
    layout = BlockLayout(kv, 64)
    regions = shared_kv.share(layout)
    assert len(regions) == 1
    addr, length, fd = regions[0]
    assert addr >= ptr and addr % mmap.PAGESIZE == 0 and addr + length <= ptr + buf.nbytes
    assert buf.data_ptr() == ptr and torch.equal(buf.view(torch.int16), before.view(torch.int16))
    # another mapping of the memfd (what a decode worker maps) sees writes made through the tensor
    view = mmap.mmap(os.dup(fd), length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    mirror = np.frombuffer(view, dtype=np.uint8)
    buf.view(torch.uint8).view(-1)[addr - ptr : addr - ptr + 4096] = 7
    assert (mirror[:4096] == 7).all()
    del mirror


def test_sharing_off_by_env(monkeypatch) -> None:
    monkeypatch.setenv("PDSERVE_KV_SHM_SHARE", "0")
    buf = torch.zeros(4, 2, 64, 3, 16, 64, dtype=torch.bfloat16)
    assert shared_kv.share(BlockLayout({f"l{i}": buf[i] for i in range(4)}, 64)) == []
    assert shared_kv.shared_array(8, np.uint64) is None
