"""Streams open with the prefill instance's token; the decode instance continues after it.

The fake decode instance numbers its tokens on from the output token a token-id prompt ends with,
so a correct continuation reads " c0t0 c0t1 ..." exactly as the plain hand-over does.
"""

from __future__ import annotations

import json

import pytest

from pdserve.testing.fake_instance import OUTPUT_ID_BASE
from tests.integration.conftest import MODEL, Cluster, MakeCluster
from pdserve.kv import messages as m
from tests.integration.test_scheduler_api import sse_events
from tests.integration.test_scheduler_lease_release import received, side_channel  # noqa: F401 (fixture)
from tests.integration.test_scheduler_reliability import post, reqs

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"


def texts(events: list) -> list[str]:
    return [e["choices"][0]["text"] for e in events if e != "[DONE]" and e.get("choices")]


async def metric_line(c: Cluster, name: str) -> str:
    async with c.get("/metrics") as r:
        return next(line for line in (await r.text()).splitlines() if line.startswith(name))


async def test_completion_stream_continues_after_prefill_token(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1)
    c.decode[0].configure(ttft=0.3)  # the hand-over is slow; the first token must not wait for it
    async with c.post("/v1/completions", json={"model": MODEL, "prompt": "a b c", "max_tokens": 5,
                                               "stream": True, "temperature": 0}) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        first = await r.content.readuntil(b"\n\n")
        assert reqs(c.decode) == [] or reqs(c.decode)[0]["tokens_sent"] == 0  # decode has sent nothing yet
        rest = await r.read()
    events = sse_events(first + rest)
    assert texts(events) == [f" c0t{k}" for k in range(5)]
    assert events[0]["id"] == events[1]["id"] == f"cmpl-{r.headers['X-Request-Id']}"
    dec = reqs(c.decode)[0]["body"]
    assert dec["prompt"][-1] == OUTPUT_ID_BASE and dec["max_tokens"] == 4 and dec["temperature"] == 0
    assert dec["kv_transfer_params"]["remote_request_id"] == r.headers["X-Request-Id"]
    assert dec["return_token_ids"] is True  # recorded (to resume elsewhere), hidden from the client
    assert all(e["choices"][0]["token_ids"] is None for e in events if e != "[DONE]" and e.get("choices"))
    assert (await metric_line(c, "pdserve_scheduler_first_token_from_prefill_total")).endswith(" 1.0")


