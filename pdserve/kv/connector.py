"""``PdserveConnector``: the class vLLM loads (``kv_connector_module_path = pdserve.kv.connector``).

A thin adapter: vLLM builds one instance in the engine-core process (role SCHEDULER) and one
per worker (role WORKER); each delegates to :class:`SchedulerSide` or :class:`WorkerSide`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)

from pdserve.kv import shared_cores
from pdserve.kv.config import ConnectorSettings
from pdserve.kv.metadata import PdserveMetadata
from pdserve.kv.scheduler_side import SchedulerSide
from pdserve.kv.stats import PdserveKVStats, PdservePromMetrics
from pdserve.kv.worker_side import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("pdserve.kv")


def _share_vllm_logging() -> None:
    """Inside vLLM processes, send pdserve's log lines where vLLM's go (same format/level)."""
    ours, theirs = logging.getLogger("pdserve"), logging.getLogger("vllm")
    if not ours.handlers and theirs.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(theirs.level or logging.INFO)
        ours.propagate = False


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except Exception:  # not initialised (unit tests)
        return 0


class PdserveConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _share_vllm_logging()
        cfg = self._kv_transfer_config
        settings = ConnectorSettings.from_extra(cfg.kv_connector_extra_config)
        host = settings.side_channel_host or getattr(cfg, "kv_ip", None) or "127.0.0.1"
        port = settings.side_channel_port or cfg.kv_port
        engine_id = str(cfg.engine_id)
        is_producer = bool(cfg.is_kv_producer)
        if cfg.is_kv_producer and cfg.is_kv_consumer:
            raise ValueError("PdserveConnector: kv_role must be kv_producer or kv_consumer, "
                             "not kv_both")
        groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
        if len(groups) > 1:
            raise ValueError(f"PdserveConnector supports models with one KV cache group; this "
                             f"model has {len(groups)} (hybrid attention). Start vLLM with "
                             f"--disable-hybrid-kv-cache-manager (pdserve serve adds it unless told "
                             f"otherwise); models that need it (Mamba/SSM hybrids) are not supported")
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        shared_cores.apply()  # before the first step: engine and workers wait, not spin
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(
                settings, is_producer=is_producer, engine_id=engine_id, host=host, port=port,
                tp_size=vllm_config.parallel_config.tensor_parallel_size,
                block_size=vllm_config.cache_config.block_size)
        else:
            self._worker = WorkerSide(settings, is_producer=is_producer, engine_id=engine_id,
                                      host=host, port=port, tp_rank=_tp_rank(),
                                      num_blocks=getattr(kv_cache_config, "num_blocks", None))

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Act on the step's metadata as soon as vLLM hands it over, before the forward pass.

        vLLM calls ``start_load_kv`` *after* the forward for steps with only async loads, so
        leases registered there would appear one (possibly multi-second) prefill step late and
        decode pulls would wait for it. Binding happens before the forward on every step.
        """
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None and isinstance(connector_metadata, PdserveMetadata):
            self._worker.start_load_kv(connector_metadata)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        return  # done in bind_connector_metadata, which precedes the forward pass

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous and complete before the request is scheduled

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return  # pull model: nothing is pushed

    def wait_for_save(self) -> None:
        return

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self._worker is not None
        sending, recving, failed = self._worker.get_transfer_results()
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving,
                                          failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        res = self.get_transfer_results(finished_req_ids)
        return res.finished_sending or None, res.finished_recving or None

    def get_kv_connector_stats(self) -> PdserveKVStats | None:
        return self._worker.take_stats() if self._worker is not None else None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()

    # ------------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self._scheduler is not None
        return self._scheduler.build_connector_meta()

    def update_connector_output(self, connector_output: Any) -> None:
        assert self._scheduler is not None
        self._scheduler.update_connector_output(getattr(connector_output, "finished_recving", None))

    def request_finished(self, request: "Request", block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        if isinstance(block_ids, tuple):  # one list per KV cache group
            block_ids = block_ids[0] if block_ids else []
        return self._scheduler.request_finished(request, list(block_ids))

    def request_finished_all_groups(self, request: "Request", block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, block_ids)

    # ------------------------------------------------------------------ stats
    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> PdserveKVStats:
        return PdserveKVStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return PdservePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
