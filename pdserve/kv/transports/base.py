"""The transport interface: the prefill side *sends* a block set, the decode side *receives* it.

A pull is one :class:`Transfer` with an explicit state. The side channel (ZMQ) always carries
the control messages; a transport decides where the payload goes (reply frames, a shared-memory
segment, a torch.distributed pair group).
"""

from __future__ import annotations

import enum
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pdserve.kv.layout import BlockLayout
from pdserve.kv.leases import LeaseTable


class TransferState(enum.Enum):
    PENDING = "pending"
    SENDING = "sending"  # prefill: payload handed to the transport
    RECEIVING = "receiving"  # decode: waiting for / copying the payload
    DONE = "done"
    FAILED = "failed"


@dataclass
class Transfer:
    xfer_id: str
    req_id: str
    n_blocks: int
    peer: str = ""
    state: TransferState = TransferState.PENDING
    nbytes: int = 0
    error: str = ""
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    handle: Any = None  # transport-private resources held until finish()
    hints: dict[str, Any] = field(default_factory=dict)  # the pull request's hints (both sides)
    expires_at: float | None = None  # prefill: the lease's end (time.time() based)
    remote: tuple[str, int] | None = None  # decode: the side-channel address pulled from
    direct: bool = False  # decode: copied without a round trip (Transport.pull_direct)
    deadline: float | None = None  # decode: time.monotonic() by which the whole pull must be over

    def mark(self, state: TransferState, error: str = "") -> None:
        self.state = state
        if error:
            self.error = error
        if state in (TransferState.DONE, TransferState.FAILED):
            self.finished = time.monotonic()


@dataclass
class Outgoing:
    """What the prefill side puts in its reply: header extras and payload frames."""

    extra: dict[str, Any]
    frames: list[Any]
    nbytes: int
    tracker: Any = None
    """Set when ``frames`` point into the KV cache itself (zero-copy): the blocks must stay
    allocated until ``tracker.done`` (ZMQ released the frames), even if the lease ends first."""


class RetryWithoutHints(RuntimeError):
    """Decode side: the reply cannot be used as offered (e.g. the peer's memory is not
    readable from here); pull once more without hints."""


class Transport(ABC):
    name: str = ""

    def hints(self, layout: BlockLayout, remote: tuple[str, int]) -> dict[str, Any]:
        """Decode side: hints for the prefill side, sent with the pull request."""
        return {}

    def attach(self, leases: LeaseTable, host: str, allowed_peers: Sequence[str] = ()) -> None:
        """Prefill side: a side channel on ``host`` serving these leases uses this transport."""

    def pull_direct(self, xfer: Transfer, layout: BlockLayout, remote_block_ids: Sequence[int],
                    block_ids: Sequence[int], remote_req_id: str) -> int | None:
        """Decode side: copy the blocks without the pull round trip, if this transport can do
        that safely right now. The bytes copied, or None to pull the ordinary way."""
        return None

    @abstractmethod
    def send(self, xfer: Transfer, layout: BlockLayout, block_ids: Sequence[int]) -> Outgoing:
        """Prefill side: make the blocks available to the puller (gather them)."""

    def after_reply(self, xfer: Transfer) -> None:
        """Prefill side: the reply went out (torch_dist starts its send here)."""

    def finish(self, xfer: Transfer) -> None:
        """Prefill side: the puller confirmed (or the lease ended): drop held resources."""

    def payload_fd(self, xfer: Transfer) -> int | None:
        """Decode side: a file descriptor that turns readable when the payload arrives ahead of
        the reply (``receive`` is then called with ``extra={"early": True}`` and no frames; the
        reply follows and is dropped as stale)."""
        return None

    def payload_ready(self, xfer: Transfer) -> bool:
        """Decode side: ``payload_fd`` turned readable; False if that is not a payload (the
        stream closed: the puller goes on waiting for the reply)."""
        return True

    def before_reply(self, xfer: Transfer, layout: BlockLayout, store_addr: tuple[str, int]) -> None:
        """Decode side: the pull went out; prepare to receive (torch_dist pairs up here)."""

    @abstractmethod
    def receive(
        self,
        xfer: Transfer,
        layout: BlockLayout,
        block_ids: Sequence[int],
        extra: dict[str, Any],
        frames: Sequence[Any],
    ) -> None:
        """Decode side: copy the payload into our blocks ``block_ids``."""

    def close(self) -> None:
        """Release everything (process shutdown)."""


def size_class(nbytes: int, minimum: int = 1 << 20) -> int:
    """Pooled buffers come in powers of two (at least ``minimum``), so sizes get reused."""
    return max(minimum, 1 << (max(nbytes, 1) - 1).bit_length())


class BufferPool:
    """Reusable host staging buffers (flat uint8 tensors).

    A fresh multi-megabyte buffer costs a page fault per 4 KiB on first touch (glibc maps
    allocations above 32 MiB afresh every time), which measured slower than the copy itself.
    At most ``max_idle_bytes`` are kept idle; the largest idle buffers are dropped first.
    """

    def __init__(self, max_idle_bytes: int = 1 << 30) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.max_idle_bytes = max_idle_bytes

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            for i, buf in enumerate(self._free):  # sorted by size: the first fit is the smallest
                if buf.numel() >= nbytes:
                    return self._free.pop(i)
        return torch.empty(size_class(nbytes), dtype=torch.uint8)

    def give_back(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)
            self._free.sort(key=lambda b: b.numel())
            while self._free and sum(b.numel() for b in self._free) > self.max_idle_bytes:
                self._free.pop()

    def clear(self) -> None:
        with self._lock:
            self._free = []
