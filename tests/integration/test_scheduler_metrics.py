"""The metrics list of issue 7 and the structured access-log line."""

from __future__ import annotations

import json
import logging

import pytest

from tests.integration.conftest import MakeCluster

pytestmark = pytest.mark.integration


async def test_every_metric_family_present_and_fed(make_cluster: MakeCluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "pdserve.scheduler.access")
    c = await make_cluster(1, 1, served_model_names=["alias"], fake_kw={"token_latency": 0.01})
    body = {"model": "alias", "prompt": "a b c", "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    async with c.post("/v1/completions", json=body) as r:
        assert r.status == 200
        await r.read()
    async with c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}) as r:
        assert r.status == 200
    async with c.post("/v1/completions", json={"model": "nope", "prompt": "a"}) as r:
        assert r.status == 404
    async with c.get("/metrics") as r:
        text = await r.text()
    p = "pdserve_scheduler_"
    for family in ("requests_total", "time_to_first_token_seconds", "time_per_output_token_seconds",
                   "inter_token_latency_seconds", "e2e_request_latency_seconds", "prefill_seconds",
                   "kv_handover_seconds", "prompt_tokens_total", "cached_prompt_tokens_total",
                   "completion_tokens_total", "inflight_requests", "instance_inflight_requests",
                   "instance_healthy", "queue_length", "retries_total", "rejected_total", "decode_only_total",
                   "capture_dropped_total", "draining"):
        assert f"# TYPE {p}{family.removesuffix('_total')}" in text, family
    # with and without "model": both count under the name the answer carried
    assert f'{p}requests_total{{endpoint="completions",model="alias",status="200"}} 2.0' in text
    assert f'{p}time_to_first_token_seconds_count{{endpoint="completions"}} 2.0' in text  # non-stream too
    # an unknown model is not a label value (clients must not be able to grow the label set)
    assert f'{p}requests_total{{endpoint="completions",model="",status="404"}} 1.0' in text
    assert f"{p}kv_handover_seconds_count 1.0" in text  # streams only
    assert f'{p}time_per_output_token_seconds_count{{endpoint="completions"}} 1.0' in text
    assert f"{p}completion_tokens_total 7.0" in text
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "pdserve.scheduler.access"]
    # the name the client used; without one, the (first) served name the answer carried
    assert [(x.get("model"), x["status"]) for x in lines] == [("alias", 200), ("alias", 200), (None, 404)]
    assert set(lines[0]) >= {"request_id", "endpoint", "status", "stream", "model", "decode_only", "instances",
                             "retries", "prefill_ms", "ttft_ms", "e2e_ms", "prompt_tokens", "cached_tokens",
                             "completion_tokens", "error"}


async def test_requests_total_children_cached_and_bounded(make_cluster: MakeCluster,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """requests_total children are resolved once per label set (hot path), still count every
    request, and the cache stays bounded (the model label can come from clients)."""
    from pdserve.scheduler import metrics as metrics_mod

    c = await make_cluster(1, 1)
    m = c.state.metrics

    def cached_requests() -> int:
        return sum(1 for metric_id, _ in m._children if metric_id == id(m.requests))

    for _ in range(3):
        async with c.post("/v1/completions", json={"model": "fake-model", "prompt": "a", "max_tokens": 2}) as r:
            assert r.status == 200
    assert cached_requests() == 1
    monkeypatch.setattr(metrics_mod, "MAX_CACHED_CHILDREN", len(m._children))
    for _ in range(2):
        async with c.post("/v1/completions", json={"model": "other", "prompt": "a", "max_tokens": 2}) as r:
            assert r.status == 404
    assert cached_requests() == 1  # a new label set over the bound: counted, not cached
    async with c.get("/metrics") as r:
        text = await r.text()
    p = "pdserve_scheduler_requests_total"
    assert f'{p}{{endpoint="completions",model="fake-model",status="200"}} 3.0' in text
    assert f'{p}{{endpoint="completions",model="",status="404"}} 2.0' in text
