"""``pdserve up`` stops the scheduler before the instances, with one SIGTERM per daemon."""

from __future__ import annotations

import io
import sys
import time
from types import SimpleNamespace

import pytest

from pdserve.up.runner import SCHEDULER, Cluster
from pdserve.worker.process import ManagedProcess

pytestmark = pytest.mark.unit


class _Daemon:
    """Records when it was asked to stop; the scheduler takes a while to drain."""

    def __init__(self, name: str, log: list[tuple[str, str, float]], drain_s: float = 0.0) -> None:
        self.name, self.log, self.drain_s = name, log, drain_s

    def remember_descendants(self) -> None:
        pass

    def stop(self, deadline_s: float) -> int:
        self.log.append((self.name, "stop", time.monotonic()))
        time.sleep(self.drain_s)
        self.log.append((self.name, "stopped", time.monotonic()))
        return 0


def _cluster(procs: list) -> Cluster:
    c = Cluster(plan=None, settings=SimpleNamespace(drain_seconds=1.0), out=io.StringIO())  # type: ignore[arg-type]
    c.procs = procs
    return c


def test_the_instances_stop_only_after_the_scheduler_drained() -> None:
    log: list[tuple[str, str, float]] = []
    procs = [_Daemon("prefill0", log), _Daemon("decode0", log), _Daemon(SCHEDULER, log, drain_s=0.3)]
    _cluster(procs).stop()
    events = [(n, e) for n, e, _ in log]
    assert events[:2] == [(SCHEDULER, "stop"), (SCHEDULER, "stopped")]
    assert sorted(events[2:]) == [("decode0", "stop"), ("decode0", "stopped"),
                                  ("prefill0", "stop"), ("prefill0", "stopped")]


_COUNTS_SIGTERMS = """
import signal, sys, time
n = 0
def on(*_):
    global n
    n += 1
    print(n, flush=True)
signal.signal(signal.SIGTERM, on)
print("ready", flush=True)
while n == 0:
    time.sleep(0.05)
time.sleep(0.5)  # a second SIGTERM would arrive now
sys.exit(0)
"""


def test_each_daemon_gets_one_sigterm() -> None:
    """A second SIGTERM makes the scheduler stop without waiting for its in-flight requests."""
    proc = ManagedProcess(SCHEDULER, [sys.executable, "-c", _COUNTS_SIGTERMS], {}, out=io.StringIO(), ring=10).start()
    deadline = time.monotonic() + 10
    while "ready" not in proc.tail(10) and time.monotonic() < deadline:
        time.sleep(0.05)
    _cluster([proc]).stop()
    assert (lines := proc.tail(10)) == ["ready", "1"], lines
