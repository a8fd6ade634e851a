"""Same-host KV sharing: the prefill worker's KV cache re-backed by shared memory, in place.

The ``shm`` transport's direct read with ``process_vm_readv`` pins every page on every read and
runs at about half of memcpy speed here. A decode worker on the same host does better reading
the prefill worker's KV cache through a shared mapping, with plain memcpy.

Prefill side (:func:`share`): once, when vLLM registers the KV cache (before any forward pass),
the page-aligned interior of each backing buffer is re-backed by a memfd with the same contents,
mapped ``MAP_SHARED | MAP_FIXED`` at the same address. vLLM's tensors keep their addresses and
see no difference. The lease board lives in a memfd too (:func:`shared_array`).

Decode side (:class:`PeerMemory`): opens those memfds through ``/proc/<pid>/fd/<n>`` (the same
permission ``process_vm_readv`` needs: ptrace access to the peer) and maps them read-only once
per peer. Blocks touching a buffer's first or last partial page (not shared) are still read
with ``process_vm_readv``. ``PDSERVE_KV_SHM_SHARE=0`` turns sharing off.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
from collections.abc import Sequence

import numpy as np

from pdserve.kv import tuning
from pdserve.kv.layout import BlockLayout
from pdserve.kv.transports.cma import SPLIT_MIN, run_parts

log = logging.getLogger("pdserve.kv")

PAGE = mmap.PAGESIZE
MIN_SHARED = 1 << 20  # smaller buffers are not worth a memfd
_COPY_CHUNK = 64 << 20
_kept: list[int] = []  # memfds of this process's shared KV buffers (open for the process's life)


def enabled() -> bool:
    return (sys.platform.startswith("linux") and hasattr(os, "memfd_create")
            and tuning.switch("PDSERVE_KV_SHM_SHARE"))


def _libc_mmap():
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.mmap
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                   ctypes.c_long]
    fn.restype = ctypes.c_void_p
    return fn


def _rebacked(start: int, length: int) -> int:
    """Re-back ``[start, start+length)`` (page-aligned) of this process by a new memfd, keeping
    the bytes; the memfd's descriptor."""
    fd = os.memfd_create("pdserve-kv", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, length)
        current = np.ctypeslib.as_array((ctypes.c_uint8 * length).from_address(start))
        for off in range(0, length, _COPY_CHUNK):  # untouched (zero) memory stays a hole
            chunk = current[off : off + _COPY_CHUNK]
            if chunk.any():
                os.pwrite(fd, memoryview(chunk), off)
        flags = mmap.MAP_SHARED | 0x10  # MAP_FIXED: replace the pages at this very address
        got = _libc_mmap()(start, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
        if got != start:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap(MAP_FIXED) at {start:#x}: {os.strerror(err)}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def share(layout: BlockLayout) -> list[list[int]]:
    """Prefill side: re-back the KV cache's buffers by memfds; ``[address, length, fd]`` each.

    Only plain CPU tensors; called before the engine runs (nothing writes the KV cache
    meanwhile). Empty when sharing is off or impossible (the caller keeps ``process_vm_readv``).
    """
    if not enabled() or layout.device.type != "cpu":
        return []
    out: list[list[int]] = []
    for ptr, nbytes in sorted(_buffers(layout).items()):
        start = -(-ptr // PAGE) * PAGE
        end = (ptr + nbytes) // PAGE * PAGE
        if end - start < MIN_SHARED:
            continue
        try:
            fd = _rebacked(start, end - start)
        except OSError as exc:
            log.warning("KV cache not shared with same-host decode workers (%s); they read it "
                        "with process_vm_readv", exc)
            return out
        _kept.append(fd)
        out.append([start, end - start, fd])
    if out:
        log.info("KV cache shared with same-host decode workers: %d buffer(s), %.1f GiB",
                 len(out), sum(n for _, n, _ in out) / (1 << 30))
    return out


def _buffers(layout: BlockLayout) -> dict[int, int]:
    """The KV cache's backing buffers, address → bytes (vLLM: one for all layers)."""
    out: dict[int, int] = {}
    for plane in layout.planes:
        storage = plane.tensor.untyped_storage()
        out[storage.data_ptr()] = storage.nbytes()
    return out


def shared_array(count: int, dtype) -> tuple[np.ndarray, int] | None:
    """A zeroed array in a new memfd (for the lease board): (array, fd), or None."""
    if not enabled():
        return None
    nbytes = max(count * np.dtype(dtype).itemsize, 1)
    fd = os.memfd_create("pdserve-lease-board", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        buf = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
    except OSError:
        os.close(fd)
        return None
    _kept.append(fd)
    return np.frombuffer(buf, dtype=dtype, count=count), fd


class _Rows:
    """Where each KV row's block 0 is (row: one plane at one lead index, e.g. the K half of a
    layer), here and in our mapping of a peer's KV, and which of the peer's blocks the mapping
    holds in every row: a pull becomes a memcpy per row and run, with plain int arithmetic
    (a pull of a few blocks is dominated by fixed costs; numpy's per-call overhead was most of
    them)."""

    def __init__(self, rows: list[tuple[int, int, int]], lo: int, hi: int) -> None:
        self.rows, self.lo, self.hi = rows, lo, hi  # rows: (address here, mapped address, bytes per block)

    @classmethod
    def build(cls, regions: np.ndarray, layout: BlockLayout, bases: Sequence[int]) -> _Rows | None:
        """``regions``: [n, 3] rows of (peer address, length, address here), sorted."""
        ours, theirs = layout.row_starts(), layout.row_starts(bases)
        if ours is None or theirs is None:
            return None
        (local, inner), (remote, _) = ours, theirs
        nb = layout.num_blocks
        # the region holding each row's middle; a row cut by a region edge loses its outer blocks
        i = np.searchsorted(regions[:, 0], remote + inner * nb // 2, side="right") - 1
        if (i < 0).any():
            return None
        start, length, here = regions[i, 0], regions[i, 1], regions[i, 2]
        lo = np.maximum(-((remote - start) // inner), 0)  # ceil((start - remote) / inner)
        hi = np.minimum((start + length - remote) // inner, nb)
        rows = np.stack([local, here + (remote - start), inner], axis=1).tolist()
        return cls([tuple(r) for r in rows], int(lo.max()), int(hi.min()))

    def table(self, runs: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]] | None:
        """(destination, source, length) per row and run of (peer block, our block, count);
        None if a peer block lies outside the mapping."""
        for a, _b, k in runs:
            if a < self.lo or a + k > self.hi:
                return None
        return [(here + b * inner, mapped + a * inner, k * inner)
                for here, mapped, inner in self.rows for a, b, k in runs]


def copy_table(table: Sequence[Sequence[int]], threads: int = 1, split_min: int = SPLIT_MIN) -> None:
    """Run the (destination, source, length) copies, split over ``threads`` from ``split_min``
    bytes on."""
    total = sum(n for _d, _s, n in table)
    parts = max(1, min(threads, total // max(split_min // 2, 1), len(table)))
    if parts == 1:
        _memcpy_all(table)
        return
    chunks: list[list] = [[] for _ in range(parts)]
    done = 0
    for row in table:  # contiguous shares of about total/parts bytes each
        chunks[min(parts - 1, done * parts // total)].append(row)
        done += row[2]
    run_parts([(_memcpy_all, (c,)) for c in chunks if c])


def _memcpy_all(table: Sequence[Sequence[int]]) -> None:
    move = ctypes.memmove  # a C call without the GIL, ~0.3 us each
    for dst, src, n in table:
        move(dst, src, n)


class PeerMemory:
    """Decode side: a prefill worker's shared KV buffers and lease board, mapped read-only."""

    def __init__(self, regions: Sequence[tuple[int, int, int]], board: np.ndarray,
                 maps: list[mmap.mmap]) -> None:
        self.board, self._maps = board, maps
        self.words = memoryview(board).cast("B").cast("Q")  # the board, for per-id reads
        self._regions = np.array(sorted(regions), dtype=np.int64).reshape(-1, 3)
        self._rows: tuple[tuple[int, tuple[int, ...]], _Rows | None] | None = None

    @classmethod
    def open(cls, pid: int, regions: Sequence[Sequence[int]], board_fd: int,
             num_blocks: int) -> PeerMemory | None:
        maps: list[mmap.mmap] = []
        try:
            mapped = []
            for addr, length, fd in regions:
                maps.append(_map(pid, int(fd), int(length)))
                here = np.frombuffer(maps[-1], dtype=np.uint8).ctypes.data
                mapped.append((int(addr), int(length), int(here)))
            maps.append(_map(pid, int(board_fd), num_blocks * 8))
            board = np.frombuffer(maps[-1], dtype=np.uint64, count=num_blocks)
        except (OSError, ValueError) as exc:
            log.info("cannot map the KV cache of prefill worker pid %d (%s); reading it with "
                     "process_vm_readv", pid, exc)
            return None
        return cls(mapped, board, maps)

    def _rows_for(self, layout: BlockLayout, bases: Sequence[int]) -> _Rows | None:
        key = (id(layout), tuple(bases))
        if self._rows is None or self._rows[0] != key:
            self._rows = (key, _Rows.build(self._regions, layout, bases))
        return self._rows[1]

    def copy_blocks(self, layout: BlockLayout, bases: Sequence[int], remote_ids: Sequence[int],
                    local_ids: Sequence[int], threads: int = 1) -> bool:
        """Copy the peer's blocks ``remote_ids`` (its planes at ``bases``) into our blocks
        ``local_ids``; False if some of them lie outside the shared buffers (the caller reads
        those with process_vm_readv)."""
        rows = self._rows_for(layout, bases)
        table = None if rows is None else rows.table(layout.paired_runs(remote_ids, local_ids))
        if table is None:
            return False
        copy_table(table, threads=threads)
        return True


def _map(pid: int, fd: int, length: int) -> mmap.mmap:
    f = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(f).st_size < length:
            raise ValueError(f"/proc/{pid}/fd/{fd} is smaller than announced")
        return mmap.mmap(f, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(f)