async def test_chat_stream_rebuilt_from_the_completion_stream(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, served_model_names=["alias"])
    body = {"model": "alias", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    status, raw, headers = await post(c, body, CHAT)
    assert status == 200, raw
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    rid = next(v for k, v in headers.items() if k.lower() == "x-request-id")
    assert {e["id"] for e in chunks} == {f"chatcmpl-{rid}"}
    assert {e["object"] for e in chunks} == {"chat.completion.chunk"}
    assert {e["model"] for e in chunks} == {"alias"}  # the client's name, also on the rebuilt chunks
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [e["choices"][0]["delta"]["content"] for e in chunks[1:] if e["choices"]]
    assert content == [" c0t0", " c0t1", " c0t2"]
    assert [e["choices"][0]["finish_reason"] for e in chunks[1:] if e["choices"]] == [None, None, "length"]
    # continuous usage counts the prefill's token as output all along
    assert [e["usage"]["completion_tokens"] for e in chunks[1:]] == [1, 2, 3, 3]
    assert {e["usage"]["prompt_tokens"] for e in chunks} == {3}
    dec = reqs(c.decode)[0]
    assert dec["path"] == "/v1/completions" and dec["body"]["model"] == MODEL
    assert "messages" not in dec["body"] and dec["body"]["max_tokens"] == 2


@pytest.mark.parametrize("extra", [
    {"stop": ["x"]}, {"logprobs": 1}, {"n": 2}, {"temperature": 0.7, "seed": 3},
    {"frequency_penalty": 0.5}, {"response_format": {"type": "json_object"}},
    {"some_new_vllm_field": True},
])
async def test_requests_that_cannot_continue_take_the_plain_handover(make_cluster: MakeCluster, extra: dict) -> None:
    c = await make_cluster(1, 1)
    body = {"model": MODEL, "prompt": "a b c", "max_tokens": 3, "stream": True, **extra}
    status, raw, _ = await post(c, body)
    assert status == 200, raw
    assert "return_token_ids" not in reqs(c.prefill)[0]["body"]
    assert reqs(c.decode)[0]["body"]["prompt"] == "a b c"


async def test_chat_with_images_or_tools_takes_the_plain_handover(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1)
    image = [{"type": "text", "text": "what is it"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for body in ({"messages": [{"role": "user", "content": image}]},
                 {"messages": [{"role": "user", "content": "x"}], "tools": tools}):
        status, raw, _ = await post(c, {"model": MODEL, "max_tokens": 3, "stream": True, **body}, CHAT)
        assert status == 200, raw
    assert all(r["path"] == CHAT for r in reqs(c.decode))


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"prompt": "a", "max_tokens": 3}),  # the first token was a stop token
    (CHAT, {"messages": [{"role": "user", "content": "a"}], "max_tokens": 3,
            "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "stream_options": {"include_usage": True}}),
])
async def test_a_stream_that_its_first_token_ends_is_the_prefills_answer(
        make_cluster: MakeCluster, side_channel, path: str, body: dict) -> None:
    """No decode instance recomputes the token (a near-tie could flip): the client gets the
    prefill's answer as vLLM streams it, and the prefill's KV lease is released at once."""
    sock, port = side_channel
    c = await make_cluster(1, 1, fake_kw={"kv_port": port})
    if body["max_tokens"] > 1:
        c.prefill[0].configure(output_tokens=0)  # finish_reason "stop"
    status, raw, headers = await post(c, {"model": MODEL, "stream": True, **body}, path)
    assert status == 200, raw
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and reqs(c.decode) == []
    ends = [e["choices"][0] for e in events[:-1] if e["choices"] and e["choices"][0].get("finish_reason")]
    assert [e["finish_reason"] for e in ends] == ["stop" if body["max_tokens"] > 1 else "length"]
    if "stream_options" in body:
        usage = events[-2]["usage"]
        # the prefill's own count (the fake counts none for its stop; vLLM counts the EOS)
        assert events[-2]["choices"] == [] and usage["completion_tokens"] == (0 if body["max_tokens"] > 1 else 1)
    got = await received(sock, 1.0)
    request_id = next(v for k, v in headers.items() if k.lower() == "x-request-id")
    assert [(type(x), x.req_id) for x in got] == [(m.Release, request_id)]
    assert (await metric_line(c, "pdserve_scheduler_first_token_from_prefill_total")).endswith(" 1.0")


async def test_decode_failure_after_the_first_token_retried_without_a_new_prefill(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 2, decode_policy="round-robin")
    c.decode[0].configure(fail_status=500)
    c.decode[1].configure(require_kv_params=False)
    status, raw, _ = await post(c, {"model": MODEL, "prompt": "r s", "max_tokens": 3, "stream": True})
    assert status == 200, raw
    assert texts(sse_events(raw)) == [" c0t0", " c0t1", " c0t2"]
    assert len(reqs(c.prefill)) == 1  # the client has the token: no second prefill
    retry = c.decode[1].inference_requests()[0]["body"]
    # the KV lease may be spent: the decode instance computes prompt + token itself
    assert "kv_transfer_params" not in retry and retry["prompt"][-1] == OUTPUT_ID_BASE


@pytest.mark.parametrize("failure", ["timeout", "4xx", "5xx"])
async def test_decode_failure_after_the_first_token_ends_the_stream_with_an_error(
        make_cluster: MakeCluster, failure: str) -> None:
    c = await make_cluster(1, 1, first_token_timeout=0.3, retries=0)
    if failure == "timeout":
        c.decode[0].configure(ttft=3)
    else:
        c.decode[0].configure(fail_status=400 if failure == "4xx" else 503)
    status, raw, _ = await post(c, {"model": MODEL, "prompt": "x", "max_tokens": 3, "stream": True})
    assert status == 200  # the stream had started with the prefill's token
    events = sse_events(raw)
    assert texts(events) == [" c0t0"] and events[-1] == "[DONE]"
    err = events[-2]["error"]
    want = {"timeout": "--first-token-timeout", "4xx": "injected failure 400", "5xx": "HTTP 503"}[failure]
    assert want in err["message"], err
    assert err["code"] == {"timeout": 504, "4xx": 400, "5xx": 502}[failure]


async def test_access_log_and_usage_count_the_prefill_token_as_output(make_cluster: MakeCluster, caplog) -> None:  # type: ignore[no-untyped-def]
    c = await make_cluster(1, 1)
    with caplog.at_level("INFO", logger="pdserve.scheduler.access"):
        status, raw, _ = await post(c, {"model": MODEL, "prompt": "a b c d e f", "max_tokens": 4, "stream": True,
                                        "stream_options": {"include_usage": True}})
    assert status == 200
    usage = sse_events(raw)[-2]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (6, 4, 10)
    line = next(json.loads(r.getMessage()) for r in caplog.records if r.name == "pdserve.scheduler.access")
    assert line["prompt_tokens"] == 6 and line["completion_tokens"] == 4
    assert line["ttft_ms"] <= line["e2e_ms"]


async def test_no_per_chunk_usage_without_include_usage(make_cluster: MakeCluster) -> None:
    """As vLLM: continuous_usage_stats alone adds no usage, also to the chunk built from the prefill."""
    c = await make_cluster(1, 1)
    body = {"model": MODEL, "prompt": "a b c", "max_tokens": 3, "stream": True,
            "stream_options": {"continuous_usage_stats": True}}
    status, raw, _ = await post(c, body)
    assert status == 200, raw
    events = sse_events(raw)
    assert texts(events) == [" c0t0", " c0t1", " c0t2"]
    assert events[0]["choices"][0]["text"] == " c0t0" and "usage" not in events[0]


@pytest.mark.parametrize("path", ["/v1/completions", CHAT])
async def test_a_one_token_answer_is_the_prefills_own(make_cluster: MakeCluster, path: str) -> None:
    """Non-stream, max_tokens 1 (or a first token that ends the answer): the prefill's answer is
    the whole answer, exactly as one server gives it; no decode instance is asked, and the
    prefill's blocks are released at once."""
    c = await make_cluster(1, 1)
    body = {"model": MODEL, "max_tokens": 1, "temperature": 0}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if path == CHAT else {"prompt": "a b c"})
    status, raw, _ = await post(c, body, path)
    assert status == 200, raw
    answer = json.loads(raw)
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 1
    assert answer.get("kv_transfer_params") is None and choice.get("token_ids") is None
    assert reqs(c.decode) == [] and len(reqs(c.prefill)) == 1
    assert (await metric_line(c, "pdserve_scheduler_first_token_from_prefill_total")).endswith(" 1.0")


