"""Cross-memory attach: read another process's memory with ``process_vm_readv`` (Linux).

One kernel copy straight from the peer's buffers into ours, scatter/gather on both sides (the
two iovec lists may be cut at different places). The ``shm`` transport uses it to copy KV blocks
from the prefill worker's cache into the decode worker's without a staging segment. It needs
ptrace access to the peer (same user; with Yama ``ptrace_scope`` >= 1, or across PID namespaces,
it fails with EPERM/ESRCH and the caller falls back to a shared-memory segment).
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pdserve.kv import tuning

IOV_MAX = 1024
SPLIT_MIN = tuning.size("PDSERVE_KV_CMA_SPLIT_MIN")
"""Bytes from which a read is split over several threads (a thread hand-off costs ~0.1 ms)."""
NOT_PERMITTED = {errno.EPERM, errno.ESRCH, errno.ENOSYS, errno.EACCES}


def _load():
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # a CDLL call releases the GIL
        fn = libc.process_vm_readv
    except (OSError, AttributeError):
        return None
    # the iovec arrays are passed as int64 [n, 2] numpy arrays: struct iovec {void *; size_t}
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong,
                   ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_ssize_t
    return fn


_readv = _load()
Iov = Sequence[tuple[int, int]]  # (address, length)


def available() -> bool:
    return _readv is not None


def _array(iov: Iov | np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(iov, dtype=np.int64).reshape(-1, 2))


def _cut(iov: np.ndarray, start: int, end: int) -> np.ndarray:
    """The bytes [start, end) of the concatenation of ``iov``, as an iovec array."""
    ends = np.cumsum(iov[:, 1])
    first = int(np.searchsorted(ends, start, side="right"))
    last = int(np.searchsorted(ends, end, side="left"))  # the entry holding byte end-1
    out = iov[first : last + 1].copy()
    if out.size == 0:
        return out
    skip = start - (int(ends[first]) - int(iov[first, 1]))
    out[0, 0] += skip
    out[0, 1] -= skip
    out[-1, 1] -= int(ends[min(last, len(ends) - 1)]) - end
    return out[out[:, 1] > 0]


def _read_part(pid: int, local: np.ndarray, remote: np.ndarray) -> None:
    """Copy, IOV_MAX entries at a time (the kernel's limit per call)."""
    total = int(local[:, 1].sum())
    done = 0
    while done < total:
        if done == 0 and len(local) <= IOV_MAX and len(remote) <= IOV_MAX:
            loc, rem = local, remote  # the usual case: one call
        else:  # a window of <= IOV_MAX entries on both sides
            loc = _cut(local, done, total)[:IOV_MAX]
            span = int(loc[:, 1].sum())
            rem = _cut(remote, done, done + span)[:IOV_MAX]
            loc = _cut(loc, 0, min(span, int(rem[:, 1].sum())))
        got = _readv(pid, loc.ctypes.data, len(loc), rem.ctypes.data, len(rem), 0)
        if got < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"process_vm_readv from pid {pid}: {os.strerror(err)}")
        if got == 0:
            raise OSError(errno.EFAULT, f"process_vm_readv from pid {pid} read nothing")
        done += got  # a partial read (page boundary of an unmapped area) continues


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:  # type: ignore[attr-defined]
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="pdserve-kv-cma")
        return _pool


def read(pid: int, local: Iov | np.ndarray, remote: Iov | np.ndarray, threads: int = 1,
         split_min: int = SPLIT_MIN) -> int:
    """Copy ``remote`` (in process ``pid``) into ``local``; both cover the same byte count.

    With ``threads`` > 1 and at least ``split_min`` bytes, the bytes are cut into that many
    equal parts copied in parallel (the caller's thread does one).
    """
    if _readv is None:
        raise OSError(errno.ENOSYS, "process_vm_readv is not available")
    local, remote = _array(local), _array(remote)
    total = int(local[:, 1].sum())
    if total != int(remote[:, 1].sum()):
        raise ValueError(f"local ({total} bytes) and remote iovecs differ in size")
    parts = max(1, min(threads, total // max(split_min // 2, 1)))
    if parts == 1:
        _read_part(pid, local, remote)
        return total
    bounds = [total * i // parts for i in range(parts + 1)]
    run_parts([(_read_part, (pid, _cut(local, a, b), _cut(remote, a, b)))
               for a, b in zip(bounds, bounds[1:])])
    return total


def run_parts(jobs: list[tuple]) -> None:
    """Run ``(fn, args)`` jobs in parallel: the caller's thread does the first. Waits for all
    (they write into the caller's buffers) and re-raises the first error."""
    futures = [_executor(len(jobs) - 1).submit(fn, *args) for fn, args in jobs[1:]]
    error: BaseException | None = None
    try:
        fn, args = jobs[0]
        fn(*args)
    except BaseException as exc:
        error = exc
    for f in futures:
        try:
            f.result()
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error
