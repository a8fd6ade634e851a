"""Each policy's choice through the whole scheduler, and the pool's health handling."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from tests.integration.conftest import Cluster, MakeCluster, wait_for

pytestmark = pytest.mark.integration


def counts(fakes: list) -> list[int]:
    return [len(f.inference_requests()) for f in fakes]


async def complete(c: Cluster, prompt: str, **kw: object) -> int:
    async with c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, **kw}) as r:
        await r.read()
        return r.status


async def test_round_robin_both_roles(make_cluster: MakeCluster) -> None:
    c = await make_cluster(2, 3, prefill_policy="round-robin", decode_policy="round-robin")
    for i in range(6):
        assert await complete(c, f"p{i}") == 200
    assert counts(c.prefill) == [3, 3] and counts(c.decode) == [2, 2, 2]


async def test_prefix_affinity_same_prefix_same_prefill(make_cluster: MakeCluster) -> None:
    c = await make_cluster(3, 1, prefix_chars=32)
    shared = "You are a helpful assistant. " * 4  # 20 words: 5 full blocks of the fake's prefix cache
    cached = []
    for i in range(6):
        async with c.post("/v1/completions", json={"prompt": shared + f"question {i}", "max_tokens": 2}) as r:
            assert r.status == 200
            cached.append(json.loads(await r.read())["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert sorted(counts(c.prefill)) == [0, 0, 6]
    # and the prefix cache there hits: nothing cached for the first request, the shared prefix after
    assert cached == [0] + [20] * 5


async def test_prefix_affinity_chat_messages(make_cluster: MakeCluster) -> None:
    c = await make_cluster(3, 1, prefix_chars=40)
    system = {"role": "system", "content": "Long shared system prompt for everyone."}
    for i in range(5):
        async with c.post("/v1/chat/completions", json={"messages": [system, {"role": "user", "content": str(i)}],
                                                        "max_tokens": 2}) as r:
            assert r.status == 200
    assert sorted(counts(c.prefill)) == [0, 0, 5]


async def test_least_load_avoids_busy_decode(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 2, decode_policy="least-load")
    for f in c.decode:
        f.config.ttft = 2.0  # whichever decode instance the first request lands on stays busy with it
    slow = asyncio.create_task(complete(c, "slow"))
    pool = c.state.pool.decode.instances
    busy = await wait_for(lambda: [i for i, inst in enumerate(pool) if inst.inflight], what="slow request routed")
    assert len(busy) == 1
    (b,) = busy
    other = 1 - b
    c.decode[other].config.ttft = 0.0
    for i in range(4):
        assert await complete(c, f"fast {i}") == 200
    assert not slow.done() and pool[b].inflight == 1  # still busy while the others were routed
    assert counts(c.decode)[b] == 1 and counts(c.decode)[other] == 4
    assert await slow == 200


async def test_power_of_two_balances(make_cluster: MakeCluster) -> None:
    c = await make_cluster(2, 2, prefill_policy="power-of-two", decode_policy="power-of-two")
    for i in range(20):
        assert await complete(c, f"q{i}") == 200
    assert sum(counts(c.prefill)) == 20 and all(n > 0 for n in counts(c.decode))


async def _instances(c: Cluster) -> dict[str, bool]:
    async with c.get("/pdserve/v1/instances") as r:
        return {i["name"]: i["healthy"] for i in (await r.json())["instances"]}


async def test_health_take_out_and_put_back(make_cluster: MakeCluster) -> None:
    c = await make_cluster(2, 1, prefill_policy="round-robin")
    c.prefill[1].config.healthy = False

    async def out() -> bool:
        return sum((await _instances(c)).values()) == 2

    await wait_for(out)
    for i in range(4):
        assert await complete(c, f"x{i}") == 200
    assert counts(c.prefill) == [4, 0]
    async with c.get("/metrics") as r:
        text = await r.text()
    assert re.search(r'^pdserve_scheduler_instance_healthy\{instance="prefill\[1\]@127\.0\.0\.1:\d+"[^}]*\} 0\.0$',
                     text, re.M), text
    assert re.search(r'^pdserve_scheduler_instance_healthy\{instance="prefill\[0\]@127\.0\.0\.1:\d+"[^}]*\} 1\.0$',
                     text, re.M), text
    c.prefill[1].config.healthy = True

    async def back() -> bool:
        return all((await _instances(c)).values())

    await wait_for(back)
    for i in range(4):
        assert await complete(c, f"y{i}") == 200
    assert counts(c.prefill)[1] > 0


async def test_503_when_no_healthy_instance(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1)
    c.decode[0].config.healthy = False

    async def down() -> bool:
        return not (await _instances(c))[c.cfg.decode[0].name]

    await wait_for(down)
    async with c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}) as r:
        assert r.status == 503
        err = (await r.json())["error"]
    assert "no healthy decode instance" in err["message"] and err["code"] == 503
    async with c.get("/health") as r:
        assert r.status == 503


async def test_unreachable_instance_is_taken_out_and_retried(make_cluster: MakeCluster) -> None:
    c = await make_cluster(2, 1, prefill_policy="round-robin", health_interval=30)
    await c.prefill[0].stop()  # connection refused from now on
    for i in range(3):
        assert await complete(c, f"z{i}") == 200
    assert not (await _instances(c))[c.cfg.prefill[0].name]
    assert counts(c.prefill)[1] == 3
