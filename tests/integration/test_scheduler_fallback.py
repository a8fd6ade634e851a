"""Requests a prefill instance cannot usefully serve go to a decode instance alone: when no
prefill instance answers (decode-only fallback), and for batches of prompts or prompt_logprobs,
whose prefilled KV vLLM would not (fully) use."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import MODEL, Cluster, MakeCluster, wait_for

pytestmark = pytest.mark.integration

NO_KV = {"require_kv_params": False}  # the fake decode instance computes the prompt itself


def reqs(fakes: list) -> list[dict]:
    return [r for f in fakes for r in f.inference_requests()]


async def post(c: Cluster, body: dict) -> tuple[int, dict]:
    async with c.post("/v1/completions", json={"model": MODEL, **body}) as r:
        return r.status, json.loads(await r.read())


async def decode_only_total(c: Cluster, reason: str) -> float:
    async with c.get("/metrics") as r:
        text = await r.text()
    prefix = f'pdserve_scheduler_decode_only_total{{reason="{reason}"}} '
    return next((float(x[len(prefix):]) for x in text.splitlines() if x.startswith(prefix)), 0.0)


async def health(c: Cluster) -> int:
    async with c.get("/health") as r:
        return r.status


async def test_prefill_failing_everywhere_falls_back_to_decode_only(make_cluster: MakeCluster) -> None:
    c = await make_cluster(2, 1, fake_kw=NO_KV)
    for f in c.prefill:
        f.configure(fail_status=503)
    status, answer = await post(c, {"prompt": "x", "max_tokens": 2})
    assert status == 200, answer
    assert answer["usage"]["completion_tokens"] == 2
    assert len(reqs(c.prefill)) == 2  # one try + one retry first
    dec = reqs(c.decode)
    assert len(dec) == 1 and "kv_transfer_params" not in dec[0]["body"] and dec[0]["body"]["prompt"] == "x"
    assert await decode_only_total(c, "prefill_failed") == 1


async def test_prefill_down_falls_back_and_health_stays_up(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, fake_kw=NO_KV)
    await c.prefill[0].stop()
    await wait_for(lambda: not c.state.pool.prefill.healthy(), what="prefill marked down")
    assert await health(c) == 200  # the decode instance still answers
    status, answer = await post(c, {"prompt": "y", "max_tokens": 3, "stream": False})
    assert status == 200, answer
    assert await decode_only_total(c, "prefill_failed") == 1


async def test_fallback_off_answers_the_prefill_error(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, fake_kw=NO_KV, decode_only_fallback=False)
    c.prefill[0].configure(fail_status=503)
    status, answer = await post(c, {"prompt": "x", "max_tokens": 2})
    assert status == 502 and "prefill instance" in answer["error"]["message"]
    assert reqs(c.decode) == []
    c.prefill[0].configure(fail_status=None, healthy=False)
    await wait_for(lambda: not c.state.pool.prefill.healthy(), what="prefill marked down")
    assert await health(c) == 503


async def test_refused_credentials_are_not_hidden_by_the_fallback(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, fake_kw=NO_KV)
    c.prefill[0].configure(fail_status=401)
    status, answer = await post(c, {"prompt": "x", "max_tokens": 2})
    assert status == 502 and "--instance-api-key" in answer["error"]["message"]
    assert reqs(c.decode) == []


@pytest.mark.parametrize(("extra", "reason"), [
    ({"prompt": ["first prompt", "second prompt"]}, "batch"),
    ({"prompt": [[1, 2, 3], [4, 5]]}, "batch"),
    ({"prompt": "x", "prompt_logprobs": 0}, "prompt_logprobs"),
])
async def test_batches_and_prompt_logprobs_skip_the_prefill(make_cluster: MakeCluster, extra: dict,
                                                             reason: str) -> None:
    """vLLM hands back the KV of a batch's first prompt only (the others' blocks would wait on the
    prefill side for their lease to expire) and reads no external KV with prompt_logprobs."""
    c = await make_cluster(1, 1, fake_kw=NO_KV)
    status, answer = await post(c, {"max_tokens": 2, **extra})
    assert status == 200, answer
    assert reqs(c.prefill) == []
    assert reqs(c.decode)[0]["body"]["prompt"] == extra["prompt"]
    assert await decode_only_total(c, reason) == 1


async def test_one_prompts_token_ids_still_take_the_prefill(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1)
    status, answer = await post(c, {"prompt": [1, 2, 3], "max_tokens": 2})
    assert status == 200, answer
    assert len(reqs(c.prefill)) == 1 and "kv_transfer_params" in reqs(c.decode)[0]["body"]
