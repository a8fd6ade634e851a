"""Every endpoint, stream and non-stream, n>1, the kv_transfer_params hand-over, usage, request ids."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pdserve.testing.fake_instance import OUTPUT_ID_BASE
from tests.integration.conftest import MODEL, Cluster, MakeCluster

pytestmark = pytest.mark.integration


def sse_events(raw: bytes) -> list[Any]:
    """Parse an SSE body into JSON objects and the literal "[DONE]"."""
    assert raw.endswith(b"\n\n"), raw[-50:]
    out: list[Any] = []
    for ev in raw.split(b"\n\n"):
        if not ev:
            continue
        assert ev.startswith(b"data: "), ev
        payload = ev[6:]
        out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


def one(fakes: list) -> Any:
    reqs = [r for f in fakes for r in f.inference_requests()]
    assert len(reqs) == 1, reqs
    return reqs[0]


async def test_completion_non_stream(cluster: Cluster) -> None:
    body = {"model": MODEL, "prompt": "hello there world", "max_tokens": 5, "temperature": 0.3,
            "custom_vllm_field": {"x": [1, 2]}}
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with cluster.post("/v1/completions", json=body,
                            headers={"X-Request-Id": "rid-123", "traceparent": trace}) as r:
        assert r.status == 200
        assert r.headers["X-Request-Id"] == "rid-123"
        data = await r.json()
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == "".join(f" c0t{k}" for k in range(5))
    assert data["usage"]["prompt_tokens"] == 3
    assert data["usage"]["completion_tokens"] == 5
    pre, dec = one(cluster.prefill), one(cluster.decode)
    # prefill call: 1 token, no stream, asks for remote decode
    assert pre["body"]["max_tokens"] == 1 and pre["body"]["stream"] is False
    assert pre["body"]["kv_transfer_params"]["do_remote_decode"] is True
    assert pre["body"]["custom_vllm_field"] == {"x": [1, 2]}
    # decode call: the original request + exactly what prefill returned
    assert dec["body"]["max_tokens"] == 5 and dec["body"]["temperature"] == 0.3
    assert dec["body"]["custom_vllm_field"] == {"x": [1, 2]}
    assert dec["kv_transfer_params"]["remote_engine_id"].startswith("fake-prefill-")
    assert dec["kv_transfer_params"]["remote_request_id"] == "rid-123"
    # one request id through both instances
    assert pre["request_id"] == dec["request_id"] == "rid-123"
    assert pre["traceparent"] == dec["traceparent"] == trace  # both calls under the client's trace


async def test_decode_gets_exactly_prefill_kv_params(cluster: Cluster) -> None:
    for fake in cluster.prefill:  # make the params distinctive
        fake.config.block_size = 2
    async with cluster.post("/v1/completions", json={"prompt": "a b c d e", "max_tokens": 2}) as r:
        assert r.status == 200
    pre, dec = one(cluster.prefill), one(cluster.decode)
    prefill_fake = next(f for f in cluster.prefill if f.inference_requests())
    expected = {"do_remote_prefill": True, "do_remote_decode": False,
                "remote_engine_id": f"fake-prefill-{prefill_fake.index}", "remote_block_ids": [0, 1, 2],
                "remote_host": "127.0.0.1", "remote_port": 20000 + prefill_fake.index,
                "remote_request_id": pre["request_id"], "tp_size": 1}
    assert dec["kv_transfer_params"] == expected


async def test_request_id_generated_when_absent(cluster: Cluster) -> None:
    async with cluster.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}) as r:
        rid = r.headers["X-Request-Id"]
        assert r.status == 200
    assert len(rid) >= 16
    assert one(cluster.prefill)["request_id"] == one(cluster.decode)["request_id"] == rid


async def test_completion_stream_with_usage(cluster: Cluster) -> None:
    body = {"model": MODEL, "prompt": "one two three four", "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}, "min_tokens": 2}
    async with cluster.post("/v1/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = await r.read()
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    texts = [e["choices"][0]["text"] for e in events[:-2]]
    assert texts == [f" c0t{k}" for k in range(4)]
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 4
    usage = events[-2]["usage"]
    assert usage["prompt_tokens"] == 4 and usage["total_tokens"] == 8  # the prefill's token counted as output
    pre = one(cluster.prefill)["body"]
    assert pre["stream"] is False and "stream_options" not in pre and "min_tokens" not in pre
    assert pre["return_token_ids"] is True  # to continue after the prefill's token
    dec = one(cluster.decode)["body"]
    assert dec["stream"] is True and dec["stream_options"] == {"include_usage": True}
    # the first token came from the prefill; the decode instance continues after it
    assert dec["prompt"][-1] == OUTPUT_ID_BASE and len(dec["prompt"]) == 5
    assert dec["max_tokens"] == 3 and dec["min_tokens"] == 1


async def test_completion_stream_plain_handover_when_disabled(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, prefill_first_token=False)
    body = {"model": MODEL, "prompt": "one two three four", "max_tokens": 4, "stream": True, "min_tokens": 2}
    async with c.post("/v1/completions", json=body) as r:
        events = sse_events(await r.read())
    assert [e["choices"][0]["text"] for e in events[:-1]] == [f" c0t{k}" for k in range(4)]
    assert "return_token_ids" not in one(c.prefill)["body"]
    dec = one(c.decode)["body"]
    assert dec["prompt"] == "one two three four" and dec["max_tokens"] == 4 and dec["min_tokens"] == 2


async def test_chat_non_stream_and_stream(cluster: Cluster) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    async with cluster.post("/v1/chat/completions",
                            json={"model": MODEL, "messages": msgs, "max_completion_tokens": 3}) as r:
        assert r.status == 200
        data = await r.json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"] == " c0t0 c0t1 c0t2"
    pre = [r for f in cluster.prefill for r in f.inference_requests()][-1]["body"]
    assert pre["max_completion_tokens"] == 1 and pre["max_tokens"] == 1
    async with cluster.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 2, "stream": True,
                                                          "stream_options": {"include_usage": True}}) as r:
        assert r.status == 200
        events = sse_events(await r.read())
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [e["choices"][0]["delta"]["content"] for e in events[1:3]] == [" c0t0", " c0t1"]
    assert events[-2]["usage"]["completion_tokens"] == 2 and events[-1] == "[DONE]"


@pytest.mark.parametrize("stream", [False, True])
async def test_n_greater_than_one(cluster: Cluster, stream: bool) -> None:
    body = {"prompt": "p q", "max_tokens": 2, "n": 3, "best_of": 4, "stream": stream}
    async with cluster.post("/v1/completions", json=body) as r:
        assert r.status == 200
        raw = await r.read()
    if stream:
        idx = {e["choices"][0]["index"] for e in sse_events(raw) if e != "[DONE]"}
        assert idx == {0, 1, 2}
    else:
        assert [c["index"] for c in json.loads(raw)["choices"]] == [0, 1, 2]
    pre, dec = one(cluster.prefill)["body"], one(cluster.decode)["body"]
    assert pre["n"] == 1 and "best_of" not in pre
    assert dec["n"] == 3 and dec["best_of"] == 4


async def test_usage_cached_tokens_from_prefill(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1)
    prompt = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"  # 10 tokens; fake block size 4
    usages = []
    for stream in (False, True, False):
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": 2, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        async with c.post("/v1/completions", json=body) as r:
            raw = await r.read()
        usages.append(sse_events(raw)[-2]["usage"] if stream else json.loads(raw)["usage"])
    # first request: nothing cached on prefill (decode alone would claim all 10 prompt tokens)
    assert usages[0] == {"prompt_tokens": 10, "total_tokens": 12, "completion_tokens": 2,
                         "prompt_tokens_details": {"cached_tokens": 0}}
    # repeats: prefill's prefix cache holds 2 full blocks
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] == 8
    assert usages[2]["prompt_tokens_details"]["cached_tokens"] == 8


async def test_prefill_without_kv_params_decodes_plainly(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, fake_kw={"return_kv_params": False, "require_kv_params": False})
    async with c.post("/v1/completions", json={"prompt": "a b", "max_tokens": 3}) as r:
        assert r.status == 200
        assert (await r.json())["usage"]["completion_tokens"] == 3
    dec = one(c.decode)
    assert "kv_transfer_params" not in dec["body"]


async def test_models_health_metrics(cluster: Cluster) -> None:
    async with cluster.get("/v1/models") as r:
        data = await r.json()
    assert [m["id"] for m in data["data"]] == [MODEL]  # learned from the instances' identity
    card = data["data"][0]
    assert card["max_model_len"] == 4096  # learned from the instances' /v1/models
    # vLLM's card: owner and root (the model path) from the instances, one permission entry
    assert (card["owned_by"], card["root"], card["object"]) == ("fake", f"/models/{MODEL}", "model")
    assert [p["object"] for p in card["permission"]] == ["model_permission"]
    assert card["permission"][0]["id"].startswith("modelperm-")
    async with cluster.get("/health") as r:
        assert r.status == 200
    async with cluster.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "stream": True}) as r:
        await r.read()
    async with cluster.get("/metrics") as r:
        text = await r.text()
    for name in ("pdserve_scheduler_requests_total", "pdserve_scheduler_time_to_first_token_seconds",
                 "pdserve_scheduler_inter_token_latency_seconds", "pdserve_scheduler_e2e_request_latency_seconds",
                 "pdserve_scheduler_prefill_seconds", "pdserve_scheduler_queue_length",
                 "pdserve_scheduler_instance_inflight_requests", "pdserve_scheduler_instance_healthy",
                 "pdserve_scheduler_retries_total", "pdserve_scheduler_completion_tokens_total"):
        assert name in text, name
    # no "model" in the request: counted under the name the answer carries
    assert f'pdserve_scheduler_requests_total{{endpoint="completions",model="{MODEL}",status="200"}} 1.0' in text


async def test_generate_api(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, use_openai=False, served_model_names=[MODEL])
    async with c.post("/v1/completions", json={"prompt": "x"}) as r:
        assert r.status == 404  # USE_OPENAI=0: only /generate
    async with c.post("/generate", json={"prompt": "Hi", "max_tokens": 3, "n": 2, "temperature": 0}) as r:
        assert r.status == 200
        assert await r.json() == {"text": ["Hi c0t0 c0t1 c0t2", "Hi c1t0 c1t1 c1t2"]}
    dec = one(c.decode)
    assert dec["path"] == "/v1/completions" and dec["body"]["model"] == MODEL and dec["body"]["n"] == 2
    async with c.post("/generate", json={"prompt": "Hi", "max_tokens": 2, "stream": True}) as r:
        assert r.status == 200
        raw = await r.read()
    chunks = [json.loads(x) for x in raw.split(b"\0") if x]
    assert chunks == [{"text": ["Hi c0t0"]}, {"text": ["Hi c0t0 c0t1"]}]


async def test_continuous_usage_stream_passes(cluster: Cluster) -> None:
    body = {"prompt": "a b c", "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    async with cluster.post("/v1/completions", json=body) as r:
        events = sse_events(await r.read())
    assert all("usage" in e for e in events[:-1]) and events[-1] == "[DONE]"
    # as vLLM: the cached tokens only in the final usage chunk, not in every per-chunk usage
    assert [("prompt_tokens_details" in e["usage"]) for e in events[:-1]] == [False] * (len(events) - 2) + [True]
