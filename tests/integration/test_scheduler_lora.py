"""LoRA adapters through the scheduler: named like the base model when every instance serves them
(from the same path), loaded and unloaded on every instance at once (all or nothing, one call at
a time), loaded again on a recovered instance before it takes requests, and re-read from the
instances every health interval."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from pdserve.scheduler.config import SchedulerConfig
from pdserve.scheduler.startup import prepare
from pdserve.testing.fake_instance import FakeInstance
from tests.integration.conftest import MODEL, Cluster, MakeCluster, specs_for, start_fakes, wait_for

pytestmark = pytest.mark.integration

A1 = {"a1": "/lora/a1"}
LOAD = {"lora_name": "a2", "lora_path": "/lora/a2"}


def _calls(fake: FakeInstance, path: str = "/v1/load_lora_adapter") -> list[dict]:
    return [r["body"] for r in fake.requests if r["path"] == path]


async def _complete(c: Cluster, model: str) -> tuple[int, dict]:
    async with c.post("/v1/completions", json={"model": model, "prompt": "a b c d e", "max_tokens": 3}) as r:
        return r.status, await r.json()


async def _model_ids(c: Cluster) -> dict[str, dict]:
    async with c.get("/v1/models") as r:
        assert r.status == 200
        return {m["id"]: m for m in (await r.json())["data"]}


async def _runtime(make_cluster: MakeCluster, n_prefill: int = 1, n_decode: int = 1, **kw: object) -> Cluster:
    fake_kw = {"runtime_lora": True, **kw.pop("fake_kw", {})}  # type: ignore[dict-item]
    return await make_cluster(n_prefill, n_decode, fake_kw=fake_kw, runtime_lora_updating=True, **kw)


async def _load(c: Cluster, body: dict | None = None) -> tuple[int, str]:
    async with c.post("/v1/load_lora_adapter", json=body or LOAD) as r:
        return r.status, await r.text()


async def _unload(c: Cluster, name: str = "a2") -> tuple[int, str]:
    async with c.post("/v1/unload_lora_adapter", json={"lora_name": name}) as r:
        return r.status, await r.text()


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
    # without the switch there are no load/unload routes, as in vLLM (the 404 names the switch)
    status, text = await _load(c)
    assert status == 404 and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in text
    assert not any(_calls(f) for f in c.all())


@pytest.mark.parametrize("differ", ["missing", "path"])
async def test_an_adapter_not_the_same_everywhere_is_refused_and_named_at_start(
        caplog: pytest.LogCaptureFixture, differ: str) -> None:
    prefill, decode = await start_fakes(1, 2, lora_adapters=A1)
    try:
        decode[1].config.lora_adapters = {} if differ == "missing" else {"a1": "/other/a1"}
        cfg = SchedulerConfig(instances=specs_for(prefill, decode), startup_poll_interval=0.02, startup_timeout=5.0)
        with caplog.at_level(logging.WARNING, "pdserve.scheduler.startup"):
            async with aiohttp.ClientSession() as s:
                await prepare(s, cfg)
        assert cfg.lora_adapters == []
        warning = " ".join(r.getMessage() for r in caplog.records)
        assert "'a1'" in warning, warning
        assert ("not by decode[1]" if differ == "missing" else "from different paths") in warning, warning
    finally:
        for f in prefill + decode:
            await f.stop()


async def test_load_and_unload_reach_every_instance(make_cluster: MakeCluster) -> None:
    c = await _runtime(make_cluster, 1, 2)
    assert (await _complete(c, "a2"))[0] == 404
    assert await _load(c) == (200, "Success: LoRA adapter 'a2' added successfully.")
    for fake in c.all():
        assert _calls(fake) == [{**LOAD, "load_inplace": False}], fake.role
    assert (await _model_ids(c))["a2"]["root"] == "/lora/a2"
    status, answer = await _complete(c, "a2")
    assert status == 200, answer
    # a second load of the same name is refused by the scheduler itself, as vLLM does
    status, text = await _load(c)
    assert status == 400 and "already been loaded" in text
    assert all(len(_calls(f)) == 1 for f in c.all())

    async with c.get("/metrics") as r:
        assert 'model="a2"' in await r.text()
    assert await _unload(c) == (200, "Success: LoRA adapter 'a2' removed successfully.")
    assert all(_calls(f, "/v1/unload_lora_adapter") == [{"lora_name": "a2"}] for f in c.all())
    assert "a2" not in await _model_ids(c)
    assert (await _complete(c, "a2"))[0] == 404
    async with c.get("/metrics") as r:  # an unloaded adapter's series go: loads cannot grow the label set
        assert 'model="a2"' not in await r.text()
    status, text = await _unload(c)
    assert status == 404 and "The lora adapter 'a2' cannot be found." in text


async def test_a_load_one_instance_refuses_is_undone_everywhere(make_cluster: MakeCluster) -> None:
    c = await _runtime(make_cluster, 1, 2)
    c.decode[1].config.lora_fail_status = 500
    status, text = await _load(c)
    assert status == 500, text  # the one failure's own status
    assert "decode[1]" in text and "answered 500" in text and "unloaded again" in text, text
    # nothing is left half-loaded: the instances that took it dropped it again
    for fake in (c.prefill[0], c.decode[0]):
        assert _calls(fake, "/v1/unload_lora_adapter") == [{"lora_name": "a2"}]
        assert fake.config.lora_adapters == {}
    assert "a2" not in await _model_ids(c)
    assert (await _complete(c, "a2"))[0] == 404


async def test_a_failed_undo_is_reported_not_hidden(make_cluster: MakeCluster) -> None:
    c = await _runtime(make_cluster, 1, 1)
    c.decode[0].config.lora_fail_status = 500
    c.prefill[0].config.lora_unload_fail_status = 500
    status, text = await _load(c)
    assert status == 500
    assert "Unloading it again failed on: prefill[0]" in text and "by hand" in text, text
    assert "It was unloaded again" not in text, text
    assert c.prefill[0].config.lora_adapters == {"a2": "/lora/a2"}  # really still there, as the message says


async def test_an_instance_that_already_has_the_name_gets_the_asked_for_weights(make_cluster: MakeCluster) -> None:
    """Left over from a load that timed out there, or given at its start: not served (not on every
    instance), so a load through the scheduler replaces it rather than failing for ever."""
    c = await _runtime(make_cluster, 1, 1)
    c.decode[0].config.lora_adapters["a2"] = "/stale/a2"
    assert (await _load(c))[0] == 200
    assert _calls(c.decode[0])[-1] == {**LOAD, "load_inplace": True}
    assert c.decode[0].config.lora_adapters == c.prefill[0].config.lora_adapters == {"a2": "/lora/a2"}


async def test_an_instance_that_gives_no_answer_in_time_is_unloaded_too(make_cluster: MakeCluster) -> None:
    c = await _runtime(make_cluster, 1, 1, prefill_timeout=0.3)
    c.decode[0].config.lora_load_delay = 0.1
    c.prefill[0].config.lora_fail_status = 500
    status, text = await _load(c)
    assert status == 500
    # decode answered 200 in time: undone; now the other way round: decode times out
    assert _calls(c.decode[0], "/v1/unload_lora_adapter") == [{"lora_name": "a2"}]
    c.prefill[0].config.lora_fail_status = None
    c.decode[0].config.lora_load_delay = 0.6
    status, text = await _load(c)
    assert status == 502 and "decode[0]" in text and "gave no answer" in text, text
    assert len(_calls(c.decode[0], "/v1/unload_lora_adapter")) == 2  # asked to unload what may finish later
    await wait_for(lambda: "a2" in c.decode[0].config.lora_adapters, what="the slow load finishing")
    # a later load is not refused for ever by the leftover: it gets the weights in place
    c.decode[0].config.lora_load_delay = 0.0
    assert (await _load(c))[0] == 200
    assert "a2" in await _model_ids(c)


async def test_instances_without_runtime_loading_get_a_hint(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, runtime_lora_updating=True)
    status, text = await _load(c)
    assert status == 404
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in text, text


@pytest.mark.parametrize(("body", "param"), [
    ({"lora_name": "a2"}, "lora_path"),
    ({"lora_name": "", "lora_path": "/x"}, "lora_name"),
    ({"lora_name": MODEL, "lora_path": "/x"}, "lora_name"),
    (["a2"], None),
])
async def test_bad_load_requests_are_refused_before_any_instance(make_cluster: MakeCluster, body: object,
                                                                 param: str | None) -> None:
    c = await _runtime(make_cluster)
    async with c.post("/v1/load_lora_adapter", json=body) as r:
        assert r.status == 400
        assert (await r.json())["error"]["param"] == param
    async with c.post("/v1/load_lora_adapter", data=b"{", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
    assert not any(_calls(f) for f in c.all())


async def test_the_admin_routes_need_the_api_key(make_cluster: MakeCluster) -> None:
    c = await _runtime(make_cluster, api_keys=["k1"])
    assert (await _load(c))[0] == 401
    assert not any(_calls(f) for f in c.all())


async def test_concurrent_calls_run_one_at_a_time(make_cluster: MakeCluster) -> None:
    """Two loads of one name: one wins, the other is told it is loaded; a load and an unload:
    whatever the order, the instances and the scheduler agree afterwards."""
    c = await _runtime(make_cluster, 1, 2, fake_kw={"lora_load_delay": 0.05})
    results = await asyncio.gather(_load(c), _load(c))
    assert sorted(s for s, _ in results) == [200, 400]
    assert all(f.config.lora_adapters == {"a2": "/lora/a2"} for f in c.all())
    await asyncio.gather(_unload(c), _load(c, {"lora_name": "a3", "lora_path": "/lora/a3"}), _unload(c, "a3"))
    listed = set(await _model_ids(c)) - {MODEL}
    for f in c.all():
        assert set(f.config.lora_adapters) == listed, (f.role, f.index)


async def test_a_client_that_leaves_mid_load_does_not_stop_it(make_cluster: MakeCluster) -> None:
    """The scheduler cancels the handler of a client that hangs up; the load goes on regardless."""
    from pdserve.scheduler.adapters import LoadRequest

    c = await _runtime(make_cluster, fake_kw={"lora_load_delay": 0.3}, health_interval=0)  # no refresh
    handler = asyncio.ensure_future(c.state.adapters.load(LoadRequest(**LOAD)))
    await wait_for(lambda: all(_calls(f) for f in c.all()), what="the load sent")
    handler.cancel()
    # the load finished on both instances, and the scheduler knows it
    await wait_for(lambda: c.state.adapters.served.get("a2") is not None, what="the load recorded")
    assert all(f.config.lora_adapters == {"a2": "/lora/a2"} for f in c.all())
    assert handler.cancelled()


async def test_a_recovered_instance_gets_the_adapters_before_requests(make_cluster: MakeCluster) -> None:
    c = await _runtime(make_cluster, health_interval=0)  # health checks driven by hand below
    pool, session = c.state.pool, c.state.session
    assert (await _load(c))[0] == 200
    decode, inst = c.decode[0], pool.decode.instances[0]
    decode.config.healthy = False  # it restarts: out of the pool, and what was loaded at run time is lost
    decode.config.lora_adapters.clear()
    assert not await pool.check_one(session, inst)
    decode.config.healthy = True
    assert await pool.check_one(session, inst) and inst.healthy
    # back in the pool only once it has the adapter again: no request meets it without
    assert decode.config.lora_adapters == {"a2": "/lora/a2"}
    assert _calls(decode)[-1] == {**LOAD, "load_inplace": False}
    assert len(_calls(c.prefill[0])) == 1  # the healthy prefill instance was left alone
    assert (await _complete(c, "a2"))[0] == 200


async def test_refresh_repairs_a_lost_adapter_and_forgets_one_unloaded_everywhere(make_cluster: MakeCluster) -> None:
    c = await _runtime(make_cluster, 1, 2, health_interval=0)
    adapters = c.state.adapters
    assert (await _load(c))[0] == 200
    c.decode[1].config.lora_adapters.clear()  # restarted between two health checks
    await adapters.refresh()
    assert c.decode[1].config.lora_adapters == {"a2": "/lora/a2"}
    assert "a2" in adapters.served
    for f in c.all():  # another scheduler replica unloaded it
        f.config.lora_adapters.clear()
    await adapters.refresh()
    assert "a2" not in adapters.served and "a2" not in adapters.loaded_here
    assert all(f.config.lora_adapters == {} for f in c.all())  # not loaded back against the other replica


async def test_adapters_loaded_elsewhere_are_seen_and_lost_ones_refused(make_cluster: MakeCluster) -> None:
    """Another scheduler replica, or an operator on the instances, loads and unloads adapters too
    (the health loop re-reads them)."""
    c = await make_cluster(1, 2)
    for f in c.all():
        f.config.lora_adapters["ext"] = "/lora/ext"
    await wait_for(lambda: c.state.adapters.served.get("ext") is not None, what="ext seen")
    assert (await _complete(c, "ext"))[0] == 200
    c.decode[1].config.lora_adapters.clear()
    await wait_for(lambda: "ext" not in c.state.adapters.served, what="ext refused")
    assert (await _complete(c, "ext"))[0] == 404


async def test_a_slow_reload_keeps_the_instance_out_without_stalling_health_checks(
        make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    import pdserve.scheduler.pool as pool_module

    monkeypatch.setattr(pool_module, "REJOIN_TIMEOUT", 0.1)
    c = await _runtime(make_cluster, health_interval=0)
    pool, session = c.state.pool, c.state.session
    assert (await _load(c))[0] == 200
    decode, inst = c.decode[0], pool.decode.instances[0]
    decode.config.healthy = False
    decode.config.lora_adapters.clear()
    assert not await pool.check_one(session, inst)
    decode.config.healthy, decode.config.lora_load_delay = True, 0.3
    assert not await pool.check_one(session, inst)  # its reload outlasted the bound: still out
    assert not inst.healthy
    await wait_for(lambda: "a2" in decode.config.lora_adapters, what="the slow reload finishing")
    assert await pool.check_one(session, inst) and inst.healthy  # has it now: rejoins at once
