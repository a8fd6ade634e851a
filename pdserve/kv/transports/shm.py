"""``shm``: same-host transfers through POSIX shared memory, no socket copy of the payload.

The prefill side gathers the blocks straight into a shared-memory segment and replies with its
name; the decode side maps it (once per segment, cached, pre-faulted) and scatters from it.
Segments are pooled on the prefill side and reused after the decode side confirms, so steady
state costs two memcpys and no page faults. Segment space is reserved up front
(``posix_fallocate``): a too-small /dev/shm (Docker's default is 64 MB) fails the pull with a
clear error instead of killing the worker with SIGBUS.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from multiprocessing import shared_memory
from typing import Any

import torch

from pdserve.kv.layout import BlockLayout
from pdserve.kv.transports.base import Outgoing, Transfer, Transport, size_class

_SHM_DIR = "/dev/shm"


def _create(nbytes: int) -> shared_memory.SharedMemory:
    """A new segment with its memory reserved (the resource tracker unlinks it if we crash)."""
    seg = shared_memory.SharedMemory(create=True, size=size_class(nbytes))
    fd = getattr(seg, "_fd", -1)
    if fd >= 0 and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, seg.size)
        except OSError as exc:
            seg.close()
            seg.unlink()
            raise RuntimeError(
                f"cannot reserve {seg.size >> 20} MiB of shared memory ({exc}): /dev/shm is too "
                "small for this transfer; enlarge it (docker run --shm-size) or use transport "
                "'tcp'") from exc
    return seg


class _Mapping:
    """Decode side: a read mapping of a prefill segment, without the resource tracker.

    (Attaching through ``SharedMemory`` would register the segment with this process's resource
    tracker, which then unlinks it, or complains, although the prefill side owns it.)
    """

    def __init__(self, name: str) -> None:
        path = os.path.join(_SHM_DIR, name.lstrip("/"))
        if os.path.isdir(_SHM_DIR):
            fd = os.open(path, os.O_RDWR)
            try:
                size = os.fstat(fd).st_size
                flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # no page faults later
                self.buf: Any = mmap.mmap(fd, size, flags=flags)
            finally:
                os.close(fd)
            self.size = size
        else:  # no /dev/shm (not Linux): go through the portable API
            seg = shared_memory.SharedMemory(name=name, create=False)
            try:
                from multiprocessing import resource_tracker

                resource_tracker.unregister(seg._name, "shared_memory")  # type: ignore[attr-defined]
            except Exception:
                pass
            self.buf, self.size, self._seg = seg.buf, seg.size, seg


class SegmentPool:
    """Prefill side: reusable segments; at most ``max_free`` / ``max_idle_bytes`` kept idle."""

    def __init__(self, max_free: int = 8, max_idle_bytes: int = 1 << 30) -> None:
        self._free: list[shared_memory.SharedMemory] = []
        self._lock = threading.Lock()
        self._max_free = max_free
        self._max_idle_bytes = max_idle_bytes
        self._all: dict[str, shared_memory.SharedMemory] = {}

    def take(self, nbytes: int) -> shared_memory.SharedMemory:
        with self._lock:
            fits = [s for s in self._free if s.size >= nbytes]
            if fits:
                seg = min(fits, key=lambda s: s.size)
                self._free.remove(seg)
                return seg
        seg = _create(nbytes)
        with self._lock:
            self._all[seg.name] = seg
        return seg

    def give_back(self, seg: shared_memory.SharedMemory) -> None:
        victims = []
        with self._lock:
            self._free.append(seg)
            self._free.sort(key=lambda s: s.size)
            while self._free and (len(self._free) > self._max_free
                                  or sum(s.size for s in self._free) > self._max_idle_bytes):
                victim = self._free.pop()  # the largest idle one
                self._all.pop(victim.name, None)
                victims.append(victim)
        for victim in victims:
            _destroy(victim)

    def names(self) -> set[str]:
        with self._lock:
            return set(self._all)

    def close(self) -> None:
        with self._lock:
            segs, self._all, self._free = list(self._all.values()), {}, []
        for seg in segs:
            _destroy(seg)


def _destroy(seg: shared_memory.SharedMemory) -> None:
    try:
        seg.unlink()
    except FileNotFoundError:
        pass
    try:
        seg.close()
    except BufferError:  # still exported somewhere; unmapped when that view dies
        pass


class ShmTransport(Transport):
    name = "shm"

    def __init__(self, max_mapped: int = 8) -> None:
        self._pool = SegmentPool()
        self._attached: OrderedDict[str, _Mapping] = OrderedDict()  # LRU of decode-side mappings
        self._max_mapped = max_mapped
        self._attach_lock = threading.Lock()

    # prefill side
    def send(self, xfer: Transfer, layout: BlockLayout, block_ids: Sequence[int]) -> Outgoing:
        nbytes = layout.nbytes(len(block_ids))
        if nbytes == 0:
            return Outgoing(extra={"shm": "", "nbytes": 0}, frames=[], nbytes=0)
        seg = self._pool.take(nbytes)
        try:
            layout.gather_into(block_ids, torch.frombuffer(seg.buf, dtype=torch.uint8, count=nbytes))
        except BaseException:
            self._pool.give_back(seg)
            raise
        xfer.handle = seg
        return Outgoing(extra={"shm": seg.name, "nbytes": nbytes}, frames=[], nbytes=nbytes)

    def finish(self, xfer: Transfer) -> None:
        seg, xfer.handle = xfer.handle, None
        if seg is not None:
            self._pool.give_back(seg)

    # decode side
    def _segment(self, name: str) -> _Mapping:
        with self._attach_lock:
            seg = self._attached.get(name)
            if seg is not None:
                self._attached.move_to_end(name)
                return seg
        seg = _Mapping(name)  # outside the lock: MAP_POPULATE of a big segment takes a while
        with self._attach_lock:
            self._attached[name] = seg
            while len(self._attached) > self._max_mapped:
                # dropping the reference unmaps it once no pull is reading from it any more
                self._attached.popitem(last=False)
        return seg

    def receive(self, xfer, layout, block_ids, extra: dict[str, Any], frames) -> None:
        nbytes = int(extra["nbytes"])
        if nbytes == 0:
            return
        name = str(extra["shm"])
        try:
            seg = self._segment(name)
        except FileNotFoundError as exc:
            raise RuntimeError(
                f"shared memory segment {name} not found: is the prefill instance on "
                "another host? set transport to 'tcp'"
            ) from exc
        if seg.size < nbytes:  # cannot happen (names are unique); be safe
            raise RuntimeError(f"shared memory segment {name} holds {seg.size} bytes, "
                               f"the reply announced {nbytes}")
        layout.scatter_from(block_ids, torch.frombuffer(seg.buf, dtype=torch.uint8, count=nbytes))

    def close(self) -> None:
        self._pool.close()
        with self._attach_lock:
            self._attached.clear()
