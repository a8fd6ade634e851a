"""Connector settings, read from ``kv_transfer_config.kv_connector_extra_config``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TransportName = Literal["auto", "tcp", "shm", "torch_dist"]


class ConnectorSettings(BaseModel):
    """Everything the connector can be told; defaults suit one host with a few instances."""

    model_config = ConfigDict(extra="ignore")

    transport: TransportName = "auto"
    """``auto`` picks ``shm`` when the prefill instance is on this host, else ``tcp``."""
    side_channel_host: str | None = None
    """Address the prefill workers listen on (default: ``kv_ip`` of the kv_transfer_config)."""
    side_channel_port: int | None = None
    """Base port; TP rank r listens on base + r (default: ``kv_port``)."""
    lease_seconds: float = Field(30.0, gt=0, allow_inf_nan=False)
    """Prefill-side blocks are freed after this long if no decode instance confirmed them."""
    load_timeout_seconds: float = Field(30.0, gt=0, allow_inf_nan=False)
    """A decode-side pull that takes longer fails (or recomputes, per kv_load_failure_policy)."""
    lease_wait_seconds: float = Field(10.0, gt=0, allow_inf_nan=False)
    """How long the prefill side waits for a lease to be registered before refusing a pull."""
    allowed_peers: list[str] = Field(default_factory=list)
    """IP addresses allowed on the side channel (empty: any). Set from the global ranktable."""
    pull_threads: int = Field(4, ge=1, le=64)
    torch_dist_port_offset: int = Field(100, ge=1)
    """torch_dist rendezvous (TCPStore) listens on side-channel port + this offset."""

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> "ConnectorSettings":
        return cls.model_validate(extra or {})
