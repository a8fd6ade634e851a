"""Leases must exist before the prefill engine's next forward pass, not after it.

vLLM 0.32 calls ``start_load_kv`` after the forward for steps whose loads are all async; a lease
registered there appears one prefill step late and decode pulls wait for it (seconds under
load). This drives vLLM's own step wrapper and checks the lease is served before the forward.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pdserve.kv.connector import PdserveConnector
from pdserve.kv.leases import LeaseTable
from pdserve.kv.metadata import LeaseSpec, PdserveMetadata

pytestmark = pytest.mark.unit


class _RecordingWorker:
    """Stands in for WorkerSide: records when leases arrive, reports nothing finished."""

    def __init__(self) -> None:
        self.leases = LeaseTable()

    def start_load_kv(self, meta: PdserveMetadata) -> None:
        for lease in meta.leases:
            self.leases.add(lease.req_id, lease.block_ids, lease.expires_at)

    def get_transfer_results(self):
        return set(), set(), set()

    def take_stats(self):
        return None


def _connector() -> tuple[PdserveConnector, _RecordingWorker]:
    conn = PdserveConnector.__new__(PdserveConnector)  # skip vLLM config plumbing
    worker = _RecordingWorker()
    conn._worker, conn._scheduler, conn._connector_metadata = worker, None, None
    return conn, worker


def test_lease_is_registered_before_the_forward_pass(monkeypatch) -> None:
    from vllm.v1.worker import kv_connector_model_runner_mixin as mixin

    conn, worker = _connector()
    monkeypatch.setattr(mixin, "get_kv_transfer_group", lambda: conn)
    monkeypatch.setattr(mixin, "get_forward_context", lambda: None)
    meta = PdserveMetadata(leases=[LeaseSpec("req-1", [4, 5], expires_at=1e12)])
    step = SimpleNamespace(kv_connector_metadata=meta, has_sync_kv_loads=False,
                           finished_req_ids=set())
    with mixin.KVConnectorModelRunnerMixin._get_kv_connector_output(step):
        # this is where the forward pass runs; the decode side may already be pulling
        assert worker.leases.get("req-1") is not None
    assert conn._connector_metadata is None  # vLLM cleared it after the step


def test_start_load_kv_does_not_register_twice() -> None:
    conn, worker = _connector()
    meta = PdserveMetadata(leases=[LeaseSpec("req-1", [4], expires_at=1e12)])
    conn.bind_connector_metadata(meta)
    conn.start_load_kv(None)
    assert len(worker.leases) == 1
