"""API keys: who may call the scheduler, what reaches the instances, and that keys never get logged."""

from __future__ import annotations

import json
import logging

import pytest

from pdserve.scheduler.auth import ApiKeys
from tests.integration.conftest import Cluster, MakeCluster

pytestmark = pytest.mark.integration

KEY, KEY2, INSTANCE_KEY = "sk-client-secret-1", "sk-client-secret-2", "sk-instance-secret"
BODY = {"prompt": "a b", "max_tokens": 2}


async def keyed(make_cluster: MakeCluster, **kw: object) -> Cluster:
    return await make_cluster(1, 1, api_keys=[KEY, KEY2], **kw)


async def status_of(c: Cluster, path: str, headers: dict[str, str] | None = None, get: bool = False) -> tuple[int, dict]:
    call = c.get(path, headers=headers or {}) if get else c.post(path, json=BODY, headers=headers or {})
    async with call as r:
        raw = await r.read()
        return r.status, (json.loads(raw) if raw and r.content_type == "application/json" else {})


async def test_missing_and_wrong_key_401_openai_style(make_cluster: MakeCluster) -> None:
    c = await keyed(make_cluster)
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"},
                    {"x-api-key": "nope"}, {"Authorization": "Bearer"}):
        status, body = await status_of(c, "/v1/completions", headers)
        assert status == 401, headers
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == 401 and body["error"]["type"] == "AuthenticationError"
        assert "nope" not in body["error"]["message"] and KEY not in body["error"]["message"]
    assert c.calls() == 0  # nothing reached an instance
    status, _ = await status_of(c, "/v1/models", get=True)
    assert status == 401
    status, _ = await status_of(c, "/pdserve/v1/instances", get=True)
    assert status == 401


async def test_bearer_and_x_api_key_accepted_every_key(make_cluster: MakeCluster) -> None:
    c = await keyed(make_cluster)
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"Authorization": f"bearer {KEY2}"}, {"x-api-key": KEY}):
        status, body = await status_of(c, "/v1/completions", headers)
        assert status == 200, body
    status, _ = await status_of(c, "/v1/models", {"Authorization": f"Bearer {KEY}"}, get=True)
    assert status == 200


async def test_health_and_metrics_stay_open_unless_protected(make_cluster: MakeCluster) -> None:
    c = await keyed(make_cluster)
    assert (await status_of(c, "/health", get=True))[0] == 200
    assert (await status_of(c, "/metrics", get=True))[0] == 200
    c2 = await keyed(make_cluster, protect_metrics=True)
    assert (await status_of(c2, "/health", get=True))[0] == 200
    assert (await status_of(c2, "/metrics", get=True))[0] == 401
    assert (await status_of(c2, "/metrics", {"Authorization": f"Bearer {KEY}"}, get=True))[0] == 200
    async with c2.get("/metrics", headers={"x-api-key": KEY}) as r:
        assert 'pdserve_scheduler_rejected_total{status="401"} 1.0' in await r.text()


async def test_no_keys_configured_everything_open(cluster: Cluster) -> None:
    status, _ = await status_of(cluster, "/v1/completions", {"Authorization": "Bearer anything"})
    assert status == 200
    # and the client's Authorization header is not forwarded
    assert all(r["authorization"] is None for f in cluster.all() for r in f.inference_requests())


async def test_client_key_stripped_instance_key_sent(make_cluster: MakeCluster) -> None:
    c = await keyed(make_cluster, instance_api_key=INSTANCE_KEY, fake_kw={"api_key": INSTANCE_KEY})
    for stream in (False, True):
        async with c.post("/v1/completions", json={**BODY, "stream": stream},
                          headers={"Authorization": f"Bearer {KEY}", "x-api-key": KEY}) as r:
            assert r.status == 200, await r.text()
            await r.read()
    recs = [r for f in c.all() for r in f.inference_requests()]
    assert len(recs) == 4
    assert {r["authorization"] for r in recs} == {f"Bearer {INSTANCE_KEY}"}
    assert {r["x_api_key"] for r in recs} == {None}


async def test_instances_with_key_but_scheduler_without_is_a_502_naming_the_flag(make_cluster: MakeCluster) -> None:
    """The operator forgot --instance-api-key: not the client's credentials, so no 401."""
    c = await make_cluster(1, 1, fake_kw={"api_key": INSTANCE_KEY}, max_model_len=4096)
    async with c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}) as r:
        assert r.status == 502
        message = (await r.json())["error"]["message"]
    assert "prefill instance" in message and "--instance-api-key" in message


async def test_keys_never_logged(make_cluster: MakeCluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    c = await keyed(make_cluster, instance_api_key=INSTANCE_KEY, fake_kw={"api_key": INSTANCE_KEY})
    heads = [{"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY2}, {"Authorization": "Bearer wrong-secret-xyz"}]
    for h in heads:
        await status_of(c, "/v1/completions", h)
    async with c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                    "stream": True, "max_tokens": 2},
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        await r.read()
    access = [r for r in caplog.records if r.name == "pdserve.scheduler.access"]
    assert len(access) == 4 and sum('"status":401' in r.getMessage() for r in access) == 1
    text = "\n".join(r.getMessage() for r in caplog.records) + repr(c.cfg) + repr(c.state.keys)
    for secret in (KEY, KEY2, INSTANCE_KEY, "wrong-secret-xyz"):
        assert secret not in text
    assert "authorization" not in text.lower()


def test_every_key_compared_no_early_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    keys = ApiKeys(["k1", "k2", "k3", "k4"])
    monkeypatch.setattr("pdserve.scheduler.auth.hmac.compare_digest", counting)
    assert keys.valid("k1") and keys.valid("k4") and not keys.valid("k5")
    assert len(calls) == 12  # 4 comparisons each, whether the first key matched or none did
