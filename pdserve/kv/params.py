"""The ``kv_transfer_params`` hand-over: what the prefill instance returns, the decode one reads.

Field names follow vLLM's own disaggregation connectors (NIXL, Mooncake) so routers that speak
that protocol work unchanged; pdserve adds a lease expiry, the prompt's token digest (the decode
side refuses KV computed for another prompt) and the TP size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

REQUIRED = ("remote_engine_id", "remote_request_id", "remote_host", "remote_port", "remote_block_ids")


def prompt_digest(token_ids: Sequence[int]) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(b",".join(str(t).encode() for t in token_ids))
    return h.hexdigest()


def producer_params(*, engine_id: str, host: str, port: int, req_id: str, block_ids: list[int],
                    num_tokens: int, expires_at: float, tp_size: int, block_size: int,
                    digest: str) -> dict[str, Any]:
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": engine_id,
        "remote_host": host,
        "remote_port": port,
        "remote_request_id": req_id,
        "remote_block_ids": block_ids,
        "remote_num_tokens": num_tokens,
        "remote_lease_expires_at": expires_at,
        "tp_size": tp_size,
        "block_size": block_size,
        "prompt_digest": digest,
        "connector": "pdserve",
    }


def missing_fields(params: dict[str, Any]) -> list[str]:
    return [k for k in REQUIRED if k not in params]
