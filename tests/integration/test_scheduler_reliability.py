"""Retries, failures mid-stream, client disconnects, timeouts and overload."""

from __future__ import annotations

import asyncio
import json
import re
import socket

import aiohttp
import pytest

from tests.integration.conftest import Cluster, MakeCluster, wait_for
from tests.integration.test_scheduler_api import sse_events

pytestmark = pytest.mark.integration


def reqs(fakes: list) -> list[dict]:
    return [r for f in fakes for r in f.inference_requests()]


async def post(c: Cluster, body: dict, path: str = "/v1/completions") -> tuple[int, bytes, dict]:
    async with c.post(path, json=body) as r:
        return r.status, await r.read(), dict(r.headers)


async def metrics(c: Cluster) -> str:
    async with c.get("/metrics") as r:
        return await r.text()


async def test_prefill_5xx_retried_on_other_instance(make_cluster: MakeCluster) -> None:
    c = await make_cluster(2, 1, prefill_policy="round-robin")
    c.prefill[0].configure(fail_status=500)
    for i in range(2):
        status, body, _ = await post(c, {"prompt": f"a{i}", "max_tokens": 2})
        assert status == 200, body
    assert all(r["status"] == 500 for r in c.prefill[0].inference_requests())
    assert len(c.prefill[1].inference_requests()) == 2
    async with c.get("/metrics") as r:
        assert 'pdserve_scheduler_retries_total{reason="http_500",stage="prefill"} 2.0' in await r.text()


async def test_prefill_dropped_connection_retried(make_cluster: MakeCluster) -> None:
    c = await make_cluster(2, 1, prefill_policy="round-robin")
    c.prefill[0].configure(refuse=True)
    for i in range(2):
        status, body, _ = await post(c, {"prompt": f"b{i}", "max_tokens": 2, "stream": True})
        assert status == 200 and sse_events(body)[-1] == "[DONE]"
    # round-robin sent both requests to prefill 0 first: dropped there, then served by prefill 1
    assert [r["status"] for r in c.prefill[0].inference_requests()] == ["dropped", "dropped"]
    assert [(r["status"], r["body"]["prompt"]) for r in c.prefill[1].inference_requests()] == [(200, "b0"), (200, "b1")]
    assert len(reqs(c.decode)) == 2
    assert 'pdserve_scheduler_retries_total{reason="connect",stage="prefill"} 2.0' in await metrics(c)


async def test_prefill_fails_everywhere_502(make_cluster: MakeCluster) -> None:
    c = await make_cluster(2, 1, decode_only_fallback=False)  # (the fallback: test_scheduler_fallback.py)
    for f in c.prefill:
        f.configure(fail_status=503)
    status, body, _ = await post(c, {"prompt": "x", "max_tokens": 2})
    assert status == 502
    assert "prefill instance" in json.loads(body)["error"]["message"]
    assert reqs(c.decode) == []
    assert len(reqs(c.prefill)) == 2  # one try + one retry, no more


async def test_prefill_4xx_relayed_not_retried(make_cluster: MakeCluster) -> None:
    c = await make_cluster(2, 1)
    for f in c.prefill:
        f.configure(fail_status=400)
    status, body, _ = await post(c, {"prompt": "x", "max_tokens": 2})
    assert status == 400 and json.loads(body)["error"]["message"] == "injected failure 400"
    assert len(reqs(c.prefill)) == 1 and reqs(c.decode) == []


