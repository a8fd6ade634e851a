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


class AddressSpace:
    """Where memory known by address can be reached from here: our own KV buffers (as they
    are), or a peer's shared buffers (at the address we mapped them)."""

    def __init__(self, regions: Sequence[tuple[int, int, int]]) -> None:
        """``regions``: (their address, length, our address)."""
        table = np.array(sorted(regions), dtype=np.int64).reshape(-1, 3)
        self._start, self._len, self._here = table[:, 0], table[:, 1], table[:, 2]

    @classmethod
    def of_layout(cls, layout: BlockLayout) -> AddressSpace:
        return cls([(addr, n, addr) for addr, n in _buffers(layout).items()])

    def translate(self, iov: np.ndarray) -> np.ndarray | None:
        """``iov``'s addresses as reachable from here; None if an entry is not inside a region."""
        if len(iov) == 0:
            return iov
        i = np.searchsorted(self._start, iov[:, 0], side="right") - 1
        if (i < 0).any():
            return None
        off = iov[:, 0] - self._start[i]
        if (off + iov[:, 1] > self._len[i]).any():
            return None
        out = iov.copy()
        out[:, 0] = self._here[i] + off
        return out


def pieces(dst: np.ndarray, src: np.ndarray) -> np.ndarray:
    """Cut two iovec arrays covering the same bytes at the union of their boundaries:
    ``[n, 3]`` rows of (destination address, source address, length)."""
    d_end, s_end = np.cumsum(dst[:, 1]), np.cumsum(src[:, 1])
    ends = np.union1d(d_end, s_end)
    starts = np.concatenate(([0], ends[:-1]))
    di = np.searchsorted(d_end, starts, side="right")
    si = np.searchsorted(s_end, starts, side="right")
    out = np.empty((len(ends), 3), dtype=np.int64)
    out[:, 0] = dst[di, 0] + starts - (d_end[di] - dst[di, 1])
    out[:, 1] = src[si, 0] + starts - (s_end[si] - src[si, 1])
    out[:, 2] = ends - starts
    return out


def _memcpy_all(table: list[list[int]]) -> None:
    move = ctypes.memmove  # a C call without the GIL, ~0.3 us each
    for dst, src, n in table:
        move(dst, src, n)


def memcpy(dst: np.ndarray, src: np.ndarray, threads: int = 1, split_min: int = SPLIT_MIN) -> None:
    """Copy ``src`` to ``dst`` (iovec arrays of the same total size, both reachable here),
    split over ``threads`` from ``split_min`` bytes on."""
    table = pieces(dst, src)
    total = int(table[:, 2].sum())
    parts = max(1, min(threads, total // max(split_min // 2, 1), len(table)))
    if parts == 1:
        _memcpy_all(table.tolist())
        return
    bounds = np.searchsorted(np.cumsum(table[:, 2]), [total * k // parts for k in range(1, parts)])
    chunks = [c.tolist() for c in np.split(table, bounds + 1) if len(c)]
    run_parts([(_memcpy_all, (c,)) for c in chunks])


class PeerMemory:
    """Decode side: a prefill worker's shared KV buffers and lease board, mapped read-only."""

    def __init__(self, space: AddressSpace, board: np.ndarray, maps: list[mmap.mmap]) -> None:
        self.space, self.board, self._maps = space, board, maps

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
        return cls(AddressSpace(mapped), board, maps)

    def copy(self, local: AddressSpace, local_iov: np.ndarray, remote_iov: np.ndarray,
             threads: int = 1) -> bool:
        """Copy the peer's ``remote_iov`` bytes into our ``local_iov``; False if some bytes lie
        outside the shared buffers (the caller reads those blocks with process_vm_readv)."""
        src, dst = self.space.translate(remote_iov), local.translate(local_iov)
        if src is None or dst is None:
            return False
        memcpy(dst, src, threads=threads)
        return True


def _map(pid: int, fd: int, length: int) -> mmap.mmap:
    f = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(f).st_size < length:
            raise ValueError(f"/proc/{pid}/fd/{fd} is smaller than announced")
        return mmap.mmap(f, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(f)
