"""KV transports behind one small interface (see ``base.Transport``).

``tcp``: payload on a plain TCP stream, kernel to KV cache on both sides (ZMQ reply frames as
the fallback); works across hosts.
``shm``: same host only: one memcpy from the prefill KV cache, mapped read-only (or read with
``process_vm_readv``, or through a shared-memory segment).
``torch_dist``: payload over a torch.distributed pair group (gloo on CPU, nccl/hccl on
accelerators); the ZMQ reply only carries the tag.
"""

from __future__ import annotations

from pdserve.kv.transports.base import Transfer, TransferState, Transport
from pdserve.kv.transports.shm import ShmTransport
from pdserve.kv.transports.tcp import TcpTransport
from pdserve.kv.transports.torch_dist import TorchDistTransport

__all__ = ["Transfer", "TransferState", "Transport", "make_transports", "choose_transport"]


def make_transports(**kwargs) -> dict[str, Transport]:
    """One instance of each transport, keyed by name."""
    return {
        "tcp": TcpTransport(),
        "shm": ShmTransport(),
        "torch_dist": TorchDistTransport(**kwargs),
    }


def choose_transport(configured: str, same_host: bool) -> str:
    if configured != "auto":
        return configured
    return "shm" if same_host else "tcp"