@pytest.mark.parametrize("stream", [False, True])
async def test_decode_5xx_before_first_byte_retried_with_new_prefill(make_cluster: MakeCluster, stream: bool) -> None:
    c = await make_cluster(1, 2, decode_policy="round-robin", prefill_first_token=False)
    c.decode[0].configure(fail_status=500)
    status, body, _ = await post(c, {"prompt": "r s", "max_tokens": 2, "stream": stream})
    assert status == 200, body
    assert len(reqs(c.prefill)) == 2  # re-prefilled: the failed decode may have consumed the KV
    assert len(c.decode[1].inference_requests()) == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_only_decode_5xx_once_retried_on_it_with_new_prefill(make_cluster: MakeCluster, stream: bool) -> None:
    """1P1D: a transient decode failure (e.g. a failed KV pull) is retried on the same, still
    healthy instance after a fresh prefill, instead of failing the request."""
    c = await make_cluster(1, 1, prefill_first_token=False)
    c.decode[0].configure(fail_status=500, fail_times=1)
    status, body, _ = await post(c, {"prompt": "r s", "max_tokens": 2, "stream": stream})
    assert status == 200, body
    assert [r["status"] for r in c.decode[0].inference_requests()] == [500, 200]
    assert len(reqs(c.prefill)) == 2
    async with c.get("/metrics") as r:
        assert 'pdserve_scheduler_retries_total{reason="http_500",stage="decode"} 1.0' in await r.text()


async def test_only_prefill_5xx_once_retried_on_it(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1)
    c.prefill[0].configure(fail_status=500, fail_times=1)
    status, body, _ = await post(c, {"prompt": "x", "max_tokens": 2})
    assert status == 200, body
    assert [r["status"] for r in c.prefill[0].inference_requests()] == [500, 200]


async def test_only_instances_failing_502_after_one_retry(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, decode_only_fallback=False)
    c.decode[0].configure(fail_status=500)
    status, body, _ = await post(c, {"prompt": "x", "max_tokens": 2})
    assert status == 502 and "decode instance" in json.loads(body)["error"]["message"]
    # one retry, no more; the answer continues from the prefill's token, so the retry's decode
    # instance computes prompt + token itself (no second prefill)
    assert len(reqs(c.decode)) == 2 and len(reqs(c.prefill)) == 1
    assert "kv_transfer_params" not in reqs(c.decode)[1]["body"]
    c.decode[0].configure(fail_status=None)
    c.prefill[0].configure(fail_status=503)
    status, body, _ = await post(c, {"prompt": "y", "max_tokens": 2})
    assert status == 502 and "prefill instance" in json.loads(body)["error"]["message"]
    assert len(reqs(c.prefill)) == 3


async def test_decode_unreachable_retried_without_new_prefill(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 2, decode_policy="round-robin", health_interval=30)
    await c.decode[0].stop()
    status, body, _ = await post(c, {"prompt": "r s", "max_tokens": 2})
    assert status == 200, body
    assert len(reqs(c.prefill)) == 1  # KV untouched: the same kv_transfer_params are reused


async def test_decode_fails_everywhere_non_stream_502(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 2)
    for f in c.decode:
        f.configure(fail_status=500)
    status, body, _ = await post(c, {"prompt": "x", "max_tokens": 2})
    assert status == 502
    assert json.loads(body)["error"]["type"] == "BadGatewayError"


