"""Routing policies: pick one instance of a role for a request.

Each policy sees ``avail`` (healthy instances with a free slot) and ``healthy`` (all healthy
ones, the stable set prefix-affinity hashes over, so that a momentarily full instance does not
reshuffle every prefix) and returns one of ``avail``.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pdserve.scheduler.pool import Instance


@dataclass(slots=True)
class RouteKey:
    prefix: bytes | None  # leading prompt bytes for prefix-affinity (None: no affinity)
    tokens: int  # estimated tokens of work (prompt + max_tokens), for least-load
    affinity: dict[str, int] | None = None  # decode: instance name -> prompt chars it probably has cached


class Policy(Protocol):
    name: str

    def choose(self, avail: Sequence[Instance], healthy: Sequence[Instance], key: RouteKey) -> Instance: ...


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, avail: Sequence[Instance], healthy: Sequence[Instance], key: RouteKey) -> Instance:
        inst = avail[self._next % len(avail)]
        self._next += 1
        return inst


class LeastLoad:
    """Fewest requests in flight, then fewest tokens in flight; ties rotate so idle pools spread."""

    name = "least-load"

    def __init__(self) -> None:
        self._tie = 0

    def choose(self, avail: Sequence[Instance], healthy: Sequence[Instance], key: RouteKey) -> Instance:
        n = len(avail)
        if n == 1:
            return avail[0]
        self._tie += 1
        start = self._tie % n
        best = avail[start]
        best_load = (best.inflight, best.inflight_tokens)
        for k in range(1, n):
            inst = avail[(start + k) % n]
            load = (inst.inflight, inst.inflight_tokens)
            if load < best_load:
                best, best_load = inst, load
        return best


class PowerOfTwo:
    """Two random candidates, the less loaded wins: near least-load balance without a global scan."""

    name = "power-of-two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, avail: Sequence[Instance], healthy: Sequence[Instance], key: RouteKey) -> Instance:
        if len(avail) == 1:
            return avail[0]
        a, b = self._rng.sample(list(avail), 2)
        return a if (a.inflight, a.inflight_tokens) <= (b.inflight, b.inflight_tokens) else b


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class PrefixAffinity:
    """Same prompt prefix → same prefill instance, so vLLM's prefix cache there hits.

    Consistent hashing (virtual nodes) over the healthy instances: when one leaves or comes back
    only its share of prefixes moves. Bounded load: if the chosen instance is full, or would carry
    more than ``load_factor`` times its fair share of the requests in flight, the request goes to
    the least-loaded instance instead (a cache miss beats a queue).
    """

    name = "prefix-affinity"

    def __init__(self, load_factor: float = 1.5, vnodes: int = 64) -> None:
        self.load_factor = load_factor
        self.vnodes = vnodes
        self._fallback = LeastLoad()
        self._ring_key: tuple[int, ...] = ()  # the instances' ids: a removed one re-added under its old name is new
        self._ring_hashes: list[int] = []
        self._ring_insts: list[Instance] = []

    def _ring(self, healthy: Sequence[Instance]) -> tuple[list[int], list[Instance]]:
        names = tuple(map(id, healthy))  # (the cached ring holds them, so no id is reused meanwhile)
        if names != self._ring_key:
            points = sorted(
                ((_h64(f"{inst.spec.name}#{v}".encode()), inst) for inst in healthy for v in range(self.vnodes)),
                key=lambda p: p[0],
            )
            self._ring_hashes = [h for h, _ in points]
            self._ring_insts = [inst for _, inst in points]
            self._ring_key = names
        return self._ring_hashes, self._ring_insts

    def target(self, healthy: Sequence[Instance], prefix: bytes) -> Instance:
        hashes, insts = self._ring(healthy)
        pos = bisect.bisect(hashes, _h64(prefix)) % len(hashes)
        return insts[pos]

    def choose(self, avail: Sequence[Instance], healthy: Sequence[Instance], key: RouteKey) -> Instance:
        if not key.prefix or not healthy:
            return self._fallback.choose(avail, healthy, key)
        inst = self.target(healthy, key.prefix)
        if inst in avail:
            total = sum(i.inflight for i in healthy)
            bound = math.ceil(self.load_factor * (total + 1) / len(healthy))
            if inst.inflight + 1 <= bound:
                return inst
        return self._fallback.choose(avail, healthy, key)


def make_policy(name: str, load_factor: float = 1.5) -> Policy:
    if name == "round-robin":
        return RoundRobin()
    if name == "least-load":
        return LeastLoad()
    if name == "power-of-two":
        return PowerOfTwo()
    if name == "prefix-affinity":
        return PrefixAffinity(load_factor)
    raise ValueError(f"unknown policy {name!r}")
