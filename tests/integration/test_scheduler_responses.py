"""``/v1/responses`` through prefill → decode: the prefill call is a 1-token, unstored response;
the decode instance's answer (JSON, or ``event:`` SSE ending with ``response.completed``) is
relayed, with the prefill side's cached tokens in its usage."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.integration.conftest import MODEL, MakeCluster, sample

pytestmark = pytest.mark.integration

BODY = {"model": MODEL, "input": "one two three four five six", "max_output_tokens": 4}


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        kind, data = block.split("\n", 1)
        assert kind.startswith("event: ") and data.startswith("data: "), block
        out.append((kind[7:], json.loads(data[6:])))
    return out


async def test_a_response_is_prefilled_then_decoded(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, fake_kw={"block_size": 2})
    for _ in range(2):  # the second time, the prefill side has the prompt in its prefix cache
        async with c.post("/v1/responses", json=BODY) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
    assert answer["object"] == "response"
    assert answer["output"][0]["content"][0]["text"] == " r0 r1 r2 r3"
    # cached tokens are the prefill side's prefix-cache hits, not the KV the decode side pulled
    assert answer["usage"]["input_tokens"] == 7 and answer["usage"]["input_tokens_details"]["cached_tokens"] == 6
    pre = c.prefill[0].inference_requests()[-1]["body"]
    assert (pre["max_output_tokens"], pre["store"], pre["stream"]) == (1, False, False)
    assert pre["kv_transfer_params"]["do_remote_decode"] is True
    dec = c.decode[0].inference_requests()[-1]
    assert dec["body"]["max_output_tokens"] == 4 and dec["body"]["store"] is False
    assert dec["kv_transfer_params"]["do_remote_prefill"]
    assert sample(c, "pdserve_scheduler_prompt_tokens_total") == 14


async def test_a_streamed_response_is_relayed_to_its_last_event(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, fake_kw={"token_latency": 0.01})
    async with c.post("/v1/responses", json={**BODY, "stream": True}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        got = events(await r.read())
    kinds = [k for k, _ in got]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "".join(e["delta"] for k, e in got if k == "response.output_text.delta") == " r0 r1 r2 r3"
    assert got[-1][1]["response"]["usage"]["input_tokens_details"]["cached_tokens"] == 0  # the prefill's
    # four deltas: one first token, three gaps, one time per output token
    assert sample(c, "pdserve_scheduler_inter_token_latency_seconds_count", endpoint="responses") == 3
    assert sample(c, "pdserve_scheduler_time_per_output_token_seconds_count", endpoint="responses") == 1
    assert sample(c, "pdserve_scheduler_completion_tokens_total") == 4


async def test_a_decode_failure_mid_stream_ends_with_an_error_event(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, fake_kw={"die_after_tokens": 2})
    c.prefill[0].config.die_after_tokens = None
    async with c.post("/v1/responses", json={**BODY, "stream": True}) as r:
        got = events(await r.read())
    kinds = [k for k, _ in got]
    assert kinds.count("response.output_text.delta") == 2 and kinds[-1] == "error"
    err = got[-1][1]
    assert err["code"] == "server_error" and "decode instance" in err["message"]
    assert err["sequence_number"] == got[-2][1]["sequence_number"] + 1  # numbered on from the last event


async def test_a_decode_instance_that_dies_after_the_opening_is_retried(make_cluster: MakeCluster) -> None:
    """vLLM opens a responses stream before its engine computed anything: a failure between the
    opening and the first token is still before the first token, and another instance answers."""
    c = await make_cluster(1, 2, decode_policy="round-robin")
    c.decode[0].config.die_after_tokens = 0
    async with c.post("/v1/responses", json={**BODY, "stream": True}) as r:
        assert r.status == 200
        got = events(await r.read())
    assert [k for k, _ in got][-1] == "response.completed"
    assert "".join(e["delta"] for k, e in got if k == "response.output_text.delta") == " r0 r1 r2 r3"
    assert [len(f.inference_requests()) for f in c.decode] == [1, 1]
    assert sample(c, "pdserve_scheduler_retries_total", stage="decode", reason="disconnect") == 1


async def test_time_to_first_token_waits_for_the_first_token_not_the_opening(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, fake_kw={"ttft": 0.3})
    c.prefill[0].config.ttft = 0
    async with c.post("/v1/responses", json={**BODY, "stream": True}) as r:
        await r.read()
    assert sample(c, "pdserve_scheduler_time_to_first_token_seconds_sum", endpoint="responses") >= 0.3
    assert sample(c, "pdserve_scheduler_inter_token_latency_seconds_sum", endpoint="responses") < 0.3


async def test_responses_that_run_built_in_tools_skip_the_prefill(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, fake_kw={"require_kv_params": False})
    async with c.post("/v1/responses", json={**BODY, "tools": [{"type": "code_interpreter"}]}) as r:
        assert r.status == 200
    assert c.prefill[0].inference_requests() == []
    assert sample(c, "pdserve_scheduler_decode_only_total", reason="builtin_tools") == 1


@pytest.mark.parametrize(("extra", "param"), [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"input": 5}, "input"),
    ({"input": "w " * 9000}, "input"),
])
async def test_bad_responses_requests_are_refused_before_any_instance(make_cluster: MakeCluster,
                                                                      extra: dict, param: str) -> None:
    c = await make_cluster(1, 1, max_model_len=4096, chars_per_token_bound=2.0)
    async with c.post("/v1/responses", json={**BODY, **extra}) as r:
        assert r.status == 400, await r.text()
        assert (await r.json())["error"]["param"] == param
    assert c.calls() == 0


async def test_an_alias_is_renamed_both_ways(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, served_model_names=["alias"])
    async with c.post("/v1/responses", json={**BODY, "model": "alias", "stream": True}) as r:
        assert r.status == 200
        raw = await r.read()
    assert c.decode[0].inference_requests()[-1]["body"]["model"] == MODEL
    models = [e["response"]["model"] for k, e in events(raw) if "response" in e]
    assert len(models) == 3 and set(models) == {"alias"}  # created, in_progress, completed


async def test_nothing_is_stored_and_vllm_only_checks_are_skipped(make_cluster: MakeCluster) -> None:
    """vLLM's responses request has no min_tokens or stream_options; truncation "auto" drops the
    oldest input instead of refusing a long one; a stored response could never be read back."""
    c = await make_cluster(1, 1, max_model_len=64, chars_per_token_bound=1.0)
    body = {**BODY, "input": "w " * 100, "truncation": "auto", "min_tokens": 9, "stream_options": {}}
    async with c.post("/v1/responses", json=body) as r:
        assert r.status == 200, await r.text()
    assert c.decode[0].inference_requests()[-1]["body"]["store"] is False
