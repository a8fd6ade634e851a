"""The instances of each role: health, load accounting and slot acquisition.

An instance leaves the pool when a health check (``GET /health``) fails or a request cannot
connect to it, and comes back when a health check passes again. Requests take a slot on the
instance they were routed to (``acquire``/``release``); with ``--max-inflight-per-instance`` a
request waits (bounded, counted in the queue-length metric) until some instance has room.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

import aiohttp

from pdserve.scheduler.config import InstanceSpec
from pdserve.scheduler.errors import ApiError, overloaded
from pdserve.scheduler.metrics import SchedulerMetrics

if TYPE_CHECKING:
    from pdserve.scheduler.policies import Policy, RouteKey

log = logging.getLogger("pdserve.scheduler.pool")
REJOIN_TIMEOUT = 60.0  # seconds the on_recover hooks may take before an instance rejoins


class Instance:
    __slots__ = ("spec", "url", "healthy", "inflight", "inflight_tokens", "prefill_backlog", "last_error",
                 "since", "users", "removed", "_g_inflight", "_g_healthy", "_g_backlog")

    def __init__(self, spec: InstanceSpec, metrics: SchedulerMetrics) -> None:
        self.spec = spec
        self.url = spec.url
        self.healthy = True
        self.inflight = 0
        self.inflight_tokens = 0
        self.prefill_backlog = 0  # estimated prompt tokens this instance has yet to compute
        self.last_error: str | None = None
        self.since = time.monotonic()
        self.users = 0  # requests still using what it answered (a prefill's KV lease) after its slot
        self.removed = False  # taken out of the pool: no health checks or callbacks any more
        self._g_inflight = metrics.instance_inflight.labels(spec.role, spec.name)
        self._g_healthy = metrics.instance_healthy.labels(spec.role, spec.name)
        self._g_healthy.set(1)
        self._g_backlog = metrics.instance_prefill_backlog.labels(spec.role, spec.name)

    def add_backlog(self, tokens: int) -> None:
        """Prompt work routed here (positive) or done (negative)."""
        if not tokens:
            return
        self.prefill_backlog += tokens
        self._g_backlog.set(self.prefill_backlog)

    def set_health(self, ok: bool, reason: str | None = None) -> bool:
        """Record a health result; True when the state changed."""
        if ok == self.healthy:
            if not ok:
                self.last_error = reason
            return False
        self.healthy = ok
        self.last_error = None if ok else reason
        self.since = time.monotonic()
        self._g_healthy.set(1 if ok else 0)
        return True

    def __repr__(self) -> str:
        return f"<Instance {self.spec.name} healthy={self.healthy} inflight={self.inflight}>"


class QueueCounter:
    """Requests waiting anywhere (global admission or a per-instance slot), bounded by --max-queue."""

    def __init__(self, limit: int, metrics: SchedulerMetrics) -> None:
        self.limit = limit
        self.waiting = 0
        self._gauge = metrics.queue_length

    def enter(self, retry_after: float) -> None:
        if self.waiting >= self.limit:
            raise overloaded(f"server overloaded: {self.waiting} requests already waiting (--max-queue "
                             f"{self.limit}); retry later", retry_after)
        self.waiting += 1
        self._gauge.set(self.waiting)

    def leave(self) -> None:
        self.waiting -= 1
        self._gauge.set(self.waiting)


class RolePool:
    """The instances of one role and the policy that routes among them."""

    def __init__(self, role: str, instances: list[Instance], policy: Policy, max_per_instance: int,
                 queue: QueueCounter, queue_timeout: float) -> None:
        self.role = role
        self.instances = instances
        self.policy = policy
        self.max_per_instance = max_per_instance
        self.queue = queue
        self.queue_timeout = queue_timeout
        self._freed = asyncio.Event()

    def healthy(self) -> list[Instance]:
        return [i for i in self.instances if i.healthy]

    def _no_healthy(self) -> ApiError:
        down = "; ".join(f"{i.spec.name}: {i.last_error or 'unhealthy'}" for i in self.instances)
        return ApiError(503, f"no healthy {self.role} instance is available ({down})")

    async def acquire(self, key: RouteKey, exclude: Iterable[Instance] = ()) -> Instance:
        """Route and take a slot. 503 when no healthy candidate; 429 when all stay full too long."""
        excluded = set(exclude)
        deadline: float | None = None
        waiting = False
        try:
            while True:
                healthy = [i for i in self.instances if i.healthy and i not in excluded]
                if not healthy:
                    raise self._no_healthy()
                cap = self.max_per_instance
                avail = healthy if cap <= 0 else [i for i in healthy if i.inflight < cap]
                if avail:
                    inst = self.policy.choose(avail, healthy, key)
                    inst.inflight += 1
                    inst.inflight_tokens += key.tokens
                    inst._g_inflight.set(inst.inflight)
                    return inst
                loop = asyncio.get_running_loop()
                if deadline is None:
                    self.queue.enter(self.queue_timeout)
                    waiting = True
                    deadline = loop.time() + self.queue_timeout
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise overloaded(f"all {self.role} instances are busy (--max-inflight-per-instance {cap}) "
                                     f"and none freed up within {self.queue_timeout:g} s", self.queue_timeout)
                self._freed.clear()
                try:
                    async with asyncio.timeout(min(remaining, 1.0)):
                        await self._freed.wait()
                except TimeoutError:
                    pass
        finally:
            if waiting:
                self.queue.leave()

    def release(self, inst: Instance, tokens: int) -> None:
        inst.inflight -= 1
        inst.inflight_tokens -= tokens
        inst._g_inflight.set(inst.inflight)
        if self.max_per_instance > 0:
            self._freed.set()


class InstancePool:
    """Both roles plus the periodic health checker."""

    def __init__(self, specs: list[InstanceSpec], prefill_policy: Policy, decode_policy: Policy,
                 metrics: SchedulerMetrics, *, max_per_instance: int = 0, max_queue: int = 1024,
                 queue_timeout: float = 30.0, health_interval: float = 5.0, health_timeout: float = 3.0) -> None:
        self.metrics = metrics
        self.queue = QueueCounter(max_queue, metrics)
        self.all = [Instance(s, metrics) for s in specs]
        self.prefill = RolePool("prefill", [i for i in self.all if i.spec.role == "prefill"], prefill_policy,
                                max_per_instance, self.queue, queue_timeout)
        self.decode = RolePool("decode", [i for i in self.all if i.spec.role == "decode"], decode_policy,
                               max_per_instance, self.queue, queue_timeout)
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self._task: asyncio.Task[None] | None = None
        self.on_down: list[Callable[[Instance], None]] = []  # e.g. forget what its cache held
        # awaited before an instance that failed its health check takes requests again (e.g. load
        # again the LoRA adapters a restart lost)
        self.on_recover: list[Callable[[Instance], Awaitable[None]]] = []

    def instance_for(self, spec: InstanceSpec) -> Instance:
        return Instance(spec, self.metrics)

    def _role(self, inst: Instance) -> RolePool:
        return self.prefill if inst.spec.role == "prefill" else self.decode

    def add(self, inst: Instance) -> None:
        """Into routing (and health checks) from now on."""
        self.all.append(inst)
        role = self._role(inst)
        role.instances.append(inst)
        role._freed.set()  # requests waiting for a slot may take one there

    def remove(self, inst: Instance) -> None:
        """Out of routing and health checks at once; its requests in flight run to their end."""
        inst.removed = True
        self.all.remove(inst)
        self._role(inst).instances.remove(inst)
        for cb in self.on_down:
            cb(inst)
        self.metrics.forget_instance(inst.spec.role, inst.spec.name)

    def _went_down(self, inst: Instance, reason: str | None) -> None:
        log.warning("instance %s taken out of the pool: %s", inst.spec.name, reason)
        for cb in self.on_down:
            cb(inst)

    def mark_down(self, inst: Instance, reason: str) -> None:
        """Passive health: a request could not reach the instance; the health loop puts it back."""
        if not inst.removed and inst.set_health(False, reason):
            self._went_down(inst, reason)

    async def check_one(self, session: aiohttp.ClientSession, inst: Instance) -> bool:
        try:
            async with session.get(inst.url + "/health",
                                   timeout=aiohttp.ClientTimeout(total=self.health_timeout)) as resp:
                await resp.read()
                ok = resp.status == 200
                reason = None if ok else f"GET /health answered {resp.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            ok, reason = False, f"GET /health failed: {type(exc).__name__} {exc}".strip()
        if inst.removed:  # taken out while this check ran: nothing to update
            return False
        if ok and not inst.healthy:
            for hook in self.on_recover:
                try:  # bounded: the other instances' checks wait for this round
                    await asyncio.wait_for(hook(inst), REJOIN_TIMEOUT)
                except TimeoutError:  # still out; the next round tries again
                    log.warning("instance %s: preparing it to rejoin took over %g s; trying again",
                                inst.spec.name, REJOIN_TIMEOUT)
                    return False
                except Exception:  # a failed hook must not keep a healthy instance out for ever
                    log.exception("preparing instance %s to rejoin failed", inst.spec.name)
            if inst.removed:
                return False
        if inst.set_health(ok, reason):
            if ok:
                log.info("instance %s is healthy again; back in the pool", inst.spec.name)
            else:
                self._went_down(inst, reason)
        return ok

    async def check_all(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self.check_one(session, i) for i in self.all))

    async def _loop(self, session: aiohttp.ClientSession) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                await self.check_all(session)
            except Exception:  # never let the checker die; the next round tries again
                log.exception("health check round failed")

    def start(self, session: aiohttp.ClientSession) -> None:
        if self._task is None and self.health_interval > 0:
            self._task = asyncio.create_task(self._loop(session), name="pdserve-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
