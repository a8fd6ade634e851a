"""vLLM workers on shared cores: the reader's busy loop is turned off, and only when told."""

from __future__ import annotations

import pytest

from pdserve.kv import shared_cores

pytestmark = pytest.mark.unit


class FakeSpinCondition:
    """Shaped like vLLM's ``shm_broadcast.SpinCondition``: spins while within busy_loop_s."""

    def __init__(self, is_reader: bool) -> None:
        self.is_reader, self.busy_loop_s, self.calls = is_reader, 1.0, []

    def wait(self, timeout_ms: int | None = None) -> None:
        self.calls.append((self.busy_loop_s, timeout_ms))


def test_readers_stop_spinning_writers_are_untouched() -> None:
    class Spin(FakeSpinCondition):
        pass

    reader, writer = Spin(True), Spin(False)  # created before the patch, as in vLLM's workers
    shared_cores.no_busy_wait(Spin)
    shared_cores.no_busy_wait(Spin)  # idempotent: not wrapped twice
    reader.wait(5000)
    reader.wait()
    reader.wait(1)
    writer.wait()
    # each sleep is capped: vLLM's notifications get lost, and its own backstop is 5 s
    assert reader.calls == [(0, 2), (0, 2), (0, 1)] and reader.busy_loop_s == 0
    assert writer.calls == [(1.0, None)]


def test_applied_to_vllm_only_when_told(monkeypatch) -> None:
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    monkeypatch.setattr(SpinCondition, "wait", SpinCondition.wait)  # restored afterwards
    monkeypatch.setattr(SpinCondition, "_pdserve_no_busy_wait", False, raising=False)
    assert shared_cores.apply({}) is False
    assert shared_cores.apply({"PDSERVE_SHARED_CORES": "0"}) is False
    assert not SpinCondition._pdserve_no_busy_wait

    assert shared_cores.apply({"PDSERVE_SHARED_CORES": "1"}) is True
    assert getattr(SpinCondition, "_pdserve_no_busy_wait", False)


def test_real_reader_with_a_lost_notification_rechecks_within_milliseconds(tmp_path) -> None:
    """vLLM's reader, idle and never notified (a lost notification), comes back to re-read the
    buffer within a few milliseconds; unpatched, ``wait(None)`` would block until a notification."""
    import time

    import zmq
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    class Spin(SpinCondition):
        pass

    shared_cores.no_busy_wait(Spin)
    ctx = zmq.Context()
    try:
        reader = Spin(True, ctx, f"ipc://{tmp_path}/notify")  # no writer: nothing will ever notify
        reader.last_read = 0.0  # long idle: unpatched, this is vLLM's indefinite poll
        t0 = time.monotonic()
        for _ in range(5):
            reader.wait(None)
        assert time.monotonic() - t0 < 1.0
    finally:
        ctx.destroy(linger=0)
