"""The KV connector's environment switches and byte thresholds, read one way and checked early.

The vLLM workers read them (they are no vLLM flags); the daemon calls :func:`check` before vLLM
starts, so ``PDSERVE_KV_TCP_STREAM=off`` means off and a typo in a threshold fails in one line
instead of in a worker after the model has loaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pdserve.env import env_bool
from pdserve.errors import ConfigError

SWITCHES = {
    "PDSERVE_KV_SHM_DIRECT": True,  # shm: read the prefill's blocks directly (process_vm_readv / mapping)
    "PDSERVE_KV_SHM_SHARE": True,  # shm: the prefill worker shares its KV cache through a memfd
    "PDSERVE_KV_TCP_STREAM": True,  # tcp: payloads on a plain TCP stream instead of ZMQ frames
}
SIZES = {
    "PDSERVE_KV_TCP_ZERO_COPY_MIN": 256 << 10,  # tcp frames: mean region size sent without a copy
    "PDSERVE_KV_CMA_SPLIT_MIN": 8 << 20,  # direct reads from this size are split over threads
}


def switch(name: str, env: Mapping[str, str] | None = None) -> bool:
    return env_bool(os.environ if env is None else env, name, SWITCHES[name])


def size(name: str, env: Mapping[str, str] | None = None) -> int:
    raw = (os.environ if env is None else env).get(name, "").strip()
    if not raw:
        return SIZES[name]
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError("environment", name, f"{raw!r} is not a byte count",
                          f"export {name}=<bytes, 0 or more> or unset it (default {SIZES[name]})")
    return value


def check(env: Mapping[str, str]) -> None:
    """Every switch and threshold set in ``env`` is valid (else a ConfigError naming it)."""
    for name in SWITCHES:
        switch(name, env)
    for name in SIZES:
        size(name, env)