async def test_non_stream_decode_dies_is_5xx_not_200(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, fake_kw={"require_kv_params": False})  # the retry computes the prompt
    c.decode[0].configure(die_after_tokens=1)
    status, body, _ = await post(c, {"prompt": "x", "max_tokens": 4})
    assert status == 502, body


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_decode_dies_mid_stream_error_event_then_done(make_cluster: MakeCluster, path: str) -> None:
    c = await make_cluster(1, 1, retries=0)  # no retry left (resuming: test_scheduler_first_token_stream.py)
    c.decode[0].configure(die_after_tokens=2)
    body = {"max_tokens": 5, "stream": True}
    body.update({"messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"prompt": "x"})
    status, raw, _ = await post(c, body, path)
    assert status == 200
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    err = events[-2]["error"]
    assert err["code"] == 502 and "mid-stream" in err["message"]
    assert len(reqs(c.decode)) == 1


async def test_client_disconnect_during_prefill_aborts_and_skips_decode(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1)
    c.prefill[0].configure(hang=True)
    with pytest.raises(asyncio.TimeoutError):
        async with aiohttp.ClientSession() as s:
            async with s.post(c.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3},
                              timeout=aiohttp.ClientTimeout(total=0.3)) as r:
                await r.read()
    await wait_for(lambda: reqs(c.prefill)[0]["aborted"], what="prefill call aborted")
    assert reqs(c.decode) == []


async def test_client_disconnect_after_prefill_before_decode(make_cluster: MakeCluster) -> None:
    """The prefill answered, the request waits for a decode slot, the client leaves: the decode
    instance never gets it (not even once the slot frees up) and the prefill's lease is released."""
    c = await make_cluster(1, 1, max_inflight_per_instance=1, queue_timeout=10)
    c.decode[0].configure(ttft=1.0)
    first = asyncio.create_task(post(c, {"prompt": "first", "max_tokens": 3}))  # holds the decode slot
    await wait_for(lambda: c.decode[0].inference_requests(), what="first request on decode")
    s = aiohttp.ClientSession()
    try:
        leaving = asyncio.create_task(s.post(c.url + "/v1/completions", json={"prompt": "leaves", "max_tokens": 3}))
        # its prefill is done and it waits for the decode slot
        await wait_for(lambda: c.state.pool.queue.waiting == 1 and [r["status"] for r in reqs(c.prefill)] == [200, 200],
                       what="second request prefilled and queued for decode")
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
    finally:
        await s.close()
    await wait_for(lambda: c.state.pool.queue.waiting == 0, what="the queued request gone")
    assert re.search(r'requests_total\{endpoint="completions",[^}]*status="499"\} 1.0', await metrics(c))
    assert "pdserve_scheduler_kv_leases_released_total 1.0" in await metrics(c)
    assert (await first)[0] == 200
    assert [r["body"]["prompt"] for r in reqs(c.prefill)] == ["first", "leaves"]
    assert not any(r["aborted"] for r in reqs(c.prefill))  # the prefill finished before the client left
    assert len(reqs(c.decode)) == 1  # the first request only: never sent


async def test_client_disconnect_mid_stream_aborts_decode(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1)
    c.decode[0].configure(token_latency=0.05)
    async with aiohttp.ClientSession() as s:
        async with s.post(c.url + "/v1/completions", json={"prompt": "x", "max_tokens": 100, "stream": True}) as r:
            await r.content.readuntil(b"\n\n")
            await r.content.readuntil(b"\n\n")
        # leaving the block closes the connection mid-stream
    d = reqs(c.decode)[0]
    await wait_for(lambda: d["aborted"], what="decode call aborted")
    assert d["tokens_sent"] < 100
    assert reqs(c.prefill)[0]["status"] == 200


async def test_prefill_timeout_504(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, prefill_timeout=0.2, decode_only_fallback=False)
    c.prefill[0].configure(hang=True)
    status, body, _ = await post(c, {"prompt": "x", "max_tokens": 2})
    assert status == 504 and "--prefill-timeout" in json.loads(body)["error"]["message"]
    await wait_for(lambda: reqs(c.prefill)[0]["aborted"], what="prefill call aborted")


async def test_first_token_timeout_504(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, first_token_timeout=0.2, prefill_first_token=False)
    c.decode[0].configure(ttft=2)
    status, body, _ = await post(c, {"prompt": "x", "max_tokens": 2, "stream": True})
    assert status == 504 and "--first-token-timeout" in json.loads(body)["error"]["message"]


async def test_decode_timeout_non_stream_504(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, decode_timeout=0.2)
    c.decode[0].configure(ttft=2)
    status, body, _ = await post(c, {"prompt": "x", "max_tokens": 2})
    assert status == 504 and "--decode-timeout" in json.loads(body)["error"]["message"]
    await wait_for(lambda: reqs(c.decode)[0]["aborted"], what="decode call aborted")


async def test_idle_timeout_mid_stream_error_event(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, idle_timeout=0.15, retries=0)
    c.decode[0].configure(token_latency=1.0)
    status, raw, _ = await post(c, {"prompt": "x", "max_tokens": 3, "stream": True})
    assert status == 200
    events = sse_events(raw)
    assert events[-2]["error"]["code"] == 504 and "--idle-timeout" in events[-2]["error"]["message"]
    assert events[-1] == "[DONE]"
    await wait_for(lambda: reqs(c.decode)[0]["aborted"], what="decode call aborted")


async def test_global_overload_429_with_retry_after(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, max_inflight=2, max_queue=1, queue_timeout=5)
    c.decode[0].configure(ttft=0.5)
    tasks = [asyncio.create_task(post(c, {"prompt": f"x{i}", "max_tokens": 2})) for i in range(4)]
    async def one_queued() -> bool:
        return "pdserve_scheduler_queue_length 1.0" in await metrics(c)

    await wait_for(one_queued, what="one request queued")
    results = await asyncio.gather(*tasks)
    statuses = sorted(s for s, _, _ in results)
    assert statuses == [200, 200, 200, 429]
    rejected = next(r for r in results if r[0] == 429)
    assert rejected[2]["Retry-After"] == "5"
    assert json.loads(rejected[1])["error"]["type"] == "RateLimitError"


async def test_queue_timeout_429(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, max_inflight=1, max_queue=10, queue_timeout=0.2)
    c.decode[0].configure(ttft=0.6)
    first = asyncio.create_task(post(c, {"prompt": "a", "max_tokens": 2}))
    await wait_for(lambda: c.state.admission.inflight == 1, what="first request admitted")
    status, body, headers = await post(c, {"prompt": "b", "max_tokens": 2})
    assert status == 429 and headers["Retry-After"] == "1"
    assert (await first)[0] == 200


async def test_per_instance_bound_waits_then_proceeds(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, max_inflight_per_instance=1, queue_timeout=3)
    c.decode[0].configure(ttft=0.2)
    results = await asyncio.gather(*(post(c, {"prompt": f"x{i}", "max_tokens": 2}) for i in range(3)))
    assert [s for s, _, _ in results] == [200, 200, 200]
    starts = sorted(r["t_start"] for r in reqs(c.decode))
    assert starts[2] - starts[0] >= 0.35  # served one at a time


async def test_per_instance_bound_429_after_queue_timeout(make_cluster: MakeCluster) -> None:
    c = await make_cluster(1, 1, max_inflight_per_instance=1, queue_timeout=0.2)
    c.decode[0].configure(ttft=1.0)
    results = await asyncio.gather(*(post(c, {"prompt": f"x{i}", "max_tokens": 2}) for i in range(2)))
    assert sorted(s for s, _, _ in results) == [200, 429]


async def test_a_client_that_stops_reading_is_cut_off_after_the_idle_timeout(make_cluster: MakeCluster,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp waits without a limit for a full socket buffer to drain: a client that keeps its
    connection but reads nothing would hold its slots and the decode instance's generation."""
    c = await make_cluster(1, 1, fake_kw={"max_model_len": 1_000_000}, idle_timeout=0.5)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (c.server.host, c.server.port))
    body = json.dumps({"prompt": "x", "max_tokens": 200_000, "stream": True}).encode()  # > socket buffers
    await loop.sock_sendall(sock, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    try:
        await wait_for(lambda: reqs(c.decode) and reqs(c.decode)[0]["tokens_sent"] > 0, what="decode streaming")
        assert c.state.metrics.inflight._value.get() == 1  # streaming, and the client reads nothing
        await wait_for(lambda: c.state.metrics.inflight._value.get() == 0, timeout=10, what="request cut off")
        d = reqs(c.decode)[0]
        await wait_for(lambda: d["aborted"], what="decode call aborted")
        assert d["tokens_sent"] < 200_000  # the generation stopped too
        async with c.get("/metrics") as r:
            assert re.search(r'requests_total\{endpoint="completions",[^}]*status="499"\} 1.0', await r.text())
        assert "Error handling request" not in caplog.text  # a client that left is no server error
    finally:
        sock.close()
