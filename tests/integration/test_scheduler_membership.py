"""Adding and removing instances while the scheduler runs (``--allow-instance-updates``)."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.testing.fake_instance import FakeInstance
from tests.integration.conftest import MODEL, Cluster, MakeCluster, wait_for

pytestmark = pytest.mark.integration


async def _cluster(make_cluster: MakeCluster, **kw: object) -> Cluster:
    return await make_cluster(1, 1, instance_updates=True, **kw)


async def _fake(role: str, index: int = 7, **kw: object) -> FakeInstance:
    return await FakeInstance(role, index, index, model=kw.pop("model", MODEL), **kw).start()  # type: ignore[arg-type]


async def _add(c: Cluster, role: str, url: str) -> tuple[int, dict]:
    async with c.post("/pdserve/v1/instances", json={"role": role, "url": url}) as r:
        return r.status, await r.json()


async def _names(c: Cluster) -> list[str]:
    async with c.get("/pdserve/v1/instances") as r:
        return [i["name"] for i in (await r.json())["instances"]]


async def _complete(c: Cluster, prompt: str = "a b c") -> int:
    async with c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}) as r:
        await r.read()
        return r.status


async def test_an_added_decode_instance_takes_requests(make_cluster: MakeCluster) -> None:
    c = await _cluster(make_cluster, decode_policy="round-robin")
    extra = await _fake("decode")
    try:
        status, answer = await _add(c, "decode", f"http://127.0.0.1:{extra.port}")
        assert status == 201, answer
        assert answer["name"] == f"decode[1]@127.0.0.1:{extra.port}" and answer["role"] == "decode"
        assert answer["name"] in await _names(c)
        for k in range(4):  # other prompts each: no conversation affinity
            assert await _complete(c, f"prompt {k}") == 200
        # round-robin over both decode instances: the new one got half, with the prefill's KV
        got = extra.inference_requests()
        assert len(got) == 2 and all(r["kv_transfer_params"] for r in got)
        async with c.get("/metrics") as r:
            assert f'instance="{answer["name"]}"' in await r.text()
        # the same URL twice is refused
        assert (await _add(c, "decode", f"127.0.0.1:{extra.port}"))[0] == 409
    finally:
        await extra.stop()


@pytest.mark.parametrize(("case", "fragment"), [
    ("wrong role", "is a prefill instance, not a decode one"),
    ("other model", "every instance must serve the same model"),
    ("unhealthy", "is not healthy"),
    ("unreachable", "cannot be reached"),
    ("bad url", "is not HOST:PORT"),
    ("short context", "has max_model_len 64, less than the 4096"),
])
async def test_an_instance_that_fails_the_start_up_checks_is_refused(make_cluster: MakeCluster, case: str,
                                                                    fragment: str) -> None:
    c = await _cluster(make_cluster)
    extra = await _fake("prefill" if case == "wrong role" else "decode",
                        model="other" if case == "other model" else MODEL, healthy=case != "unhealthy",
                        max_model_len=64 if case == "short context" else 4096)
    port = extra.port
    if case == "unreachable":
        await extra.stop()
    try:
        url = "no-port" if case == "bad url" else f"127.0.0.1:{port}"
        status, answer = await _add(c, "decode", url)
        assert status == (502 if case == "unreachable" else 400), answer
        assert fragment in answer["error"]["message"], answer
        assert len(await _names(c)) == 2
    finally:
        if case != "unreachable":
            await extra.stop()


async def test_removal_stops_routing_at_once_and_waits_for_requests_in_flight(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 2, instance_updates=True)
    slow = c.decode[1]
    slow.config.token_latency = 0.05
    c.decode[0].config.healthy = False  # every request goes to decode[1] first
    await c.state.pool.check_all(c.state.session)
    stream = asyncio.ensure_future(_complete(c))
    await wait_for(lambda: slow.inference_requests(), what="a request in flight on decode[1]")
    c.decode[0].config.healthy = True
    await c.state.pool.check_all(c.state.session)
    async with c.http.delete(c.url + "/pdserve/v1/instances", params={"url": f"127.0.0.1:{slow.port}"}) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    # the answer came once the request in flight there had finished, and that request succeeded
    assert answer["drained"] and answer["inflight"] == 0
    assert stream.done() and stream.result() == 200
    assert all(f"{slow.port}" not in n for n in await _names(c))
    before = len(slow.inference_requests())
    for k in range(3):
        assert await _complete(c, f"prompt {k}") == 200
    assert len(slow.inference_requests()) == before  # no new request reached it


async def test_removal_refuses_the_last_of_a_role_and_unknown_urls(make_cluster: MakeCluster) -> None:
    c = await _cluster(make_cluster)
    async with c.http.delete(c.url + "/pdserve/v1/instances", params={"url": f"127.0.0.1:{c.decode[0].port}"}) as r:
        assert r.status == 409
        assert "last healthy decode instance" in (await r.json())["error"]["message"]
    async with c.http.delete(c.url + "/pdserve/v1/instances", params={"url": "127.0.0.1:1"}) as r:
        assert r.status == 404
    async with c.http.delete(c.url + "/pdserve/v1/instances") as r:
        assert r.status == 400
    assert len(await _names(c)) == 2


async def test_the_routes_are_off_by_default_and_need_the_api_key(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1)
    status, answer = await _add(c, "decode", "127.0.0.1:9")  # no one can redirect prompts
    assert status == 404 and "--allow-instance-updates" in answer["error"]["message"], answer
    keyed = await make_cluster(1, 1, instance_updates=True, api_keys=["k1"])
    assert (await _add(keyed, "decode", "127.0.0.1:9"))[0] == 401


async def _delete(c: Cluster, port: int, **params: str) -> tuple[int, dict]:
    async with c.http.delete(c.url + "/pdserve/v1/instances", params={"url": f"127.0.0.1:{port}", **params}) as r:
        return r.status, await r.json()


async def test_removing_a_prefill_instance_waits_for_the_requests_holding_its_kv(make_cluster: MakeCluster) -> None:
    """The prefill's slot is free once it answered, but the decode side has yet to pull the KV
    it holds: the instance may be stopped only once those requests ended."""
    c = await make_cluster(2, 1, instance_updates=True, prefill_policy="round-robin")
    c.decode[0].config.ttft = 0.3
    request = asyncio.ensure_future(_complete(c))
    prefill = await wait_for(lambda: next((f for f in c.prefill if f.inference_requests()), None),
                             what="the prefill answered")
    await wait_for(lambda: c.decode[0].inference_requests(), what="the decode instance has the request")
    status, answer = await _delete(c, prefill.port, wait="0")
    assert (status, answer["drained"], answer["inflight"]) == (202, False, 1)  # its KV is still needed
    async with c.get("/pdserve/v1/instances") as r:  # listed as leaving until then
        assert [i["url"] for i in (await r.json())["leaving"]] == [f"http://127.0.0.1:{prefill.port}"]
    status, answer = await _delete(c, c.prefill[1 - c.prefill.index(prefill)].port, wait="0", force="1")
    assert status == 200  # (the other one, forced: nothing used it)
    assert await request == 200
    # the same DELETE asks again whether it has drained
    status, answer = await _delete(c, prefill.port, wait="5")
    assert (status, answer["drained"]) == (200, True)
    async with c.get("/pdserve/v1/instances") as r:
        assert (await r.json())["leaving"] == []
    assert (await _delete(c, prefill.port))[0] == 404  # drained and gone


async def test_a_removed_instance_re_added_takes_its_prefixes_again(make_cluster: MakeCluster) -> None:
    c = await make_cluster(2, 1, instance_updates=True)  # prefill: prefix-affinity
    second = c.prefill[1]
    assert await _complete(c, "warm the ring") == 200  # the ring is built with both instances
    assert (await _delete(c, second.port, wait="0"))[0] == 200
    assert (await _add(c, "prefill", f"127.0.0.1:{second.port}"))[0] == 201
    before = len(second.inference_requests())
    prompts = [f"{k} distinct prefix {k}" for k in range(12)]
    for prompt in prompts:
        assert await _complete(c, prompt) == 200
    # exactly its share of the ring, as a fresh ring over the two instances gives it (a ring
    # left with the removed instance object sends that share to the least-load fallback)
    from pdserve.scheduler.policies import PrefixAffinity

    pool = c.state.pool.prefill.instances
    want = [p for p in prompts if PrefixAffinity().target(pool, p.encode()) is pool[1]]
    assert want and [r["body"]["prompt"] for r in second.inference_requests()[before:]] == want


async def test_a_removed_instances_series_leave_the_metrics(make_cluster: MakeCluster) -> None:
    c = await make_cluster(2, 1, instance_updates=True, prefill_policy="round-robin")
    for k in range(2):
        assert await _complete(c, f"p{k}") == 200
    name = c.state.pool.prefill.instances[1].spec.name
    async with c.get("/metrics") as r:
        assert f'instance="{name}"' in await r.text()
    assert (await _delete(c, c.prefill[1].port))[0] == 200
    async with c.get("/metrics") as r:
        assert f'instance="{name}"' not in await r.text()


async def test_the_same_instance_under_another_host_name_is_refused(make_cluster: MakeCluster) -> None:
    c = await _cluster(make_cluster)
    status, answer = await _add(c, "decode", f"localhost:{c.decode[0].port}")
    assert status == 409, answer


async def test_the_last_healthy_instance_of_a_role_needs_force(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 2, instance_updates=True)
    c.decode[1].config.healthy = False
    await c.state.pool.check_all(c.state.session)
    assert (await _delete(c, c.decode[0].port))[0] == 409
    assert (await _delete(c, c.decode[0].port, force="1"))[0] == 200


async def test_an_added_instance_must_match_the_chat_default(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, instance_updates=True,
                           fake_kw={"identity": {"chat_default_max_tokens": "context"}})
    assert c.cfg.chat_default_is_context
    extra = await _fake("decode")  # its identity names no chat default
    try:
        assert (await _add(c, "decode", f"127.0.0.1:{extra.port}"))[0] == 201
        assert not c.cfg.chat_default_is_context  # as start-up decides with such an instance
    finally:
        await extra.stop()


async def test_an_added_instance_gets_or_must_have_the_lora_adapters(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, instance_updates=True, runtime_lora_updating=True,
                           fake_kw={"lora_adapters": {"a1": "/lora/a1"}, "runtime_lora": True})
    async with c.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "/lora/a2"}) as r:
        assert r.status == 200
    plain = await _fake("decode", 7, runtime_lora=True)
    same = await _fake("decode", 8, runtime_lora=True, lora_adapters={"a1": "/lora/a1"})
    broken = await _fake("decode", 9, lora_adapters={"a1": "/lora/a1"}, runtime_lora=True, lora_fail_status=500)
    try:
        status, answer = await _add(c, "decode", f"127.0.0.1:{plain.port}")
        assert status == 400 and "lacks the LoRA adapter(s) a1" in answer["error"]["message"], answer
        status, answer = await _add(c, "decode", f"127.0.0.1:{broken.port}")
        assert status == 502 and "'a2'" in answer["error"]["message"], answer
        assert (await _add(c, "decode", f"127.0.0.1:{same.port}"))[0] == 201
        assert same.config.lora_adapters == {"a1": "/lora/a1", "a2": "/lora/a2"}  # loaded before it joined
        assert len(await _names(c)) == 3
    finally:
        for f in (plain, same, broken):
            await f.stop()
