"""Two retry paths of the prefill → decode flow (pdserve/scheduler/pd_flow.py, ``--retries`` > 0):

1. A decode instance fails before the first token, the scheduler prefills again for the retry, and
   that new prefill fails too: the decode-only fallback (reason ``prefill_failed``) still answers,
   a decode instance computing the prompt itself.
2. A decode stream breaks mid-way and another decode instance resumes it (reason ``mid_stream``):
   the latency metrics describe the one stream the client got. Inter-token latency is observed
   per relayed chunk, the resumed instance's first chunk measured from the last chunk before the
   failure (no second time-to-first-token, no second KV hand-over), and the time per output token
   divides by the client's completion tokens, the moved ones included, not by the resumed
   instance's own count.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from pdserve.testing.fake_instance import OUTPUT_ID_BASE, FakeInstance
from tests.integration.conftest import MODEL, Cluster, MakeCluster, sample, wait_for
from tests.integration.test_scheduler_api import sse_events

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
TOKEN_LATENCY = 0.04  # each streamed token its own chunk (the fake sleeps between tokens)


def reqs(fakes: list[FakeInstance]) -> list[dict[str, Any]]:
    return [r for f in fakes for r in f.inference_requests()]


class _OnArrival(list):  # type: ignore[type-arg]
    """A fake's request log that calls ``hook`` as each request arrives (the fake appends its
    record before it answers): a fault injected exactly between two calls of one request."""

    def __init__(self, hook: Callable[[dict[str, Any]], None]) -> None:
        super().__init__()
        self.hook = hook

    def append(self, rec: dict[str, Any]) -> None:
        super().append(rec)
        if rec["path"].startswith("/v1/"):
            self.hook(rec)


def text_of(path: str, raw: bytes, stream: bool) -> str:
    if not stream:
        choice = json.loads(raw)["choices"][0]
        return choice["message"]["content"] if path == CHAT else choice["text"]
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), events
    return "".join(ch.get("text") or (ch.get("delta") or {}).get("content") or ""
                   for e in events[:-1] for ch in e.get("choices") or ())


# -- 1. the re-prefill after a failed decode falls back to decode-only ------------------------------

@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("fault", "prefill_reason"), [
    ({"fail_status": 502}, "http_502"),
    ({"fail_status": 503}, "http_503"),
    ({"fail_status": 504}, "http_504"),
    ({"refuse": True}, "connect"),  # the prefill instance drops every connection
])
async def test_failed_reprefill_after_a_decode_failure_falls_back_to_decode_only(
        make_cluster: MakeCluster, stream: bool, fault: dict[str, Any], prefill_reason: str) -> None:
    # no prefill token (pre.first is None): a decode failure before the first byte re-prefills
    c = await make_cluster(1, 2, decode_policy="round-robin", prefill_first_token=False, retries=1)
    c.decode[0].configure(fail_status=500)  # refuses the hand-over: the KV may be spent
    c.decode[1].configure(require_kv_params=False)  # can compute a prompt itself
    # the prefill instance goes bad the moment decode 0 gets the request: the first prefill
    # answered, the re-prefill (and its own retry) fail
    c.decode[0].requests = _OnArrival(lambda rec: c.prefill[0].configure(**fault))

    body = {"model": MODEL, "prompt": "r s t", "max_tokens": 3, "stream": stream}
    async with c.post("/v1/completions", json=body) as r:
        status, raw = r.status, await r.read()
    assert status == 200, raw
    assert text_of("/v1/completions", raw, stream) == " c0t0 c0t1 c0t2"

    # prefill: the hand-over's prefill answered; the re-prefill failed, then its retry
    failed = "dropped" if "refuse" in fault else fault["fail_status"]
    assert [r["status"] for r in reqs(c.prefill)] == [200, failed, failed]
    # decode 0 got the hand-over with the first prefill's KV params and failed
    first = c.decode[0].inference_requests()
    assert len(first) == 1 and first[0]["status"] == 500
    assert first[0]["kv_transfer_params"]["remote_engine_id"] == "fake-prefill-0"
    # decode 1: the client's request exactly, no kv_transfer_params (it computes the prompt)
    retry = c.decode[1].inference_requests()
    assert len(retry) == 1 and retry[0]["status"] == 200
    assert "kv_transfer_params" not in retry[0]["body"] and retry[0]["body"] == body

    await wait_for(lambda: sample(c, "pdserve_scheduler_requests_total", endpoint="completions",
                                  status="200", model=MODEL) == 1, what="request counted")
    assert sample(c, "pdserve_scheduler_retries_total", stage="decode", reason="http_500") == 1
    assert sample(c, "pdserve_scheduler_retries_total", stage="prefill", reason=prefill_reason) == 1
    assert sample(c, "pdserve_scheduler_decode_only_total", reason="prefill_failed") == 1
    assert c.state.pool.decode.healthy()  # a 500 is no outage: decode 0 stays in the pool


async def test_failed_reprefill_without_the_fallback_answers_the_prefill_error(make_cluster: MakeCluster) -> None:
    """The same path with --no-decode-only-fallback: the request fails with the prefill's error
    (so the success above really is the fallback's, not another retry's)."""
    c = await make_cluster(1, 2, decode_policy="round-robin", prefill_first_token=False, retries=1,
                           decode_only_fallback=False)
    c.decode[0].configure(fail_status=500)
    c.decode[1].configure(require_kv_params=False)
    c.decode[0].requests = _OnArrival(lambda rec: c.prefill[0].configure(fail_status=503))
    async with c.post("/v1/completions", json={"model": MODEL, "prompt": "r s t", "max_tokens": 3}) as r:
        status, answer = r.status, await r.json()
    assert status == 502 and "prefill instance" in answer["error"]["message"], answer
    assert [r["status"] for r in reqs(c.prefill)] == [200, 503, 503]
    assert c.decode[1].inference_requests() == []
    assert sample(c, "pdserve_scheduler_decode_only_total", reason="prefill_failed") == 0


# -- 2. latency metrics after a mid-stream resume ------------------------------------------------

async def _resumed_stream(make_cluster: MakeCluster, path: str, body: dict[str, Any]) -> tuple[Cluster, bytes]:
    """A 5-token stream: the prefill's token, 2 from decode 0 (which then dies), 2 from decode 1."""
    c = await make_cluster(1, 2, decode_policy="round-robin", retries=1)
    for f in c.decode:
        f.configure(token_latency=TOKEN_LATENCY)
    c.decode[0].configure(die_after_tokens=2)
    c.decode[1].configure(require_kv_params=False)  # a resume computes prompt + tokens itself
    body = {"model": MODEL, "max_tokens": 5, "stream": True, **body}
    body.update({"messages": [{"role": "user", "content": "a b"}]} if path == CHAT else {"prompt": "a b"})
    async with c.post(path, json=body) as r:
        assert r.status == 200
        raw = await r.read()
    assert text_of(path, raw, True) == " c0t0 c0t1 c0t2 c0t3 c0t4"
    # it really was resumed: decode 0 died after 2 tokens, decode 1 went on after the 3 the client had
    assert [(r["status"], r["tokens_sent"]) for r in c.decode[0].inference_requests()] == [("died", 2)]
    resumed = c.decode[1].inference_requests()
    assert len(resumed) == 1 and resumed[0]["body"]["max_tokens"] == 2
    assert resumed[0]["body"]["prompt"][-3:] == [OUTPUT_ID_BASE, OUTPUT_ID_BASE + 1, OUTPUT_ID_BASE + 2]
    assert len(reqs(c.prefill)) == 1
    await wait_for(lambda: sample(c, "pdserve_scheduler_requests_total", endpoint="chat" if path == CHAT
                                  else "completions", status="200", model=MODEL) == 1, what="request counted")
    assert sample(c, "pdserve_scheduler_retries_total", stage="decode", reason="mid_stream") == 1
    return c, raw


