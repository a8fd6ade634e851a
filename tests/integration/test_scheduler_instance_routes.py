"""Routes one instance answers for the scheduler (``/tokenize``, ``/detokenize``, ``/version``)
and ``/ping``: no KV is involved, so they need no prefill/decode pair."""

from __future__ import annotations

import pytest

from tests.integration.conftest import MODEL, MakeCluster

pytestmark = pytest.mark.integration


def _tokenize_calls(fakes: list) -> list[dict]:
    return [r["body"] for f in fakes for r in f.requests if r["path"] == "/tokenize"]


async def test_tokenize_goes_to_one_decode_instance_with_the_alias_renamed(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 2, served_model_names=["alias"], system_prompt="be brief",
                           defaults={"temperature": 0.5})
    async with c.post("/tokenize", json={"model": "alias", "prompt": "a b c"}) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    assert answer["count"] == 3 and answer["max_model_len"] == 4096
    # the instances know the model by their own name; sampling defaults are no tokenize field
    assert _tokenize_calls(c.decode) == [{"model": MODEL, "prompt": "a b c"}]
    assert _tokenize_calls(c.prefill) == []
    # messages are counted as the chat requests are sent: with the deployment's system prompt
    async with c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status == 200
        assert (await r.json())["count"] == 5  # <system> be brief <user> hi
    assert _tokenize_calls(c.decode)[-1]["messages"][0] == {"role": "system", "content": "be brief"}


async def test_tokenize_refuses_an_unknown_model_and_bad_json(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1)
    async with c.post("/tokenize", json={"model": "nope", "prompt": "a"}) as r:
        assert r.status == 404
        assert (await r.json())["error"]["message"] == "The model `nope` does not exist."
    async with c.post("/tokenize", data=b"{", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
    async with c.post("/tokenize", data=b"prompt=a") as r:
        assert r.status == 415
    assert _tokenize_calls(c.all()) == []


async def test_tokenize_falls_back_to_a_prefill_instance_and_503_without_any(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1)
    c.decode[0].config.healthy = False
    await c.state.pool.check_all(c.state.session)
    async with c.post("/tokenize", json={"prompt": "a b"}) as r:
        assert r.status == 200
    assert len(_tokenize_calls(c.prefill)) == 1
    c.prefill[0].config.healthy = False
    await c.state.pool.check_all(c.state.session)
    async with c.post("/tokenize", json={"prompt": "a b"}) as r:
        assert r.status == 503


async def test_version_is_an_instances_and_ping_is_health(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, api_keys=["k1"])
    async with c.get("/version", headers={"Authorization": "Bearer k1"}) as r:
        assert (r.status, await r.json()) == (200, {"version": "fake-decode0"})
    async with c.get("/version") as r:
        assert r.status == 401
    for method in ("GET", "POST"):  # open, like /health: load balancers carry no key
        async with c.http.request(method, c.url + "/ping") as r:
            assert r.status == 200, method
    c.decode[0].config.healthy = False
    await c.state.pool.check_all(c.state.session)
    async with c.get("/ping") as r:
        assert r.status == 503
