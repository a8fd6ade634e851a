"""Connector counters, carried to vLLM's ``/metrics`` through its KV-connector stats hooks.

Workers count per engine step (``PdserveKVStats``); vLLM aggregates the workers' dicts and
hands them to ``PdservePromMetrics.observe`` in the API-server process, which owns the
Prometheus counters. So lease expiries and pull failures show up on the instance's /metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

COUNTERS = {
    "leases_granted": "KV leases granted by this prefill instance",
    "lease_expiries": "KV leases that expired before a decode instance confirmed them",
    "leases_completed": "KV leases ended by a decode instance's confirmation or release",
    "pulls": "KV pulls completed by this decode instance",
    "direct_pulls": "KV pulls copied without a round trip (shm direct read vouched by the lease board)",
    "pull_failures": "KV pulls that failed or timed out",
    "pull_bytes": "bytes of KV pulled by this decode instance",
    "served_bytes": "bytes of KV served by this prefill instance",
    "releases": "leases released without a pull (prefix-cache hit or abort)",
}


@dataclass
class PdserveKVStats(KVConnectorStats):
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in (*COUNTERS, "pull_seconds"):
            self.data.setdefault(key, 0)

    def add(self, key: str, value: float = 1) -> None:
        self.data[key] = self.data.get(key, 0) + value

    def reset(self) -> None:
        self.data = {}
        self.__post_init__()

    def aggregate(self, other: KVConnectorStats) -> "PdserveKVStats":
        for key, value in other.data.items():
            if isinstance(value, (int, float)):
                self.add(key, value)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {k: v for k, v in self.data.items() if isinstance(v, (int, float))}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class PdservePromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[str, dict[int, Any]] = {}
        for key, doc in COUNTERS.items():
            counter = self._counter_cls(name=f"pdserve:kv_{key}", documentation=doc,
                                        labelnames=labelnames)
            self._counters[key] = {idx: counter.labels(*values)
                                   for idx, values in per_engine_labelvalues.items()}
        hist = self._counter_cls(name="pdserve:kv_pull_seconds", labelnames=labelnames,
                                 documentation="seconds spent pulling KV (sum)")
        self._counters["pull_seconds"] = {idx: hist.labels(*values)
                                          for idx, values in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, per_engine in self._counters.items():
            value = transfer_stats_data.get(key, 0)
            if value and engine_idx in per_engine:
                per_engine[engine_idx].inc(value)