def _latencies(c: Cluster, endpoint: str) -> dict[str, float]:
    return {k: sample(c, f"pdserve_scheduler_{name}", **({} if k == "handover" else {"endpoint": endpoint}))
            for k, name in (("itl_count", "inter_token_latency_seconds_count"),
                            ("itl_sum", "inter_token_latency_seconds_sum"),
                            ("tpot_count", "time_per_output_token_seconds_count"),
                            ("tpot_sum", "time_per_output_token_seconds_sum"),
                            ("ttft_count", "time_to_first_token_seconds_count"),
                            ("handover", "kv_handover_seconds_count"))}


@pytest.mark.parametrize("path", ["/v1/completions", CHAT])  # chat: its role chunk is no token
async def test_inter_token_latency_after_a_mid_stream_resume(make_cluster: MakeCluster, path: str) -> None:
    """Without usage in the stream each chunk is one token: one inter-token gap per token after
    the first, the gap across the failure included, and a TPOT that is their mean."""
    c, _ = await _resumed_stream(make_cluster, path, {})
    m = _latencies(c, "chat" if path == CHAT else "completions")
    assert m["ttft_count"] == 1  # the prefill's token; the resumed instance's first chunk is no new first token
    assert m["handover"] == 1  # decode 0 pulled the KV; the resume pulled nothing
    assert m["itl_count"] == 5 - 1  # tokens the client got, minus the first
    # the gaps cover the stream from the first token to the last: two of them waited TOKEN_LATENCY
    # (decode 0's second token, decode 1's second token)
    assert m["itl_sum"] >= 2 * TOKEN_LATENCY
    assert m["tpot_count"] == 1
    assert m["tpot_sum"] == pytest.approx(m["itl_sum"] / (5 - 1), rel=1e-6)


@pytest.mark.parametrize("path", ["/v1/completions", CHAT])
async def test_time_per_output_token_counts_the_moved_tokens_after_a_resume(make_cluster: MakeCluster,
                                                                           path: str) -> None:
    """With usage, TPOT divides by the usage's completion tokens: the resumed instance reports 2
    (it got the other 3 as prompt); the client's usage, and the TPOT, count all 5."""
    c, raw = await _resumed_stream(make_cluster, path, {"stream_options": {"include_usage": True}})
    usage = sse_events(raw)[-2]["usage"]
    assert usage["completion_tokens"] == 5
    endpoint = "chat" if path == CHAT else "completions"
    m = _latencies(c, endpoint)
    assert m["ttft_count"] == 1 and m["handover"] == 1 and m["tpot_count"] == 1
    # the usage chunk is relayed too (its own gap when it comes in a read of its own): at least
    # one gap per token after the first, one more at most
    assert 5 - 1 <= m["itl_count"] <= 5
    # whatever the chunking, the gaps add up to first token → last chunk, which TPOT divides by
    # the 4 tokens after the first (not by the resumed instance's 2 - 1)
    assert m["itl_sum"] >= 2 * TOKEN_LATENCY
    assert m["tpot_sum"] == pytest.approx(m["itl_sum"] / (5 - 1), rel=1e-6)
    assert sample(c, "pdserve_scheduler_completion_tokens_total") == 5
    assert sample(c, "pdserve_scheduler_prompt_tokens_total") == usage["prompt_tokens"]
