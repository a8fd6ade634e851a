"""The role daemon's supervision loop: run one vLLM server, forward stop signals, report deaths.

SIGTERM/SIGINT → SIGTERM to the server's process group, up to ``--drain-seconds`` for in-flight
requests, then SIGKILL; exit 0. A server that is still starting (its ``/health`` does not answer
200) has nothing to drain: it gets ``STARTING_GRACE_S`` instead, so Ctrl-C during a slow start-up
does not wait out the whole drain deadline (vLLM ignores SIGTERM while its engine starts). A
server that dies on its own makes the daemon exit non-zero with the last lines of the server's
log on stderr, so the reason is on screen even when the full log scrolled away or went to a file
nobody reads.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import IO

from pdserve.env import env_bool
from pdserve.worker.process import ManagedProcess
from pdserve.worker.shutdown_noise import SHOW_ENV, ShutdownNoise

TAIL_LINES = 40
STARTING_GRACE_S = 3.0


def http_get_ok(url: str, timeout: float = 2.0) -> bool:
    """GET ``url`` answers 200 (a health check); any error or timeout is "no"."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
            return resp.status == 200
    except (urllib.error.URLError, OSError, TimeoutError, ValueError):
        return False


def serving(health_url: str | None, timeout_s: float = 1.0) -> bool:
    """Whether the server answers its health check (only then can it have requests to drain)."""
    return True if not health_url else http_get_ok(health_url, timeout_s)  # unknown: drain in full


def supervise(name: str, argv: Sequence[str], env: Mapping[str, str], drain_seconds: float,
              prefix: str | None = None, out: IO[str] | None = None, err: IO[str] | None = None,
              health_url: str | None = None) -> int:
    """Run the child until it exits or a stop signal arrives; return the daemon's exit code."""
    err = err or sys.stderr
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    noise = None if env_bool(env if env is not None else os.environ, SHOW_ENV, False) else ShutdownNoise()
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    child = ManagedProcess(name, argv, env, prefix=prefix, out=out, ring=TAIL_LINES, line_filter=noise)
    try:
        child.start()
        print(f"pdserve serve: started {name} (pid {child.pid})", file=err, flush=True)
        last_scan = 0.0
        while not stop.is_set():
            if child.wait(0.5) is not None:
                break
            if time.monotonic() - last_scan > 5.0:  # vLLM forks its engine core after start
                child.remember_descendants()
                last_scan = time.monotonic()
        if stop.is_set():
            deadline = drain_seconds
            if drain_seconds > STARTING_GRACE_S and not serving(health_url):
                deadline = STARTING_GRACE_S
                print(f"pdserve serve: {received[0]}: stopping {name}, which is not serving yet "
                      f"(nothing to drain): {deadline:g}s before SIGKILL", file=err, flush=True)
            else:
                print(f"pdserve serve: {received[0]}: stopping {name}, draining up to {drain_seconds:g}s",
                      file=err, flush=True)
            t0 = time.monotonic()
            if noise is not None:
                noise.stopping = True
            rc = child.stop(deadline)
            child.join_tee(2.0)
            child.flush_filter()  # a held record is printed even if the output has not ended
            said = noise.summary(name) if noise is not None else None
            if said:
                print(said, file=err, flush=True)
            print(f"pdserve serve: {name} stopped (exit {rc}) in {time.monotonic() - t0:.1f}s",
                  file=err, flush=True)
            return 0
        rc = child.poll()
        child.reap_group()
        child.join_tee(2.0)
        tail = child.tail(TAIL_LINES)
        print(f"pdserve serve: {name} exited on its own with code {rc}; last {len(tail)} log lines:",
              file=err)
        for line in tail:
            print(f"  | {line}", file=err)
        err.flush()
        if rc is not None and rc < 0:  # killed by a signal: shell convention 128 + signal
            return 128 - rc
        return rc or 1
    finally:
        if child.proc is not None and child.poll() is None:  # an exception in the loop: no orphan
            child.stop(min(drain_seconds, 5.0))
        for s, h in previous.items():
            signal.signal(s, h)
