"""vLLM workers on CPU cores shared with another instance: wait for the engine, do not spin.

vLLM's multiprocess workers (TP > 1) spin with ``sched_yield`` for a second after every message
they read from their engine (``shm_broadcast.SpinCondition``, ``busy_loop_s=1``, not
configurable). While a decode request waits for its KV, the decode engine sends an empty step
every millisecond, so the decode ranks never stop spinning. When their cores are also the prefill
ranks' cores (more ranks than cores, e.g. ``pdserve up --tp 2`` on 2 cores), the prefill ranks'
side-channel threads starve. The pulls then time out: on the 2-core development host, the prefill
ranks answered only once the decode had given up.

With ``PDSERVE_SHARED_CORES=1`` (``pdserve up`` sets it when instances reuse cores), the worker
side of the connector turns the reader's busy loop off: the worker waits on the engine's
notification instead (measured here at TP 2 on 2 cores: all pulls on time, where they timed out
before).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

log = logging.getLogger("pdserve.kv")

ENV = "PDSERVE_SHARED_CORES"


def no_busy_wait(cls: type) -> None:
    """Make readers of ``cls`` (vLLM's ``SpinCondition``) wait without spinning first."""
    if getattr(cls, "_pdserve_no_busy_wait", False):
        return
    wait = cls.wait

    def patient_wait(self, timeout_ms: int | None = None) -> None:
        if getattr(self, "is_reader", False):
            self.busy_loop_s = 0
        return wait(self, timeout_ms)

    cls.wait = patient_wait
    cls._pdserve_no_busy_wait = True


def apply(env: Mapping[str, str] = os.environ) -> bool:
    """In a vLLM worker: turn vLLM's busy wait off when ``PDSERVE_SHARED_CORES=1``."""
    if env.get(ENV, "").strip() != "1":
        return False
    try:
        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    except ImportError:  # another vLLM version: nothing to do
        return False
    if not hasattr(SpinCondition, "wait"):
        return False
    no_busy_wait(SpinCondition)
    log.info("cores shared with other instances: vLLM workers wait for their engine without "
             "spinning (%s=1)", ENV)
    return True
