"""Decode instances that answer wrongly: malformed answers, refused credentials, empty or
unfinished streams, and a decode retry with nowhere to go (error paths of pd_flow.py; a prefill
answering invalid JSON: tests/unit/test_scheduler_pd_flow.py).

The plain hand-over (``prefill_first_token=False``): the decode instance's answer is the answer."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import Cluster, MakeCluster
from tests.integration.test_scheduler_api import sse_events

pytestmark = pytest.mark.integration

PLAIN = {"prefill_first_token": False}


def reqs(fakes: list) -> list[dict]:
    return [r for f in fakes for r in f.inference_requests()]


async def post(c: Cluster, body: dict) -> tuple[int, bytes]:
    async with c.post("/v1/completions", json=body) as r:
        return r.status, await r.read()


async def metrics(c: Cluster) -> str:
    async with c.get("/metrics") as r:
        return await r.text()


def error(raw: bytes) -> dict:
    return json.loads(raw)["error"]


@pytest.mark.parametrize("answer, message", [
    ('{"id": "cmpl-1", "choices": [', "decode instance answered invalid JSON"),
    ('{"id": "cmpl-1", "object": "text_completion"}', "decode instance answered without choices"),
    ('["a list"]', "decode instance answered without choices"),
])
async def test_decode_malformed_json_answer_is_502_not_retried(make_cluster: MakeCluster, answer: str,
                                                               message: str) -> None:
    c = await make_cluster(1, 2, **PLAIN)
    for f in c.decode:
        f.configure(raw_answer=answer)
    status, raw = await post(c, {"prompt": "x", "max_tokens": 2})
    assert status == 502 and error(raw)["message"].startswith(message), raw
    assert len(reqs(c.decode)) == 1 and len(reqs(c.prefill)) == 1


@pytest.mark.parametrize("refusal", [{"api_key": "instance-secret"}, {"fail_status": 403}], ids=["401", "403"])
@pytest.mark.parametrize("stream", [False, True])
async def test_decode_refusing_the_scheduler_credentials_is_502_naming_the_option(
        make_cluster: MakeCluster, refusal: dict, stream: bool) -> None:
    c = await make_cluster(1, 2, **PLAIN)
    for f in c.decode:
        f.configure(**refusal)
    status, raw = await post(c, {"prompt": "x", "max_tokens": 2, "stream": stream})
    assert status == 502, raw  # not the client's 401/403: its credentials were fine
    msg = error(raw)["message"]
    code = 401 if "api_key" in refusal else 403
    assert f"refused the scheduler's credentials (HTTP {code})" in msg and "--instance-api-key" in msg
    assert msg.startswith("decode instance decode[")
    assert [r["status"] for r in reqs(c.decode)] == [code]  # not retried elsewhere


async def test_decode_stream_closed_before_its_first_byte_is_retried(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 2, decode_policy="round-robin", **PLAIN)
    c.decode[0].configure(raw_answer="")  # 200, then the end of the body: no event at all
    status, raw = await post(c, {"prompt": "x y", "max_tokens": 3, "stream": True})
    assert status == 200
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in events[:-1]) == " c0t0 c0t1 c0t2"
    assert [r["status"] for r in c.decode[0].inference_requests()] == [200]
    assert [r["status"] for r in c.decode[1].inference_requests()] == [200]
    assert len(reqs(c.prefill)) == 2  # the empty answer may have consumed the KV: prefilled again
    assert 'pdserve_scheduler_retries_total{reason="empty_stream",stage="decode"} 1.0' in await metrics(c)


async def test_decode_stream_ending_without_done_gets_an_error_event(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, **PLAIN)
    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "fake-model",
             "choices": [{"index": 0, "text": " half", "logprobs": None, "finish_reason": None}]}
    c.decode[0].configure(raw_answer=f"data: {json.dumps(chunk)}\n\n")  # a clean end of body, no [DONE]
    status, raw = await post(c, {"prompt": "x", "max_tokens": 3, "stream": True})
    assert status == 200  # the stream had started: the failure is in it
    events = sse_events(raw)
    assert events[0]["choices"][0]["text"] == " half"
    assert events[-1] == "[DONE]" and len(events) == 3
    err = events[-2]["error"]
    assert err["code"] == 502 and err["message"].endswith("ended the stream without [DONE]")
    assert len(reqs(c.decode)) == 1 and "pdserve_scheduler_retries_total{" not in await metrics(c)  # no retry


async def test_decode_retry_with_no_other_healthy_decode_is_502(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, health_interval=30, **PLAIN)  # only the failed request marks it down
    await c.decode[0].stop()  # connection refused: taken out of the pool, no instance left to retry on
    status, raw = await post(c, {"prompt": "x", "max_tokens": 2})
    assert status == 502
    assert error(raw)["message"] == "decode failed and no other decode instance is healthy"
    assert len(reqs(c.prefill)) == 1
    assert not c.state.pool.decode.instances[0].healthy


async def test_a_scheduler_bug_mid_stream_cuts_the_connection_instead_of_hanging(
        make_cluster: MakeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a stream started no error answer can follow; the client must not wait for more."""
    import asyncio

    import aiohttp

    from pdserve.scheduler.relay import OpenAIRelay

    c = await make_cluster(1, 1, prefill_first_token=False)
    calls = []

    def broken(self: OpenAIRelay, events: bytes) -> bytes:
        calls.append(events)
        if len(calls) > 1:
            raise RuntimeError("injected bug")
        return events

    monkeypatch.setattr(OpenAIRelay, "transform", broken)
    c.decode[0].config.token_latency = 0.02

    async def read() -> bytes:
        async with c.post("/v1/completions", json={"prompt": "a b", "max_tokens": 5, "stream": True}) as r:
            assert r.status == 200
            return await r.read()

    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(read(), 5)
    assert len(calls) >= 2
