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
from concurrent.futures import ThreadPoolExecutor

IOV_MAX = 1024
NOT_PERMITTED = {errno.EPERM, errno.ESRCH, errno.ENOSYS, errno.EACCES}


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _load():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.process_vm_readv
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                   ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_ssize_t
    return fn


_readv = _load()
Iov = list[tuple[int, int]]  # (address, length)


def available() -> bool:
    return _readv is not None


def _cut(iov: Iov, start: int, end: int) -> Iov:
    """The bytes [start, end) of the concatenation of ``iov``, as an iovec list."""
    out: Iov = []
    pos = 0
    for addr, n in iov:
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            out.append((addr + lo - pos, hi - lo))
        pos += n
        if pos >= end:
            break
    return out


def _read_part(pid: int, local: Iov, remote: Iov) -> None:
    """Copy, IOV_MAX entries at a time (the kernel's limit per call)."""
    total = sum(n for _, n in local)
    done = 0
    while done < total:
        # a window of <= IOV_MAX entries on both sides
        loc = _cut(local, done, total)[:IOV_MAX]
        span = sum(n for _, n in loc)
        rem = _cut(remote, done, done + span)[:IOV_MAX]
        span = min(span, sum(n for _, n in rem))
        loc = _cut(loc, 0, span)
        lv = (_Iovec * len(loc))(*loc)
        rv = (_Iovec * len(rem))(*rem)
        got = _readv(pid, lv, len(loc), rv, len(rem), 0)
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


def read(pid: int, local: Iov, remote: Iov, threads: int = 1, split_min: int = 8 << 20) -> int:
    """Copy ``remote`` (in process ``pid``) into ``local``; both cover the same byte count.

    With ``threads`` > 1 and at least ``split_min`` bytes, the bytes are cut into that many
    equal parts copied in parallel (the caller's thread does one).
    """
    if _readv is None:
        raise OSError(errno.ENOSYS, "process_vm_readv is not available")
    total = sum(n for _, n in local)
    if total != sum(n for _, n in remote):
        raise ValueError(f"local ({total} bytes) and remote iovecs differ in size")
    parts = max(1, min(threads, total // max(split_min // 2, 1)))
    if parts == 1:
        _read_part(pid, local, remote)
        return total
    bounds = [total * i // parts for i in range(parts + 1)]
    jobs = [(_cut(local, a, b), _cut(remote, a, b)) for a, b in zip(bounds, bounds[1:])]
    futures = [_executor(parts - 1).submit(_read_part, pid, lo, re) for lo, re in jobs[1:]]
    error: BaseException | None = None
    try:
        _read_part(pid, *jobs[0])
    except BaseException as exc:  # still wait for the others: they write into our buffers
        error = exc
    for f in futures:
        try:
            f.result()
        except BaseException as exc:
            error = error or exc
    if error is not None:
        raise error
    return total

