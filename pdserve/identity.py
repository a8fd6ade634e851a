"""The identity contract between instance daemons and the scheduler.

An instance daemon (``pdserve serve`` on a prefill/decode host) starts vLLM's OpenAI server with
the environment variables below and ``--middleware pdserve.worker.middleware.identity_middleware``.
That middleware answers ``GET /pdserve/v1/identity`` with :class:`Identity` so the scheduler can
check that each port in NODE_PORTS really is the instance the global ranktable says it is.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel

IDENTITY_PATH = "/pdserve/v1/identity"

ENV_ROLE = "PDSERVE_ROLE"  # "prefill" | "decode"
ENV_INDEX = "PDSERVE_INSTANCE_INDEX"  # index inside the role's group, from 0
ENV_GLOBAL_INDEX = "PDSERVE_GLOBAL_INDEX"  # index in NODE_PORTS order (prefill first, then decode)
ENV_DIGEST = "PDSERVE_RANKTABLE_DIGEST"  # digest of the global ranktable (ranktable.digest)
ENV_SERVER_IP = "PDSERVE_SERVER_IP"
ENV_DEVICES = "PDSERVE_DEVICE_IDS"  # comma-separated device ids
ENV_MODEL = "PDSERVE_SERVED_MODEL"  # comma-separated served model names
ENV_SIDE_CHANNEL = "PDSERVE_KV_SIDE_CHANNEL"  # host:port of the KV side channel
# "context" when the server's chat default max_tokens is the rest of the context (no max_new_tokens
# in the model's generation config, no generation-config flags); else unset (not known)
ENV_CHAT_DEFAULT = "PDSERVE_CHAT_DEFAULT_MAX_TOKENS"


class Identity(BaseModel):
    role: Literal["prefill", "decode"]
    index: int
    global_index: int
    server_ip: str
    device_ids: list[int]
    ranktable_digest: str
    served_model_names: list[str]
    kv_side_channel: str | None = None
    chat_default_max_tokens: str | None = None  # "context", or None: not known


def identity_from_env(environ: os._Environ[str] | dict[str, str] | None = None) -> Identity:
    env = os.environ if environ is None else environ
    devices = [int(d) for d in env.get(ENV_DEVICES, "").split(",") if d.strip()]
    models = [m for m in env.get(ENV_MODEL, "").split(",") if m]
    return Identity(
        role=env.get(ENV_ROLE, "prefill"),  # type: ignore[arg-type]
        index=int(env.get(ENV_INDEX, "0")),
        global_index=int(env.get(ENV_GLOBAL_INDEX, "0")),
        server_ip=env.get(ENV_SERVER_IP, "127.0.0.1"),
        device_ids=devices,
        ranktable_digest=env.get(ENV_DIGEST, ""),
        served_model_names=models,
        kv_side_channel=env.get(ENV_SIDE_CHANNEL) or None,
        chat_default_max_tokens=env.get(ENV_CHAT_DEFAULT) or None,
    )
