"""The ``kv_transfer_params`` hand-over: what the prefill instance returns, the decode one reads.

Field names follow vLLM's own disaggregation connectors (NIXL, Mooncake) so routers that speak
that protocol work unchanged; pdserve adds a lease expiry, the prompt's token digest (the decode
side refuses KV computed for another prompt) and the TP size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

_Count = Annotated[StrictInt, Field(ge=0)]


class RemotePrefill(BaseModel):
    """The fields the decode side reads, checked: they come from a request body, and a bad value
    must make the request compute its prompt locally, never raise inside vLLM's engine loop
    (which would kill the instance)."""

    model_config = ConfigDict(extra="ignore")

    remote_engine_id: StrictStr
    remote_request_id: StrictStr
    remote_host: StrictStr = Field(min_length=1)
    remote_port: StrictInt = Field(ge=1, le=65535)
    remote_block_ids: list[_Count]
    remote_num_tokens: _Count | None = None
    tp_size: StrictInt | None = Field(default=None, ge=1)
    block_size: StrictInt | None = Field(default=None, ge=1)
    prompt_digest: StrictStr | None = None


def parse_remote(params: dict[str, Any]) -> RemotePrefill | str:
    """``params`` as :class:`RemotePrefill`, or what is wrong with them (missing or bad fields)."""
    try:
        return RemotePrefill.model_validate(params)
    except ValidationError as exc:
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False))


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
