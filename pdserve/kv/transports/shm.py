"""``shm``: same-host transfers through shared memory, no socket copy of the payload.

Fast path (CPU KV caches, Linux, decode worker allowed to read the prefill worker's memory):
one copy. The decode side asks for it (pull hint ``cma``); the prefill side replies with its
pid and the addresses of the leased blocks' bytes in its KV cache (``BlockLayout.regions``),
and the decode side copies them straight into its own blocks with ``process_vm_readv``, split
over as many threads as torch uses for its copies (``torch.get_num_threads()``). No segment, no
gather. The blocks are leased until the decode side confirms; the decode side checks the lease's
end (``expires_at``, same host, same clock) before and after the copy, so a copy that may have
overlapped the blocks being freed fails instead of handing on stale data. If the read is not
permitted (Yama ``ptrace_scope``, other PID namespace / container), the puller asks again
without the hint, and the transport remembers not to ask that peer again.

No round trip at all (after the first direct read from a peer): that reply also carries the
peer's plane addresses and its lease board (``lease_board``). From then on the decode side
computes the blocks' addresses itself and copies at once, checking on the board before and
after the copy that the request's lease holds every block; if not (lease not granted yet,
ended, a block shared with another lease, peer restarted), it pulls the ordinary way, which
also refreshes what it knows of the peer. Only the ``done`` confirmation is sent, without
waiting. When the prefill worker shares its KV cache (``shared_kv``), the copy is a plain memcpy
from a read-only mapping of it instead of ``process_vm_readv``.

Segment path (everything else):

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
import select
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import torch

from pdserve.kv import tuning
from pdserve.kv.layout import BlockLayout
from pdserve.kv.lease_board import TAG_BYTES, tag_of
from pdserve.kv.leases import LeaseTable
from pdserve.kv.transports import cma, shared_kv
from pdserve.kv.transports.base import Outgoing, RetryWithoutHints, Transfer, Transport, size_class
from pdserve.kv.transports.shared_kv import PeerMemory

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


@dataclass
class _Peer:
    """A prefill worker whose KV cache this process may read directly."""

    pid: int
    bases: list[int]  # its plane addresses (same layout fingerprint as ours)
    board: int  # address of its lease board
    memory: PeerMemory | None = None  # its KV buffers and board, mapped here (memcpy path)
    pidfd: int | None = None  # readable once the peer exited: drop the mapping then

    def same_process(self, pid: int, bases: list[int], board: int) -> bool:
        return (pid, bases, board) == (self.pid, self.bases, self.board) and not self.exited()

    def exited(self) -> bool:
        if self.pidfd is None:
            return False
        return bool(select.select([self.pidfd], [], [], 0)[0])

    def holds(self, block_ids: Sequence[int], tag: int) -> bool:
        """Do all ``block_ids`` carry this tag (``tag_of(req_id)``) on the peer's lease board?"""
        if self.memory is not None:  # plain ints: a few ids, where numpy's overhead dominates
            words = self.memory.words
            return all(words[b] == tag for b in block_ids)
        runs: list[tuple[int, int]] = []  # (address, length) per run of consecutive block ids
        prev = None
        for b in block_ids:
            if prev is not None and b == prev + 1:
                runs[-1] = (runs[-1][0], runs[-1][1] + TAG_BYTES)
            else:
                runs.append((self.board + int(b) * TAG_BYTES, TAG_BYTES))
            prev = b
        got = np.zeros(len(block_ids), dtype=np.uint64)
        cma.read(self.pid, [(int(got.ctypes.data), got.nbytes)], runs)
        return bool(np.all(got == np.uint64(tag)))

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self.memory = None  # unmapped once no copy uses it any more


