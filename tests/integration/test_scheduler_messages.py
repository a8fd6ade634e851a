"""Anthropic's ``/v1/messages`` through prefill → decode (as vLLM serves it): the prefill call is
a 1-token message, the decode instance's answer (JSON, or ``event:`` SSE ending with
``message_stop``) is relayed, and the scheduler's own errors come in Anthropic's shape."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.integration.conftest import MODEL, MakeCluster, sample

pytestmark = pytest.mark.integration

BODY = {"model": MODEL, "max_tokens": 4, "system": "be brief",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "one two three four"}]}]}


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in raw.decode().split("\n\n"):
        if block:
            kind, data = block.split("\n", 1)
            out.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


async def test_a_message_is_prefilled_then_decoded(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, fake_kw={"block_size": 2})
    for _ in range(2):  # the second time the prefill side has the prompt cached
        async with c.post("/v1/messages", json=BODY) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
    assert answer["type"] == "message" and answer["content"][0]["text"] == " m0 m1 m2 m3"
    # Anthropic counts cache reads beside input_tokens: the prefill side's 7 hits (the decode side
    # counts the 8 pulled tokens as read), and the whole prompt stays 8
    usage = answer["usage"]
    assert (usage["input_tokens"], usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"]) == (1, 7, 0)
    assert sample(c, "pdserve_scheduler_prompt_tokens_total") == 16
    pre = c.prefill[0].inference_requests()[-1]["body"]
    assert (pre["max_tokens"], pre["stream"], pre["kv_transfer_params"]["do_remote_decode"]) == (1, False, True)
    dec = c.decode[0].inference_requests()[-1]
    assert dec["body"]["max_tokens"] == 4 and dec["kv_transfer_params"]["do_remote_prefill"]


async def test_a_streamed_message_is_relayed_to_message_stop(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, fake_kw={"ttft": 0.2, "token_latency": 0.01})
    c.prefill[0].config.ttft = 0
    async with c.post("/v1/messages", json={**BODY, "stream": True}) as r:
        assert r.status == 200
        got = events(await r.read())
    kinds = [k for k, _ in got]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "".join(e["delta"]["text"] for k, e in got if k == "content_block_delta") == " m0 m1 m2 m3"
    assert got[0][1]["message"]["usage"] == {"input_tokens": 8, "output_tokens": 0}  # as vLLM's: untouched
    final = next(e["usage"] for k, e in got if k == "message_delta")
    assert (final["input_tokens"], final["cache_read_input_tokens"]) == (8, 0)  # the prefill side cached nothing
    # the opening is held back until the first token: TTFT counts the wait for it
    assert sample(c, "pdserve_scheduler_time_to_first_token_seconds_sum", endpoint="messages") >= 0.2
    assert sample(c, "pdserve_scheduler_inter_token_latency_seconds_count", endpoint="messages") == 3
    assert sample(c, "pdserve_scheduler_completion_tokens_total") == 4
    assert sample(c, "pdserve_scheduler_prompt_tokens_total") == 8


async def test_a_decode_instance_that_dies_after_the_opening_is_retried(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 2, decode_policy="round-robin")
    c.decode[0].config.die_after_tokens = 0
    async with c.post("/v1/messages", json={**BODY, "stream": True}) as r:
        got = events(await r.read())
    assert [k for k, _ in got][-1] == "message_stop"
    assert [len(f.inference_requests()) for f in c.decode] == [1, 1]


async def test_a_failure_mid_stream_ends_with_an_anthropic_error_event(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, fake_kw={"die_after_tokens": 2})
    c.prefill[0].config.die_after_tokens = None
    async with c.post("/v1/messages", json={**BODY, "stream": True}) as r:
        got = events(await r.read())
    assert [k for k, _ in got].count("content_block_delta") == 2
    kind, err = got[-1]
    assert (kind, err["type"], err["error"]["type"]) == ("error", "error", "BadGatewayError")
    assert "decode instance" in err["error"]["message"]


@pytest.mark.parametrize(("body", "status", "kind"), [
    ({k: v for k, v in BODY.items() if k != "max_tokens"}, 400, "BadRequestError"),
    ({**BODY, "max_tokens": 0}, 400, "BadRequestError"),
    ({**BODY, "model": "nope"}, 404, "NotFoundError"),
])
async def test_the_schedulers_own_errors_come_in_anthropics_shape(make_cluster: MakeCluster, body: dict,
                                                                   status: int, kind: str) -> None:
    c = await make_cluster(1, 1)
    async with c.post("/v1/messages", json=body) as r:
        assert r.status == status
        answer = await r.json()
    assert answer["type"] == "error" and answer["error"]["type"] == kind and answer["error"]["message"]
    assert c.calls() == 0


async def test_openai_only_fields_are_left_for_vllm_to_ignore(make_cluster: MakeCluster) -> None:
    """vLLM's /v1/messages has no n, seed or stop: it ignores them, so the scheduler does too
    (no 400 for values it would refuse on /v1/chat/completions), and still checks Anthropic's."""
    c = await make_cluster(1, 1)
    async with c.post("/v1/messages", json={**BODY, "n": "two", "seed": "x", "stop": 5, "best_of": 0}) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["type"] == "message"
    async with c.post("/v1/messages", json={**BODY, "top_p": 7}) as r:
        assert r.status == 400 and (await r.json())["error"]["message"].startswith("top_p")


async def test_count_tokens_is_answered_by_an_instance(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, served_model_names=["alias"])
    async with c.post("/v1/messages/count_tokens", json={**BODY, "model": "alias"}) as r:
        assert r.status == 200, await r.text()
        assert await r.json() == {"input_tokens": 8}
