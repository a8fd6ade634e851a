"""Cache-aware disaggregation: decode-only for short or mostly-cached prompts, conversation affinity."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from tests.integration.conftest import Cluster, MakeCluster, wait_for
from tests.integration.test_scheduler_api import sse_events

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
NO_KV = {"require_kv_params": False}  # a real decode instance computes a prompt sent without KV


def reqs(fakes: list) -> list[dict[str, Any]]:
    return [r for f in fakes for r in f.inference_requests()]


def per_instance(fakes: list) -> list[int]:
    return [len(f.inference_requests()) for f in fakes]


async def post(c: Cluster, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with c.post(path, json=body) as r:
        return r.status, await r.read()


async def metrics(c: Cluster) -> str:
    async with c.get("/metrics") as r:
        return await r.text()


async def test_short_prompt_served_by_decode_alone(make_cluster: MakeCluster,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "pdserve.scheduler.access")
    c = await make_cluster(1, 1, decode_only_below=32, fake_kw=NO_KV)
    for stream in (False, True):
        status, raw = await post(c, "/v1/completions", {"prompt": "hi there", "max_tokens": 3, "stream": stream})
        assert status == 200
        if stream:
            assert sse_events(raw)[-1] == "[DONE]"
        else:
            assert json.loads(raw)["usage"]["completion_tokens"] == 3
    assert reqs(c.prefill) == []
    assert all("kv_transfer_params" not in r["body"] for r in reqs(c.decode))
    long_prompt = " ".join(f"word{i}" for i in range(40))  # ~280 chars: at least 32 tokens by any count
    status, _ = await post(c, "/v1/completions", {"prompt": long_prompt, "max_tokens": 2})
    assert status == 200 and len(reqs(c.prefill)) == 1
    assert reqs(c.decode)[-1]["kv_transfer_params"]["do_remote_prefill"] is True
    assert 'pdserve_scheduler_decode_only_total{reason="short"} 2.0' in await metrics(c)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "pdserve.scheduler.access"]
    assert [x["decode_only"] for x in lines] == ["short", "short", None]
    assert lines[0]["prefill_ms"] is None and len(lines[0]["instances"]) == 1


async def test_token_id_prompts_counted_exactly(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, decode_only_below=10, fake_kw=NO_KV)
    await post(c, "/v1/completions", {"prompt": list(range(9)), "max_tokens": 2})
    await post(c, "/v1/completions", {"prompt": list(range(10)), "max_tokens": 2})
    assert len(reqs(c.prefill)) == 1 and reqs(c.prefill)[0]["body"]["prompt"] == list(range(10))


async def test_non_ascii_estimated_conservatively(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, decode_only_below=20, fake_kw=NO_KV)
    await post(c, "/v1/completions", {"prompt": "你好" * 15, "max_tokens": 2})  # 30 chars: ~30 tokens, not 8
    assert len(reqs(c.prefill)) == 1


async def test_decode_only_retry_stays_decode_only(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 2, decode_only_below=32, decode_policy="round-robin", fake_kw=NO_KV)
    c.decode[0].configure(fail_status=500)
    c.decode[1].configure(fail_status=None)
    status, _ = await post(c, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 200 and reqs(c.prefill) == []
    assert per_instance(c.decode) == [1, 1]


def turn(history: list[dict[str, str]], user: str) -> list[dict[str, str]]:
    return [*history, {"role": "user", "content": user}]


SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 30}  # ~870 chars


async def test_follow_up_turn_on_cached_decode_instance_skips_prefill(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 2, decode_only_uncached_below=64, fake_kw=NO_KV)
    conv = turn([SYSTEM], "Explain prefix caching in detail please. " * 5)
    status, raw = await post(c, CHAT, {"messages": conv, "max_tokens": 4})
    assert status == 200 and len(reqs(c.prefill)) == 1  # first turn: nothing cached anywhere, PD
    first_decode = next(i for i, f in enumerate(c.decode) if f.inference_requests())
    answer = json.loads(raw)["choices"][0]["message"]["content"]
    conv2 = turn([*conv, {"role": "assistant", "content": answer}], "And why?")
    status, _ = await post(c, CHAT, {"messages": conv2, "max_tokens": 2})
    assert status == 200
    assert len(reqs(c.prefill)) == 1  # no second prefill
    assert per_instance(c.decode)[first_decode] == 2
    last = c.decode[first_decode].inference_requests()[-1]
    assert last["kv_transfer_params"] is None and last["body"]["messages"] == conv2
    # a follow-up whose new part is long is not decode-only, but still goes to the same decode instance
    conv3 = turn(conv2, "Now write it all out at length. " * 20)
    await post(c, CHAT, {"messages": conv3, "max_tokens": 2})
    assert len(reqs(c.prefill)) == 2 and per_instance(c.decode)[first_decode] == 3
    assert 'pdserve_scheduler_decode_only_total{reason="cached"} 1.0' in await metrics(c)


async def test_other_conversation_is_not_considered_cached(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 2, decode_only_uncached_below=64, fake_kw=NO_KV)
    await post(c, CHAT, {"messages": turn([SYSTEM], "question one " * 20), "max_tokens": 2})
    other = {"role": "system", "content": "A different long system prompt. " * 30}
    await post(c, CHAT, {"messages": turn([other], "q"), "max_tokens": 2})
    assert len(reqs(c.prefill)) == 2


async def test_conversations_keep_their_decode_instance(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 3)  # decode affinity is on by default; every request still does PD
    convs = {name: [{"role": "system", "content": f"persona {name}"}] for name in "abcd"}
    where: dict[str, set[str]] = {name: set() for name in convs}
    for t in range(3):
        for name, hist in convs.items():
            hist.append({"role": "user", "content": f"{name} turn {t}"})
            async with c.post(CHAT, json={"messages": hist, "max_tokens": 2}) as r:
                rid = r.headers["X-Request-Id"]
                data = await r.json()
            hist.append({"role": "assistant", "content": data["choices"][0]["message"]["content"]})
            where[name] |= {str(i) for i, f in enumerate(c.decode) for x in f.inference_requests()
                            if x["request_id"] == rid}
    assert all(len(v) == 1 for v in where.values()), where
    assert len(reqs(c.prefill)) == 12  # affinity alone never skips the prefill


async def test_affinity_yields_to_least_load_when_overloaded(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 2, affinity_load_factor=1.0)
    hist = [{"role": "user", "content": "hello"}]
    await post(c, CHAT, {"messages": hist, "max_tokens": 2})
    home = next(i for i, f in enumerate(c.decode) if f.inference_requests())
    c.decode[home].configure(ttft=0.6)
    # a slow request of this conversation in flight on its home instance (its fair share of 2) ...
    slow = asyncio.create_task(post(c, CHAT, {"messages": hist, "max_tokens": 2}))
    await wait_for(lambda: len(c.decode[home].inference_requests()) == 2, what="slow request on its home instance")
    # ... the next one goes elsewhere rather than queueing behind it
    status, _ = await post(c, CHAT, {"messages": hist, "max_tokens": 2})
    assert status == 200
    assert not slow.done()
    assert len(c.decode[home].inference_requests()) == 2 and len(c.decode[1 - home].inference_requests()) == 1
    assert (await slow)[0] == 200


async def test_affinity_off_and_instance_down_forgets(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 2, decode_affinity=False, decode_policy="round-robin")
    hist = [{"role": "user", "content": "same"}]
    for _ in range(4):
        await post(c, CHAT, {"messages": hist, "max_tokens": 2})
    assert per_instance(c.decode) == [2, 2]
    c2 = await make_cluster(1, 2, health_interval=0.05)
    await post(c2, CHAT, {"messages": hist, "max_tokens": 2})
    home = next(i for i, f in enumerate(c2.decode) if f.inference_requests())
    tracker = c2.state.tracker
    assert tracker is not None and tracker._seen
    c2.decode[home].configure(healthy=False)
    name = c2.state.pool.decode.instances[home].spec.name
    await wait_for(lambda: not c2.state.pool.decode.instances[home].healthy, what="decode instance taken out")
    assert name not in tracker._seen


def backlog(text: str) -> dict[str, float]:
    """role -> pdserve_scheduler_instance_prefill_backlog_tokens (one instance per role here)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("pdserve_scheduler_instance_prefill_backlog_tokens{"):
            role = line.split('role="', 1)[1].split('"', 1)[0]
            out[role] = float(line.rsplit(" ", 1)[1])
    return out


