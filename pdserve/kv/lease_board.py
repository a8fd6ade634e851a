"""Prefill side: a per-block "which lease holds this block" table a same-host decode worker reads.

The ``shm`` transport's fastest path copies KV blocks straight out of the prefill worker's
memory (``process_vm_readv``) without asking first, which saves the pull round trip (about as
long as copying a short prompt's KV). That is safe only while a lease holds the blocks, so the
prefill worker publishes one tag per block: ``tag_of(request id)`` while that request's lease
holds it, 0 otherwise. The decode side reads the tags of its blocks before and after the copy.
Its request's tag both times means the lease held the blocks throughout: a lease is never
granted twice for one request, and its tags are cleared before its blocks are reported free.
Anything else (lease not granted yet, ended, or a block shared with another lease) sends the
decode side down the ordinary pull, which waits for or refuses the lease as usual.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

import numpy as np

TAG_BYTES = 8


def tag_of(req_id: str) -> int:
    """A request's 64-bit tag; never 0 (0 means "no lease")."""
    digest = hashlib.blake2b(req_id.encode(), digest_size=TAG_BYTES).digest()
    return int.from_bytes(digest, "little") | 1


class LeaseBoard:
    """The tags, one uint64 per block, at a fixed address for the life of the process."""

    def __init__(self, num_blocks: int, shared: bool = False) -> None:
        self.fd: int | None = None
        """With ``shared``, the memfd holding the tags (same-host decode workers map it)."""
        made = None
        if shared:
            from pdserve.kv.transports.shared_kv import shared_array

            made = shared_array(max(num_blocks, 1), np.uint64)
        if made is not None:
            self.tags, self.fd = made
        else:
            self.tags = np.zeros(max(num_blocks, 1), dtype=np.uint64)
        self._lock = threading.Lock()

    @property
    def address(self) -> int:
        return int(self.tags.ctypes.data)

    def _ids(self, block_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(block_ids, dtype=np.int64)
        return ids[(ids >= 0) & (ids < self.tags.size)]

    def post(self, req_id: str, block_ids: Sequence[int]) -> None:
        """The lease of ``req_id`` holds these blocks (a shared block takes the newest tag)."""
        with self._lock:
            self.tags[self._ids(block_ids)] = tag_of(req_id)

    def clear(self, req_id: str, block_ids: Sequence[int]) -> None:
        """The lease ended: untag its blocks (those another lease re-tagged keep that tag)."""
        ids = self._ids(block_ids)
        with self._lock:
            mine = ids[self.tags[ids] == np.uint64(tag_of(req_id))]
            self.tags[mine] = 0

    def reset(self) -> None:
        with self._lock:
            self.tags[:] = 0
