"""LoRA adapters through the scheduler: named like the base model when every instance serves them,
loaded and unloaded on every instance at once (all or nothing), loaded again on a restarted one."""

from __future__ import annotations

import logging

import pytest

from pdserve.scheduler.config import SchedulerConfig
from pdserve.scheduler.startup import prepare
from pdserve.testing.fake_instance import FakeInstance
from tests.integration.conftest import MODEL, Cluster, MakeCluster, specs_for, start_fakes, wait_for

pytestmark = pytest.mark.integration

A1 = {"a1": "/lora/a1"}


def _loads(fake: FakeInstance, path: str = "/v1/load_lora_adapter") -> list[dict]:
    return [r["body"] for r in fake.requests if r["path"] == path]


async def _complete(c: Cluster, model: str) -> tuple[int, dict]:
    async with c.post("/v1/completions", json={"model": model, "prompt": "a b c d e", "max_tokens": 3}) as r:
        return r.status, await r.json()


async def _model_ids(c: Cluster) -> dict[str, dict]:
    async with c.get("/v1/models") as r:
        assert r.status == 200
        return {m["id"]: m for m in (await r.json())["data"]}


async def test_an_adapter_every_instance_serves_is_a_model_name(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, fake_kw={"lora_adapters": A1})
    status, answer = await _complete(c, "a1")
    assert status == 200, answer
    assert answer["model"] == "a1"
    # both halves of the request ran with the adapter: its KV is only valid with it
    assert [r["body"]["model"] for r in c.prefill[0].inference_requests()] == ["a1"]
    assert [r["body"]["model"] for r in c.decode[0].inference_requests()] == ["a1"]
    assert c.decode[0].inference_requests()[0]["kv_transfer_params"]
    cards = await _model_ids(c)
    assert set(cards) == {MODEL, "a1"}
    assert (cards["a1"]["parent"], cards["a1"]["root"]) == (MODEL, "/lora/a1")
    assert cards[MODEL]["parent"] is None


async def test_an_adapter_some_instance_lacks_is_refused_and_named_at_start(caplog: pytest.LogCaptureFixture) -> None:
    prefill, decode = await start_fakes(1, 2, lora_adapters=A1)
    try:
        decode[1].config.lora_adapters = {}
        cfg = SchedulerConfig(instances=specs_for(prefill, decode), startup_poll_interval=0.02, startup_timeout=5.0)
        import aiohttp

        with caplog.at_level(logging.WARNING, "pdserve.scheduler.startup"):
            async with aiohttp.ClientSession() as s:
                await prepare(s, cfg)
        assert cfg.lora_adapters == []
        warning = " ".join(r.getMessage() for r in caplog.records)
        assert "'a1'" in warning and "not by decode[1]" in warning, warning
    finally:
        for f in prefill + decode:
            await f.stop()


async def test_load_and_unload_reach_every_instance(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 2, fake_kw={"runtime_lora": True})
    assert (await _complete(c, "a2"))[0] == 404
    async with c.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "/lora/a2"}) as r:
        assert r.status == 200, await r.text()
        assert await r.text() == "Success: LoRA adapter 'a2' added successfully."
    for fake in c.all():
        assert _loads(fake) == [{"lora_name": "a2", "lora_path": "/lora/a2", "load_inplace": False}], fake.role
    assert (await _model_ids(c))["a2"]["root"] == "/lora/a2"
    status, answer = await _complete(c, "a2")
    assert status == 200, answer
    # a second load of the same name is refused by the scheduler itself, as vLLM does
    async with c.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "/lora/a2"}) as r:
        assert r.status == 400
        assert "already been loaded" in (await r.json())["error"]["message"]
    assert all(len(_loads(f)) == 1 for f in c.all())

    async with c.post("/v1/unload_lora_adapter", json={"lora_name": "a2"}) as r:
        assert r.status == 200, await r.text()
    assert all(_loads(f, "/v1/unload_lora_adapter") == [{"lora_name": "a2"}] for f in c.all())
    assert "a2" not in await _model_ids(c)
    assert (await _complete(c, "a2"))[0] == 404
    async with c.post("/v1/unload_lora_adapter", json={"lora_name": "a2"}) as r:
        assert r.status == 404
        assert (await r.json())["error"]["message"] == "The lora adapter 'a2' cannot be found."


async def test_a_load_one_instance_refuses_is_undone_everywhere(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 2, fake_kw={"runtime_lora": True})
    c.decode[1].config.lora_fail_status = 500
    async with c.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "/lora/a2"}) as r:
        assert r.status == 502
        message = (await r.json())["error"]["message"]
    assert "decode[1]" in message and "answered 500" in message, message
    assert "unloaded again" in message
    # nothing is left half-loaded: the instances that took it dropped it again
    for fake in (c.prefill[0], c.decode[0]):
        assert _loads(fake, "/v1/unload_lora_adapter") == [{"lora_name": "a2"}]
        assert fake.config.lora_adapters == {}
    assert "a2" not in await _model_ids(c)
    assert (await _complete(c, "a2"))[0] == 404


async def test_instances_without_runtime_loading_get_a_hint(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1)
    async with c.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "/lora/a2"}) as r:
        assert r.status == 404
        message = (await r.json())["error"]["message"]
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in message, message


@pytest.mark.parametrize(("body", "param"), [
    ({"lora_name": "a2"}, "lora_path"),
    ({"lora_name": "", "lora_path": "/x"}, "lora_name"),
    ({"lora_name": MODEL, "lora_path": "/x"}, "lora_name"),
    (["a2"], None),
])
async def test_bad_load_requests_are_refused_before_any_instance(make_cluster: MakeCluster, body: object,
                                                                 param: str | None) -> None:
    c = await make_cluster(1, 1, fake_kw={"runtime_lora": True})
    async with c.post("/v1/load_lora_adapter", json=body) as r:
        assert r.status == 400
        assert (await r.json())["error"]["param"] == param
    async with c.post("/v1/load_lora_adapter", data=b"{", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
    assert not any(_loads(f) for f in c.all())


async def test_the_admin_routes_need_the_api_key(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, fake_kw={"runtime_lora": True}, api_keys=["k1"])
    async with c.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "/x"}) as r:
        assert r.status == 401
    assert not any(_loads(f) for f in c.all())


async def test_a_restarted_instance_gets_the_adapters_again(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, fake_kw={"runtime_lora": True})
    async with c.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": "/lora/a2"}) as r:
        assert r.status == 200
    decode = c.decode[0]
    decode.config.healthy = False  # it restarts: gone from the pool, and what was loaded at run time is lost
    decode.config.lora_adapters.clear()
    inst = c.state.pool.decode.instances[0]
    await wait_for(lambda: not inst.healthy, what="decode marked down")
    decode.config.healthy = True
    await wait_for(lambda: "a2" in decode.config.lora_adapters, what="a2 loaded again on the decode instance")
    assert _loads(decode)[-1] == {"lora_name": "a2", "lora_path": "/lora/a2", "load_inplace": True}
    assert c.prefill[0].config.lora_adapters == {"a2": "/lora/a2"}
