"""Fixtures: fake prefill/decode instances and a scheduler in front of them, all in-process on
127.0.0.1 random ports (fast: no engine, no subprocess)."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from pdserve.scheduler.app import STATE, Scheduler, build_app, make_session
from pdserve.scheduler.config import InstanceSpec, SchedulerConfig
from pdserve.scheduler.startup import prepare
from pdserve.testing.fake_instance import FakeInstance

MODEL = "fake-model"


@dataclasses.dataclass
class Cluster:
    prefill: list[FakeInstance]
    decode: list[FakeInstance]
    cfg: SchedulerConfig
    server: TestServer
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return str(self.server.make_url(""))

    @property
    def state(self) -> Scheduler:
        return self.server.app[STATE]  # type: ignore[return-value,index]

    def post(self, path: str, **kw: Any) -> Any:
        return self.http.post(self.url + path, **kw)

    def get(self, path: str, **kw: Any) -> Any:
        return self.http.get(self.url + path, **kw)

    def all(self) -> list[FakeInstance]:
        return self.prefill + self.decode

    def calls(self) -> int:
        return sum(len(f.inference_requests()) for f in self.all())


def sample(c: Cluster, name: str, **labels: str) -> float:
    """One sample of the scheduler's metrics (0 when it has none yet)."""
    value = c.state.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def specs_for(prefill: list[FakeInstance], decode: list[FakeInstance]) -> list[InstanceSpec]:
    specs = [InstanceSpec("prefill", i, i, "127.0.0.1", f.port) for i, f in enumerate(prefill)]  # type: ignore[arg-type]
    specs += [InstanceSpec("decode", i, len(prefill) + i, "127.0.0.1", f.port)  # type: ignore[arg-type]
              for i, f in enumerate(decode)]
    return specs


async def start_fakes(n_prefill: int, n_decode: int, **fake_kw: Any) -> tuple[list[FakeInstance], list[FakeInstance]]:
    prefill = [await FakeInstance("prefill", i, i, model=MODEL, **fake_kw).start() for i in range(n_prefill)]
    decode = [await FakeInstance("decode", i, n_prefill + i, model=MODEL, **fake_kw).start() for i in range(n_decode)]
    return prefill, decode


MakeCluster = Callable[..., Awaitable[Cluster]]


async def wait_for(pred: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll ``pred`` (a plain or an async callable) until it returns something true, and return
    that; fail the test if it has not within ``timeout`` seconds (instead of a fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        got = pred()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        if loop.time() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout:g} s")
        await asyncio.sleep(0.02)


@pytest.fixture
async def make_cluster() -> AsyncIterator[MakeCluster]:
    made: list[Cluster] = []
    fakes: list[FakeInstance] = []

    async def _make(n_prefill: int = 2, n_decode: int = 2, fake_kw: dict[str, Any] | None = None,
                    **cfg_kw: Any) -> Cluster:
        prefill, decode = await start_fakes(n_prefill, n_decode, **(fake_kw or {}))
        fakes.extend(prefill + decode)
        cfg_kw.setdefault("health_interval", 0.05)
        cfg_kw.setdefault("startup_poll_interval", 0.02)
        cfg_kw.setdefault("startup_timeout", 5.0)
        cfg = SchedulerConfig(instances=specs_for(prefill, decode), host="127.0.0.1", port=0, **cfg_kw)
        session = make_session(cfg)
        await prepare(session, cfg)
        await session.close()
        server = TestServer(build_app(cfg), host="127.0.0.1")
        await server.start_server()
        http = aiohttp.ClientSession()
        c = Cluster(prefill, decode, cfg, server, http)
        made.append(c)
        return c

    yield _make
    for c in made:
        await c.http.close()
        await c.server.close()
    for f in fakes:
        await f.stop()


@pytest.fixture
async def cluster(make_cluster: MakeCluster) -> Cluster:
    return await make_cluster()
