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

from pdserve.kv.layout import BlockLayout
from pdserve.kv.transports.cma import SPLIT_MIN, run_parts

log = logging.getLogger("pdserve.kv")

PAGE = mmap.PAGESIZE
MIN_SHARED = 1 << 20  # smaller buffers are not worth a memfd
_COPY_CHUNK = 64 << 20
_kept: list[int] = []  # memfds of this process's shared KV buffers (open for the process's life)


def enabled() -> bool:
    return (sys.platform.startswith("linux") and hasattr(os, "memfd_create")
            and os.environ.get("PDSERVE_KV_SHM_SHARE", "1") != "0")


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
    holds in every row: a pull becomes one address computation and a memcpy per row and run."""

    def __init__(self, local: np.ndarray, mapped: np.ndarray, inner: np.ndarray, lo: int,
                 hi: int) -> None:
        self.local, self.mapped, self.inner, self.lo, self.hi = local, mapped, inner, lo, hi

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
        return cls(local, here + (remote - start), inner, int(lo.max()), int(hi.min()))


def copy_table(table: np.ndarray, threads: int = 1, split_min: int = SPLIT_MIN) -> None:
    """Run the ``[n, 3]`` (destination, source, length) copies, split over ``threads`` from
    ``split_min`` bytes on."""
    total = int(table[:, 2].sum())
    parts = max(1, min(threads, total // max(split_min // 2, 1), len(table)))
    if parts == 1:
        _memcpy_all(table.tolist())
        return
    bounds = np.searchsorted(np.cumsum(table[:, 2]), [total * k // parts for k in range(1, parts)])
    chunks = [c.tolist() for c in np.split(table, bounds + 1) if len(c)]
    run_parts([(_memcpy_all, (c,)) for c in chunks])


def _memcpy_all(table: list[list[int]]) -> None:
    move = ctypes.memmove  # a C call without the GIL, ~0.3 us each
    for dst, src, n in table:
        move(dst, src, n)


class PeerMemory:
    """Decode side: a prefill worker's shared KV buffers and lease board, mapped read-only."""

    def __init__(self, regions: Sequence[tuple[int, int, int]], board: np.ndarray,
                 maps: list[mmap.mmap]) -> None:
        self.board, self._maps = board, maps
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
        if rows is None:
            return False
        runs = layout.paired_runs(remote_ids, local_ids)
        if any(a < rows.lo or a + k > rows.hi for a, _b, k in runs):
            return False
        r = np.array(runs, dtype=np.int64)
        table = np.empty((len(rows.inner), len(r), 3), dtype=np.int64)
        table[:, :, 0] = rows.local[:, None] + r[None, :, 1] * rows.inner[:, None]
        table[:, :, 1] = rows.mapped[:, None] + r[None, :, 0] * rows.inner[:, None]
        table[:, :, 2] = r[None, :, 2] * rows.inner[:, None]
        copy_table(table.reshape(-1, 3), threads=threads)
        return True


def _map(pid: int, fd: int, length: int) -> mmap.mmap:
    f = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(f).st_size < length:
            raise ValueError(f"/proc/{pid}/fd/{fd} is smaller than announced")
        return mmap.mmap(f, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(f)
