"""Same-host KV sharing: re-backing a buffer in place keeps its bytes and address, and a second
mapping of the memfd sees the owner's later writes; copies from a mapped peer are exact and stay
inside what is mapped."""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest
import torch

from pdserve.kv.layout import BlockLayout, LayoutError
from pdserve.kv.transports import shared_kv

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not shared_kv.enabled(), reason="needs Linux memfd")]


@pytest.mark.parametrize("threads,split_min", [(1, 8 << 20), (2, 64)])
def test_copy_table_is_exact(threads: int, split_min: int) -> None:
    rng = np.random.default_rng(1)
    for n in (1, 5000, 300_001):
        src = rng.integers(0, 255, n, dtype=np.uint8)
        dst = np.zeros(n, dtype=np.uint8)
        cuts = [0, *sorted(int(c) for c in rng.integers(0, n, 7)), n]
        pieces = [(a, b - a) for a, b in zip(cuts, cuts[1:]) if b > a]
        rng.shuffle(pieces)  # any order, any cut
        table = [(dst.ctypes.data + a, src.ctypes.data + a, k) for a, k in pieces]
        shared_kv.copy_table(table, threads=threads, split_min=split_min)
        assert np.array_equal(src, dst)


def test_copy_blocks_from_a_mapping_and_only_inside_it() -> None:
    """The peer's KV is "mapped" here at another address, all but its first and last page (as
    ``share`` leaves them): blocks inside copy exactly; a block touching an edge is refused."""
    nb = 16
    src = torch.randn(3, 2, nb, 3, 16, 64).to(torch.bfloat16)  # 6 KiB per row and block
    dst = torch.zeros_like(src)
    ours = BlockLayout({f"l{i}": dst[i] for i in range(3)}, nb)
    theirs = 0x7000_0000_0000  # the peer's address of its buffer (not mapped here)
    page = mmap.PAGESIZE
    here = src.data_ptr()
    memory = shared_kv.PeerMemory([(theirs + page, src.nbytes - 2 * page, here + page)],
                                  np.zeros(nb, dtype=np.uint64), [])
    row = src[0, 0, 0].nbytes
    bases = [theirs + i * src[0].nbytes for i in range(3)]
    assert memory.copy_blocks(ours, bases, [3, 4, 9, 1], [7, 8, 0, 15])
    for s_id, d_id in [(3, 7), (4, 8), (9, 0), (1, 15)]:
        assert torch.equal(dst[:, :, d_id].view(torch.int16), src[:, :, s_id].view(torch.int16))
    assert dst[:, :, [2, 3, 4, 5, 6, 9, 10, 11, 12, 13, 14]].view(torch.int16).eq(0).all()
    assert row > page  # so block 0 (first page) and the last block (last page) lie outside
    assert not memory.copy_blocks(ours, bases, [0], [5])
    assert not memory.copy_blocks(ours, bases, [2, nb - 1], [5, 6])
    with pytest.raises(LayoutError, match="out of range"):
        memory.copy_blocks(ours, bases, [2], [nb])


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