@pytest.mark.parametrize("path", ["/v1/completions", CHAT])
async def test_a_decode_instance_dying_mid_stream_is_resumed_on_another(make_cluster: MakeCluster, path: str) -> None:
    """The continuation records its token ids (hidden from the client): another decode instance
    goes on after exactly the tokens the client has, as Dynamo's request migration does."""
    c = await make_cluster(1, 2, decode_policy="round-robin")
    c.decode[1].configure(require_kv_params=False)
    body = {"model": MODEL, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    body.update({"messages": [{"role": "user", "content": "a b"}]} if path == CHAT else {"prompt": "a b"})
    healthy = [sse_events((await post(c, body, path))[1])[-2]["usage"] for _ in range(2)]  # decode 0, 1
    for f in c.all():
        f.requests.clear()
    c.decode[0].configure(die_after_tokens=2)
    status, raw, _ = await post(c, body, path)
    assert status == 200, raw
    events = sse_events(raw)
    pieces = [ch.get("text") or ch.get("delta", {}).get("content") or ""
              for e in events[:-1] if e.get("choices") for ch in e["choices"]]
    assert "".join(pieces) == " c0t0 c0t1 c0t2 c0t3 c0t4"  # no token lost or repeated
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
    assert all(ch.get("token_ids") is None and ch.get("prompt_token_ids") is None
               for e in events[:-1] for ch in e.get("choices") or ())
    usage = events[-2]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == \
        (healthy[0]["prompt_tokens"], healthy[0]["completion_tokens"]) == (healthy[0]["prompt_tokens"], 5)
    resumed = c.decode[1].inference_requests()[0]["body"]
    assert resumed["prompt"][-3:] == [OUTPUT_ID_BASE, OUTPUT_ID_BASE + 1, OUTPUT_ID_BASE + 2]
    assert resumed["max_tokens"] == 2 and "kv_transfer_params" not in resumed
    assert len(reqs(c.prefill)) == 1
    line = await metric_line(c, 'pdserve_scheduler_retries_total{reason="mid_stream"')
    assert line.endswith(" 1.0")


async def test_with_no_retry_left_a_stream_failing_mid_way_ends_with_the_error(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 2, decode_policy="round-robin", retries=0)
    c.decode[0].configure(die_after_tokens=2)
    status, raw, _ = await post(c, {"model": MODEL, "prompt": "a b", "max_tokens": 5, "stream": True})
    assert status == 200
    events = sse_events(raw)
    assert "error" in events[-2] and events[-1] == "[DONE]"  # no retry left: the stream ends with the error
    assert texts(events) == [" c0t0", " c0t1", " c0t2"] and c.decode[1].inference_requests() == []
    assert "return_token_ids" not in c.decode[0].inference_requests()[0]["body"]  # nothing to resume: not asked
