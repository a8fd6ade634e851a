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
    writer.wait()
    assert reader.calls == [(0, 5000)] and reader.busy_loop_s == 0
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
