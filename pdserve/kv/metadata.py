"""What the scheduler half tells the worker half each engine step (pickled by vLLM)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from pdserve.kv.puller import PullTask


@dataclass
class LeaseSpec:
    """Prefill: keep serving these blocks of ``req_id`` until confirmed or ``expires_at``."""

    req_id: str
    block_ids: list[int]
    expires_at: float


@dataclass
class LoadSpec:
    """Decode: pull these blocks; ``error`` set means fail the load at once with that message."""

    task: PullTask
    error: str = ""


@dataclass
class ReleaseSpec:
    """Decode: we will not pull this request's blocks; let the prefill side free them now."""

    remote_host: str
    remote_port: int
    remote_req_id: str
    reason: str


@dataclass
class PdserveMetadata(KVConnectorMetadata):
    leases: list[LeaseSpec] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)
    releases: list[ReleaseSpec] = field(default_factory=list)
