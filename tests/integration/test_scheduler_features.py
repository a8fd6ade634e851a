"""Per-deployment request shaping: model aliases, default sampling parameters, a system prompt."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.integration.conftest import MODEL, Cluster, MakeCluster
from tests.integration.test_scheduler_api import sse_events

pytestmark = pytest.mark.integration


def last_body(fakes: list) -> dict[str, Any]:
    return [r for f in fakes for r in f.inference_requests()][-1]["body"]


async def post(c: Cluster, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with c.post(path, json=body) as r:
        return r.status, await r.read()


CHAT = "/v1/chat/completions"


# -- model aliases -----------------------------------------------------------------------------------
async def test_aliases_listed_forwarded_as_instance_name_answered_as_client_name(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, served_model_names=["alias-a", "alias-b"])
    assert c.cfg.upstream_model == MODEL
    async with c.get("/v1/models") as r:
        data = (await r.json())["data"]
    assert [m["id"] for m in data] == ["alias-a", "alias-b"] and {m["root"] for m in data} == {f"/models/{MODEL}"}
    status, raw = await post(c, "/v1/completions", {"model": "alias-b", "prompt": "a", "max_tokens": 2})
    assert status == 200 and json.loads(raw)["model"] == "alias-b"
    assert last_body(c.prefill)["model"] == MODEL and last_body(c.decode)["model"] == MODEL
    status, raw = await post(c, CHAT, {"model": "alias-b", "messages": [{"role": "user", "content": "x"}],
                                       "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(raw)
    assert status == 200 and {e["model"] for e in events[:-1]} == {"alias-b"}
    # no model in the request: vLLM answers with its own name; clients see the first alias
    status, raw = await post(c, "/v1/completions", {"prompt": "a", "max_tokens": 2})
    assert json.loads(raw)["model"] == "alias-a"
    assert "model" not in last_body(c.decode)


async def test_unknown_model_404_and_instance_name_not_an_alias(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, served_model_names=["alias-a"])
    for name in ("nope", MODEL):
        status, raw = await post(c, "/v1/completions", {"model": name, "prompt": "a"})
        assert status == 404 and json.loads(raw)["error"]["param"] == "model"
    assert c.calls() == 0


async def test_alias_in_generated_text_is_not_rewritten(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, served_model_names=["alias-a"])
    # the fake echoes no prompt, but a text containing the pattern would be JSON-escaped:
    # \"model\":\"fake-model\" cannot match "model":"fake-model"
    from pdserve.scheduler.relay import OpenAIRelay, dumps

    relay = c.state.relay_for("alias-a")
    assert isinstance(relay, OpenAIRelay)
    text = dumps({"model": MODEL, "choices": [{"text": dumps({"model": MODEL}).decode()}]})
    out = json.loads(relay.transform(text))
    assert out["model"] == "alias-a" and json.loads(out["choices"][0]["text"]) == {"model": MODEL}


# -- defaults ----------------------------------------------------------------------------------------
async def test_defaults_fill_missing_keys_only(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, defaults={"temperature": 0.3, "top_p": 0.9, "top_k": 20,
                                           "repetition_penalty": 1.1, "max_tokens": 3},
                           prefill_first_token=False)  # the client's body, not a continuation, goes to decode
    status, raw = await post(c, "/v1/completions", {"prompt": "a"})
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 3
    body = last_body(c.decode)
    assert (body["temperature"], body["top_p"], body["top_k"], body["repetition_penalty"], body["max_tokens"]) == \
        (0.3, 0.9, 20, 1.1, 3)
    await post(c, "/v1/completions", {"prompt": "a", "temperature": 1.0, "top_p": None, "max_tokens": 2})
    body = last_body(c.decode)
    assert body["temperature"] == 1.0 and body["top_p"] is None and body["max_tokens"] == 2  # set wins, null too
    assert body["top_k"] == 20
    await post(c, CHAT, {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2})
    body = last_body(c.decode)
    assert "max_tokens" not in body and body["max_completion_tokens"] == 2 and body["temperature"] == 0.3
    pre = last_body(c.prefill)
    assert pre["max_tokens"] == 1 and pre["temperature"] == 0.3  # the prefill call sees the same sampling


async def test_client_bytes_forwarded_untouched_without_features(make_cluster: MakeCluster) -> None:
    # the plain hand-over (with the prefill's first token on, decode gets a continuation instead)
    c = await make_cluster(1, 1, prefill_first_token=False)
    raw = b'{"prompt": "a b",   "max_tokens": 2, "temperature": 1.0e0}'
    async with c.post("/v1/completions", data=raw, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200
    (dec,) = c.decode[0].inference_requests()
    kvtp = dec["kv_transfer_params"]
    assert kvtp["remote_engine_id"] == "fake-prefill-0" and kvtp["do_remote_prefill"] is True  # the prefill's
    # the client's bytes, not re-encoded: only kv_transfer_params spliced in before the final "}"
    assert dec["raw"] == raw[:-1] + b',"kv_transfer_params":' + json.dumps(kvtp, separators=(",", ":")).encode() + b"}"


# -- system prompt -------------------------------------------------------------------------------------
SYS = "You are pdserve's assistant."


@pytest.mark.parametrize("mode, messages, expected", [
    ("if-missing", [{"role": "user", "content": "q"}],
     [{"role": "system", "content": SYS}, {"role": "user", "content": "q"}]),
    ("if-missing", [{"role": "system", "content": "own"}, {"role": "user", "content": "q"}],
     [{"role": "system", "content": "own"}, {"role": "user", "content": "q"}]),
    ("prepend", [{"role": "system", "content": "own"}, {"role": "user", "content": "q"}],
     [{"role": "system", "content": SYS}, {"role": "system", "content": "own"}, {"role": "user", "content": "q"}]),
    ("replace", [{"role": "system", "content": "own"}, {"role": "user", "content": "q"},
                 {"role": "system", "content": "late"}],
     [{"role": "system", "content": SYS}, {"role": "user", "content": "q"}]),
    ("replace", [{"role": "user", "content": "q"}],
     [{"role": "system", "content": SYS}, {"role": "user", "content": "q"}]),
])
async def test_system_prompt_modes(make_cluster: MakeCluster, mode: str, messages: list, expected: list) -> None:
    # the plain hand-over, so that the decode instance gets the shaped messages too
    c = await make_cluster(1, 1, system_prompt=SYS, system_prompt_mode=mode, prefill_first_token=False)
    status, _ = await post(c, CHAT, {"messages": messages, "max_tokens": 2})
    assert status == 200
    assert last_body(c.decode)["messages"] == expected
    assert last_body(c.prefill)["messages"] == expected
    status, _ = await post(c, "/v1/completions", {"prompt": "plain", "max_tokens": 2})
    assert status == 200 and last_body(c.decode)["prompt"] == "plain"  # completions are not touched


async def test_system_prompt_is_a_shared_prefix_cached_on_one_prefill(make_cluster: MakeCluster) -> None:
    long_sys = " ".join(f"rule{i}" for i in range(40))
    c = await make_cluster(3, 1, system_prompt=long_sys, prefix_chars=64)
    cached = []
    for i in range(5):
        status, raw = await post(c, CHAT, {"messages": [{"role": "user", "content": f"question {i}"}],
                                           "max_tokens": 2})
        assert status == 200
        cached.append(json.loads(raw)["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert sorted(len(f.inference_requests()) for f in c.prefill) == [0, 0, 5]
    assert cached[0] == 0 and all(n >= 40 for n in cached[1:])  # the system prompt's blocks hit
