"""``shm``: same-host transfers through POSIX shared memory, no socket copy of the payload.

The prefill side gathers the blocks straight into a shared-memory segment and replies with its
name; the decode side maps it (once per segment, cached) and scatters from it. Segments are
pooled on the prefill side and reused after the decode side confirms, so steady state costs
two memcpys and no page faults.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import torch

from pdserve.kv.layout import BlockLayout
from pdserve.kv.transports.base import Outgoing, Transfer, Transport

_MIN_SEGMENT = 1 << 20


def _attach(name: str) -> shared_memory.SharedMemory:
    """Map an existing segment without letting this process's resource tracker unlink it."""
    seg = shared_memory.SharedMemory(name=name, create=False)
    try:  # Python < 3.13 registers attached segments too; the owner is the prefill side
        resource_tracker.unregister(seg._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:
        pass
    return seg


class SegmentPool:
    """Prefill side: reusable segments, at most ``max_free`` kept idle."""

    def __init__(self, max_free: int = 8) -> None:
        self._free: list[shared_memory.SharedMemory] = []
        self._lock = threading.Lock()
        self._max_free = max_free
        self._all: dict[str, shared_memory.SharedMemory] = {}

    def take(self, nbytes: int) -> shared_memory.SharedMemory:
        with self._lock:
            fits = [s for s in self._free if s.size >= nbytes]
            if fits:
                seg = min(fits, key=lambda s: s.size)
                self._free.remove(seg)
                return seg
        size = max(_MIN_SEGMENT, 1 << (max(nbytes, 1) - 1).bit_length())  # power of two
        seg = shared_memory.SharedMemory(create=True, size=size)
        with self._lock:
            self._all[seg.name] = seg
        return seg

    def give_back(self, seg: shared_memory.SharedMemory) -> None:
        with self._lock:
            self._free.append(seg)
            if len(self._free) <= self._max_free:
                return
            victim = min(self._free, key=lambda s: s.size)
            self._free.remove(victim)
            self._all.pop(victim.name, None)
        victim.close()
        victim.unlink()

    def close(self) -> None:
        with self._lock:
            segs, self._all, self._free = list(self._all.values()), {}, []
        for seg in segs:
            try:
                seg.close()
                seg.unlink()
            except (FileNotFoundError, BufferError):
                pass


class ShmTransport(Transport):
    name = "shm"

    def __init__(self) -> None:
        self._pool = SegmentPool()
        self._attached: dict[str, shared_memory.SharedMemory] = {}
        self._attach_lock = threading.Lock()

    # prefill side
    def send(self, xfer: Transfer, layout: BlockLayout, block_ids: Sequence[int]) -> Outgoing:
        nbytes = layout.nbytes(len(block_ids))
        seg = self._pool.take(nbytes)
        target = torch.frombuffer(seg.buf, dtype=torch.uint8, count=nbytes) if nbytes else None
        if target is not None:
            if layout.device.type == "cpu":
                layout.gather_into(block_ids, target)
            else:
                target.copy_(layout.gather(block_ids).cpu())
        xfer.handle = seg
        return Outgoing(extra={"shm": seg.name, "nbytes": nbytes}, frames=[], nbytes=nbytes)

    def finish(self, xfer: Transfer) -> None:
        seg, xfer.handle = xfer.handle, None
        if seg is not None:
            self._pool.give_back(seg)

    # decode side
    def _segment(self, name: str) -> shared_memory.SharedMemory:
        with self._attach_lock:
            seg = self._attached.get(name)
            if seg is None:
                seg = self._attached[name] = _attach(name)
            return seg

    def receive(self, xfer, layout, block_ids, extra: dict[str, Any], frames) -> None:
        nbytes = int(extra["nbytes"])
        if nbytes == 0:
            return
        try:
            seg = self._segment(str(extra["shm"]))
        except FileNotFoundError as exc:
            raise RuntimeError(
                f"shared memory segment {extra['shm']} not found: is the prefill instance on "
                "another host? set transport to 'tcp'"
            ) from exc
        if seg.size < nbytes:  # a reused name with a larger size cannot happen; be safe
            with self._attach_lock:
                self._attached.pop(seg.name, None)
            seg = self._segment(str(extra["shm"]))
        layout.scatter_from(block_ids, torch.frombuffer(seg.buf, dtype=torch.uint8, count=nbytes))

    def close(self) -> None:
        self._pool.close()
        with self._attach_lock:
            segs, self._attached = list(self._attached.values()), {}
        for seg in segs:
            try:
                seg.close()
            except BufferError:
                pass
