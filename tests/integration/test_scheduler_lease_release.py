"""When no decode instance gets a prefilled request, the scheduler releases the prefill's KV lease
itself (a ZMQ ROUTER stands in for the prefill worker's side channel)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import zmq

from pdserve.kv import messages as m
from tests.integration.conftest import Cluster, MakeCluster

pytestmark = pytest.mark.integration


@pytest.fixture
def side_channel() -> Iterator[tuple[zmq.Socket, int]]:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, port
    sock.close(linger=0)


async def received(sock: zmq.Socket, wait: float) -> list[m.Release]:
    """Every side-channel message that arrives within ``wait`` seconds."""
    got: list[m.Release] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while loop.time() < deadline:
        if sock.poll(10):
            got.append(m.decode(sock.recv_multipart()[-1]))  # type: ignore[arg-type]
        else:
            await asyncio.sleep(0.02)
    return got


async def released_total(c: Cluster) -> float:
    async with c.get("/metrics") as r:
        text = await r.text()
    line = next(x for x in text.splitlines() if x.startswith("pdserve_scheduler_kv_leases_released_total"))
    return float(line.split()[-1])


async def test_decode_refusing_the_request_releases_the_lease(make_cluster: MakeCluster, side_channel) -> None:
    sock, port = side_channel
    c = await make_cluster(1, 1, fake_kw={"kv_port": port})
    c.decode[0].configure(fail_status=400)
    async with c.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 3}) as r:
        assert r.status == 400
        request_id = r.headers["X-Request-Id"]
    got = await received(sock, 1.0)
    assert [(type(x), x.req_id) for x in got] == [(m.Release, request_id)]
    assert c.prefill[0].inference_requests()[0]["request_id"] == request_id
    assert await released_total(c) == 1


async def test_a_served_request_leaves_the_lease_to_the_decode_side(make_cluster: MakeCluster,
                                                                    side_channel) -> None:
    sock, port = side_channel
    c = await make_cluster(1, 1, fake_kw={"kv_port": port})
    async with c.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 3, "stream": True}) as r:
        assert r.status == 200
        await r.read()
    assert await received(sock, 0.3) == []
    assert await released_total(c) == 0


async def test_a_decode_failure_after_the_request_was_sent_is_left_to_the_decode_side(
        make_cluster: MakeCluster, side_channel) -> None:
    """A 5xx may come after the decode engine took the request: its connector confirms or
    releases; a release from the scheduler could free blocks the decode side still reads."""
    sock, port = side_channel
    c = await make_cluster(1, 1, fake_kw={"kv_port": port}, retries=0)
    c.decode[0].configure(fail_status=500)
    async with c.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 3}) as r:
        assert r.status == 502
    assert await received(sock, 0.3) == []


async def test_a_client_leaving_while_decode_has_the_request_leaves_the_lease_to_it(
        make_cluster: MakeCluster, side_channel) -> None:
    """The decode instance got the request (it may be pulling the blocks) when the client left:
    its connector releases or confirms; a release from the scheduler could free blocks mid-read."""
    import aiohttp

    sock, port = side_channel
    c = await make_cluster(1, 1, fake_kw={"kv_port": port})
    c.decode[0].configure(ttft=1.0)  # still working on it when the client leaves
    with pytest.raises(asyncio.TimeoutError):
        async with aiohttp.ClientSession() as s:
            async with s.post(c.url + "/v1/completions", json={"prompt": "a b c", "max_tokens": 3},
                              timeout=aiohttp.ClientTimeout(total=0.4)) as r:
                await r.read()
    assert await received(sock, 0.8) == []
    assert len(c.decode[0].inference_requests()) == 1
    assert await released_total(c) == 0
