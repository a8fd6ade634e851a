"""Scheduler half of the connector (runs in vLLM's engine-core process).

Producer (prefill): a finished request that asked for ``do_remote_decode`` keeps its blocks
(``request_finished`` returns True) and gets a lease; its ``kv_transfer_params`` tell the decode
side where to pull. Consumer (decode): a request carrying those params is scheduled with its
prompt KV loaded asynchronously — only the blocks its local prefix cache does not already hold.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from pdserve.kv.config import ConnectorSettings
from pdserve.kv.metadata import LeaseSpec, LoadSpec, PdserveMetadata, ReleaseSpec
from pdserve.kv.params import RemotePrefill, parse_remote, producer_params, prompt_digest
from pdserve.kv.puller import PullTask
from pdserve.kv.transports import choose_transport

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

log = logging.getLogger("pdserve.kv")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class SchedulerSide:
    def __init__(self, settings: ConnectorSettings, *, is_producer: bool, engine_id: str,
                 host: str, port: int, tp_size: int, block_size: int) -> None:
        self.settings = settings
        self.is_producer = is_producer
        self.engine_id = engine_id
        self.host, self.port = host, port
        self.tp_size = tp_size
        self.block_size = block_size
        self._leases: list[LeaseSpec] = []
        self._loads: list[LoadSpec] = []
        self._releases: list[ReleaseSpec] = []
        self._load_errors: dict[str, str] = {}
        # n>1 sampling fans one decode request out into children that share one lease: the
        # first child pulls, the others wait for it and then hit the local prefix cache.
        self._loading: dict[str, str] = {}  # remote request id → local request id pulling it
        self._loading_by_local: dict[str, str] = {}
        self._pulled: dict[str, None] = {}  # recently pulled remote request ids (bounded)

    # ------------------------------------------------------------------ decode side
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if self.is_producer or not params or not params.get("do_remote_prefill"):
            return 0, False
        remote = parse_remote(params)
        if isinstance(remote, str):
            log.warning("request %s: unusable kv_transfer_params (%s); computing the prompt locally",
                        request.request_id, remote)
            params["do_remote_prefill"] = False
            return 0, False
        remote_id = remote.remote_request_id
        owner = self._loading.get(remote_id)
        if owner is not None and owner != request.request_id:
            return None, False  # a sibling is pulling this lease; ask again next step
        if remote_id in self._pulled:
            params["do_remote_prefill"] = False  # sibling pulled it: its blocks are cached here
            return 0, False
        remote_tokens = min(remote.remote_num_tokens or 0, request.num_prompt_tokens)
        error = self._check_compatible(request, remote, remote_tokens)
        if error:
            # still "load" so the request fails (or recomputes) through vLLM's failure path
            self._load_errors[request.request_id] = error
        count = remote_tokens - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def _check_compatible(self, request: "Request", remote: RemotePrefill, remote_tokens: int) -> str:
        if remote.tp_size not in (None, self.tp_size):
            return (f"prefill instance has tensor-parallel size {remote.tp_size}, this "
                    f"decode instance {self.tp_size}: pdserve needs equal TP on both (fix the "
                    "ranktable devices or --tensor-parallel-size)")
        if remote.block_size not in (None, self.block_size):
            return (f"prefill instance uses block size {remote.block_size}, this decode "
                    f"instance {self.block_size}: use the same --block-size on both")
        digest = remote.prompt_digest
        # the prompt may go on past the remote tokens (the scheduler sent the prefill's first
        # token along, to continue after it): the pulled KV must match the part it covers
        if digest and digest != prompt_digest((request.prompt_token_ids or [])[:remote_tokens]):
            return ("the prompt tokens differ from the ones the prefill instance computed "
                    "(different tokenizer, chat template or request?)")
        return ""

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if self.is_producer or not params or not params.get("do_remote_prefill"):
            return
        params["do_remote_prefill"] = False  # one transfer per request
        remote = parse_remote(params)
        if isinstance(remote, str):
            return
        host, port = remote.remote_host, remote.remote_port
        remote_ids = remote.remote_block_ids
        if num_external_tokens <= 0:
            self._releases.append(ReleaseSpec(host, port, remote.remote_request_id,
                                              "prompt fully in the local prefix cache"))
            return
        group = blocks.blocks[0]
        n_cached = sum(1 for b in group if b.block_hash is not None)
        n_needed = _cdiv(remote.remote_num_tokens or 0, self.block_size)
        n_pull = max(0, min(n_needed, len(remote_ids), len(group)) - n_cached)
        local_ids = [b.block_id for b in group[n_cached:n_cached + n_pull]]
        task = PullTask(
            req_id=request.request_id,
            remote_req_id=remote.remote_request_id,
            remote_host=host,
            remote_port=port,
            remote_block_ids=remote_ids[n_cached:n_cached + n_pull],
            local_block_ids=local_ids,
            transport=choose_transport(self.settings.transport, same_host=self._same_host(host)),
        )
        self._loads.append(LoadSpec(task, self._load_errors.pop(request.request_id, "")))
        self._loading[task.remote_req_id] = request.request_id
        self._loading_by_local[request.request_id] = task.remote_req_id

    def update_connector_output(self, finished_recving: set[str] | None) -> None:
        for local_id in finished_recving or ():
            remote_id = self._loading_by_local.pop(local_id, None)
            if remote_id is None:
                continue
            self._loading.pop(remote_id, None)
            self._pulled[remote_id] = None
            while len(self._pulled) > 4096:
                self._pulled.pop(next(iter(self._pulled)))

    def _same_host(self, host: str) -> bool:
        return host == self.host or host in ("127.0.0.1", "localhost", "::1")

    # ------------------------------------------------------------------ prefill side
    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        if not params:
            return False, None
        if not self.is_producer:
            if params.get("do_remote_prefill"):  # finished (aborted) before it was ever scheduled
                remote = parse_remote(params)
                if not isinstance(remote, str):
                    self._releases.append(ReleaseSpec(remote.remote_host, remote.remote_port,
                                                      remote.remote_request_id,
                                                      "request ended before its KV was pulled"))
                params["do_remote_prefill"] = False
            self._load_errors.pop(request.request_id, None)
            remote_id = self._loading_by_local.pop(request.request_id, None)
            if remote_id is not None:
                self._loading.pop(remote_id, None)
            return False, None
        if not params.get("do_remote_decode"):
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            return False, None  # aborted or failed: free at once
        if not block_ids:
            return False, None
        expires_at = time.time() + self.settings.lease_seconds
        self._leases.append(LeaseSpec(request.request_id, list(block_ids), expires_at))
        num_tokens = min(request.num_computed_tokens, request.num_prompt_tokens)
        return True, producer_params(
            engine_id=self.engine_id, host=self.host, port=self.port, req_id=request.request_id,
            block_ids=list(block_ids), num_tokens=num_tokens, expires_at=expires_at,
            tp_size=self.tp_size, block_size=self.block_size,
            digest=prompt_digest(request.prompt_token_ids or []),
        )

    # ------------------------------------------------------------------ both
    def build_connector_meta(self) -> PdserveMetadata:
        meta = PdserveMetadata(self._leases, self._loads, self._releases)
        self._leases, self._loads, self._releases = [], [], []
        return meta
