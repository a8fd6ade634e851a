"""The transport interface: the prefill side *sends* a block set, the decode side *receives* it.

A pull is one :class:`Transfer` with an explicit state. The side channel (ZMQ) always carries
the control messages; a transport decides where the payload goes (reply frames, a shared-memory
segment, a torch.distributed pair group).
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pdserve.kv.layout import BlockLayout


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


class Transport(ABC):
    name: str = ""

    @abstractmethod
    def send(self, xfer: Transfer, layout: BlockLayout, block_ids: Sequence[int]) -> Outgoing:
        """Prefill side: make the blocks available to the puller (gather them)."""

    def after_reply(self, xfer: Transfer) -> None:
        """Prefill side: the reply went out (torch_dist starts its send here)."""

    def finish(self, xfer: Transfer) -> None:
        """Prefill side: the puller confirmed (or the lease ended): drop held resources."""

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
