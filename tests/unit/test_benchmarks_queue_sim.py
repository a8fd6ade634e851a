"""benchmarks/queue_sim.py: the routing simulation the README quotes."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import queue_sim  # noqa: E402

pytestmark = pytest.mark.unit


def test_arrivals_span_prompts_over_rate_and_follow_the_seed() -> None:
    shape = queue_sim.Shape(prompts=40, rate=2.0)
    a = queue_sim.arrivals(shape, 3)
    assert len(a) == 40 and a == sorted(a) and a[-1] == pytest.approx(20.0)
    assert a == queue_sim.arrivals(shape, 3) and a != queue_sim.arrivals(shape, 4)


def test_a_lone_prompt_takes_the_prefill_time_and_a_queue_adds_to_it() -> None:
    lone = queue_sim.Shape(prompts=1, prefill_s=0.8)
    assert queue_sim.simulate(lambda raw, left: False, lone, 0) == (pytest.approx(0.8), 0.0)
    busy = queue_sim.Shape(prompts=40, rate=1.0, prefill_s=0.8)
    p50, share = queue_sim.simulate(lambda raw, left: False, busy, 0)
    assert p50 > 0.8 and share == 0.0


def test_offloading_more_prompts_cannot_push_the_median_below_the_service_times() -> None:
    shape = queue_sim.Shape(prefill_s=0.82, decode_only_s=0.95)
    pols = queue_sim.policies(512)
    runs = {name: [queue_sim.simulate(p, shape, s) for s in range(30)] for name, p in pols.items()}
    share = {n: statistics.mean(r[1] for r in rs) for n, rs in runs.items()}
    p50 = {n: statistics.median(r[0] for r in rs) for n, rs in runs.items()}
    assert share["raw >= 512 (any wait)"] > share["raw >= 1024 (pdserve up's default)"] > 0
    assert p50["never decode-only"] > p50["raw >= 1024 (pdserve up's default)"]
    assert min(p50.values()) >= 0.82