class ShmTransport(Transport):
    name = "shm"

    expiry_margin = 1.0
    """Seconds before the lease's end after which a direct read is no longer started."""

    def __init__(self, max_mapped: int = 8, direct: bool | None = None) -> None:
        if direct is None:
            direct = tuning.switch("PDSERVE_KV_SHM_DIRECT")
        self.direct = direct and cma.available()
        self._no_direct: set[tuple[str, int]] = set()  # peers whose memory we may not read
        self._pool = SegmentPool()
        self._attached: OrderedDict[str, _Mapping] = OrderedDict()  # LRU of decode-side mappings
        self._max_mapped = max_mapped
        self._attach_lock = threading.Lock()
        self._leases: LeaseTable | None = None  # prefill side
        self._peers: dict[tuple[str, int], _Peer] = {}  # decode side: readable without asking
        self._shared: list[list[int]] = []  # prefill side: KV buffers offered for mapping
        self._swept = 0.0

    def attach(self, leases: LeaseTable, host: str, allowed_peers: Sequence[str] = ()) -> None:
        self._leases = leases

    def share(self, layout: BlockLayout) -> None:
        """Prefill side, at KV registration: let same-host decode workers map the KV cache."""
        if self.direct:
            self._shared = shared_kv.share(layout)

    # prefill side
    def send(self, xfer: Transfer, layout: BlockLayout, block_ids: Sequence[int]) -> Outgoing:
        nbytes = layout.nbytes(len(block_ids))
        if nbytes == 0:
            return Outgoing(extra={"shm": "", "nbytes": 0}, frames=[], nbytes=0)
        if xfer.hints.get("cma") and self.direct:
            regions = layout.iov(block_ids)
            if regions is not None:  # the blocks are read in place: nothing to hold
                extra = {"cma": os.getpid(), "iov": regions.ravel().tolist(), "nbytes": nbytes,
                         "expires_at": xfer.expires_at}
                board = self._leases.board if self._leases is not None else None
                if board is not None:  # lets the peer skip the round trip next time
                    extra.update(bases=layout.bases(), board=board.address)
                    if self._shared and board.fd is not None:  # ... and copy with memcpy
                        extra.update(shared=self._shared, board_fd=board.fd,
                                     board_len=int(board.tags.size))
                return Outgoing(extra=extra, frames=[], nbytes=nbytes)
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
    def hints(self, layout: BlockLayout, remote: tuple[str, int]) -> dict[str, Any]:
        if self.direct and remote not in self._no_direct and all(
                p.tensor.device.type == "cpu" for p in layout.planes):
            return {"cma": True}
        return {}

    def _receive_direct(self, xfer, layout, block_ids, extra: dict[str, Any]) -> None:
        nbytes = int(extra["nbytes"])
        pid = int(extra["cma"])
        remote = np.asarray(extra["iov"], dtype=np.int64).reshape(-1, 2)
        local_iov = layout.iov(block_ids)
        if local_iov is None:
            raise RuntimeError("direct shm read offered, but our KV cache has no plain regions")
        if int(remote[:, 1].sum()) != nbytes or int(local_iov[:, 1].sum()) != nbytes:
            raise RuntimeError(f"direct shm read: the reply announced {nbytes} bytes, "
                               f"its regions hold {int(remote[:, 1].sum())}")
        expires_at = extra.get("expires_at")
        if expires_at is not None and time.time() > float(expires_at) - self.expiry_margin:
            raise RuntimeError("the prefill side's lease ends before the copy could finish")
        try:
            cma.read(pid, local_iov, remote, threads=torch.get_num_threads())
        except OSError as exc:
            if exc.errno in cma.NOT_PERMITTED:
                if xfer.remote is not None:
                    self._no_direct.add(xfer.remote)
                raise RetryWithoutHints(f"cannot read the prefill worker's memory ({exc})") from exc
            raise
        if expires_at is not None and time.time() >= float(expires_at):
            # the blocks may have been freed (and reused) while we copied them
            raise RuntimeError("the prefill side's lease ended during the copy")
        bases, board = extra.get("bases"), extra.get("board")
        if (xfer.remote is not None and isinstance(bases, list) and isinstance(board, int)
                and len(bases) == len(layout.planes)):
            self._learn(xfer.remote, pid, [int(b) for b in bases], board, extra)

    def _learn(self, remote: tuple[str, int], pid: int, bases: list[int], board: int,
               extra: dict[str, Any]) -> None:
        """Remember a prefill worker we may read directly (once per process, not per pull)."""
        known = self._peers.get(remote)
        if known is not None and known.same_process(pid, bases, board):
            return
        if known is not None:
            known.close()
        peer = _Peer(pid, bases, board)
        try:
            peer.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pass
        shared, board_fd = extra.get("shared"), extra.get("board_fd")
        if isinstance(shared, list) and isinstance(board_fd, int):
            peer.memory = PeerMemory.open(pid, shared, board_fd, int(extra.get("board_len", 0)))
        self._peers[remote] = peer

    def _drop_exited(self) -> None:
        """Unmap peers that exited (their KV memory lives on while we map it); once a second."""
        now = time.monotonic()
        if now - self._swept < 1.0:
            return
        self._swept = now
        for remote, peer in list(self._peers.items()):
            if peer.exited():
                peer.close()
                self._peers.pop(remote, None)

    def pull_direct(self, xfer, layout, remote_block_ids, block_ids, remote_req_id) -> int | None:
        self._drop_exited()
        peer = self._peers.get(xfer.remote) if xfer.remote is not None else None
        if peer is None or not self.direct or not block_ids:
            return None
        tag = tag_of(remote_req_id)
        try:
            if not peer.holds(remote_block_ids, tag):
                return None  # lease not granted yet (or gone): the pull waits for it / says so
            threads = torch.get_num_threads()
            if peer.memory is None or not peer.memory.copy_blocks(
                    layout, peer.bases, remote_block_ids, block_ids, threads=threads):
                local, remote = layout.iov(block_ids), layout.iov(remote_block_ids, bases=peer.bases)
                if local is None or remote is None:
                    return None
                cma.read(peer.pid, local, remote, threads=threads)
            if not peer.holds(remote_block_ids, tag):
                return None  # the lease ended during the copy: the pull re-copies or refuses
        except OSError:  # the peer is gone or moved: learn it again from the next pull
            self._peers.pop(xfer.remote, None)
            peer.close()
            return None
        return layout.nbytes(len(block_ids))

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
        if "cma" in extra:
            self._receive_direct(xfer, layout, block_ids, extra)
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