async def test_busy_prefill_pool_serves_on_decode_alone(make_cluster: MakeCluster,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "pdserve.scheduler.access")
    c = await make_cluster(1, 1, decode_only_when_queued=20, fake_kw=NO_KV)
    c.prefill[0].configure(ttft=0.6)  # a long prefill queue on the only prefill instance
    prompt = "x" * 100  # ~25 tokens of prompt work
    first = asyncio.create_task(post(c, "/v1/completions", {"prompt": prompt, "max_tokens": 2}))
    for _ in range(100):  # until the scheduler has sent the first request to prefill
        if reqs(c.prefill):
            break
        await asyncio.sleep(0.01)
    assert backlog(await metrics(c)) == {"prefill": 25.0, "decode": 0.0}
    status, raw = await post(c, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 2
    assert not first.done()  # it answered while the first request was still in prefill
    assert (await first)[0] == 200
    # prefill idle again: the next request is disaggregated
    assert (await post(c, "/v1/completions", {"prompt": prompt, "max_tokens": 2}))[0] == 200
    assert len(reqs(c.prefill)) == 2
    assert ["kv_transfer_params" in r["body"] for r in reqs(c.decode)] == [False, True, True]
    text = await metrics(c)
    assert 'pdserve_scheduler_decode_only_total{reason="busy"} 1.0' in text
    assert backlog(text) == {"prefill": 0.0, "decode": 0.0}
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "pdserve.scheduler.access"]
    assert [x["decode_only"] for x in lines] == ["busy", None, None]


async def test_busy_fallback_off_by_default(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, fake_kw=NO_KV)
    c.prefill[0].configure(ttft=0.3)
    results = await asyncio.gather(*(post(c, "/v1/completions", {"prompt": "x" * 100, "max_tokens": 2})
                                     for _ in range(3)))
    assert [s for s, _ in results] == [200] * 3 and len(reqs(c.prefill)) == 3
