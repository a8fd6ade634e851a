"""Routing policies in isolation: which instance each one picks."""

from __future__ import annotations

import random

import pytest

from pdserve.scheduler.config import InstanceSpec
from pdserve.scheduler.metrics import SchedulerMetrics
from pdserve.scheduler.policies import LeastLoad, PowerOfTwo, PrefixAffinity, RoundRobin, RouteKey, make_policy
from pdserve.scheduler.pool import Instance

pytestmark = pytest.mark.unit


def insts(n: int) -> list[Instance]:
    m = SchedulerMetrics()
    return [Instance(InstanceSpec("prefill", i, i, "127.0.0.1", 9000 + i), m) for i in range(n)]


KEY = RouteKey(None, 10)


def test_round_robin_cycles() -> None:
    pool, rr = insts(3), RoundRobin()
    assert [rr.choose(pool, pool, KEY).spec.index for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_least_load_picks_fewest_requests_then_tokens() -> None:
    pool, ll = insts(3), LeastLoad()
    pool[0].inflight, pool[1].inflight, pool[2].inflight = 3, 1, 1
    pool[1].inflight_tokens, pool[2].inflight_tokens = 500, 20
    assert all(ll.choose(pool, pool, KEY) is pool[2] for _ in range(5))


def test_least_load_spreads_ties() -> None:
    pool, ll = insts(3), LeastLoad()
    assert {ll.choose(pool, pool, KEY).spec.index for _ in range(6)} == {0, 1, 2}


def test_power_of_two_never_picks_the_most_loaded_of_its_pair() -> None:
    pool = insts(2)
    pool[0].inflight = 5
    p2 = PowerOfTwo(random.Random(0))
    assert all(p2.choose(pool, pool, KEY) is pool[1] for _ in range(20))


def test_prefix_affinity_is_sticky_and_spreads() -> None:
    pool, pa = insts(4), PrefixAffinity()
    targets = {}
    for i in range(200):
        key = RouteKey(f"system prompt {i}".encode(), 10)
        first = pa.choose(pool, pool, key)
        assert all(pa.choose(pool, pool, key) is first for _ in range(3))
        targets[i] = first.spec.index
    counts = [list(targets.values()).count(k) for k in range(4)]
    assert min(counts) > 20, counts  # consistent hashing spreads prefixes


def test_prefix_affinity_moves_only_the_lost_instances_share() -> None:
    pool, pa = insts(4), PrefixAffinity()
    keys = [RouteKey(f"doc {i}".encode(), 1) for i in range(300)]
    before = {k.prefix: pa.choose(pool, pool, k) for k in keys}
    rest = pool[:3]
    after = {k.prefix: pa.choose(rest, rest, k) for k in keys}
    for prefix, inst in before.items():
        if inst is not pool[3]:
            assert after[prefix] is inst


def test_prefix_affinity_bounded_load_falls_back_to_least_load() -> None:
    pool, pa = insts(2), PrefixAffinity(load_factor=1.5)
    key = RouteKey(b"hot prefix", 1)
    target = pa.choose(pool, pool, key)
    other = pool[1 - target.spec.index]
    target.inflight = 10  # far beyond 1.5x the mean
    assert pa.choose(pool, pool, key) is other
    target.inflight = 1
    assert pa.choose(pool, pool, key) is target
    # a full target (not in avail) also falls back
    assert pa.choose([other], pool, key) is other


def test_make_policy_names() -> None:
    for name in ("round-robin", "least-load", "power-of-two", "prefix-affinity"):
        assert make_policy(name).name == name
    with pytest.raises(ValueError):
        make_policy("nope")
