"""vLLM processes on CPU cores shared with other processes: wait for messages, do not spin.

vLLM's engine core and its multiprocess workers talk through shared-memory queues whose readers
spin with ``sched_yield`` for a second after every message they read
(``shm_broadcast.SpinCondition``, ``busy_loop_s=1``, not configurable). On CPU that spin takes
cores from the model's compute:

- The engine core spins while its worker runs each step. pdserve binds only the workers (to the
  ranktable's cores) and reserves no core for the engine, which vLLM's own automatic binding
  does, so the spinning engine runs on some instance's compute core. On the 2-core development
  host, with one prefill and one decode instance, the two engines used ~15 s of CPU in a
  47-second run; with the busy wait off, median TTFT and TPOT both dropped (README, Benchmarks).
- With TP > 1 on shared cores (``pdserve up --tp 2`` on 2 cores), the decode ranks, woken every
  millisecond by empty steps while a request waits for its KV, starved the prefill ranks'
  side-channel threads, and the pulls timed out.

With ``PDSERVE_SHARED_CORES=1`` (the default for CPU instances; ``0`` keeps vLLM's spin), both
halves of the connector turn the readers' busy loop off before the first step: a reader waits on
the writer's notification instead (a ZMQ poll, tens of microseconds to wake), for at most
``RECHECK_MS`` at a time, because those notifications get lost (see ``no_busy_wait``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

log = logging.getLogger("pdserve.kv")

ENV = "PDSERVE_SHARED_CORES"


RECHECK_MS = 2  # longest a reader sleeps before it looks at the shared buffer again


def no_busy_wait(cls: type, recheck_ms: int = RECHECK_MS) -> None:
    """Make readers of ``cls`` (vLLM's ``SpinCondition``) sleep instead of spinning, briefly.

    A reader then sleeps on the writer's ZMQ notification, which vLLM itself treats as lossy (it
    re-reads the buffer's flag every 5 s "to bound lost-notify recovery"). Measured here, about a
    third of the waits missed their notification: with the full 5 s backstop, one request took
    100 s for 64 tokens. So each sleep is capped at ``recheck_ms``: a lost notification costs at
    most that, and a waiting reader wakes ~500 times a second (about 1% of a core) instead of
    spinning a whole core.
    """
    if getattr(cls, "_pdserve_no_busy_wait", False):
        return
    wait = cls.wait

    def patient_wait(self, timeout_ms: int | None = None) -> None:
        if getattr(self, "is_reader", False):
            self.busy_loop_s = 0
            timeout_ms = recheck_ms if timeout_ms is None else min(timeout_ms, recheck_ms)
        return wait(self, timeout_ms)

    cls.wait = patient_wait
    cls._pdserve_no_busy_wait = True


def apply(env: Mapping[str, str] = os.environ) -> bool:
    """In a vLLM engine or worker process: turn vLLM's busy wait off when ``PDSERVE_SHARED_CORES=1``."""
    if env.get(ENV, "").strip() != "1":
        return False
    try:
        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    except ImportError:  # another vLLM version: nothing to do
        return False
    if not hasattr(SpinCondition, "wait"):
        return False
    no_busy_wait(SpinCondition)
    log.info("cores shared with other processes: vLLM's engine and workers wait for each other "
             "without spinning (%s=1)", ENV)
    return True
