"""Graceful drain of a real scheduler process: SIGTERM → new requests 503, in-flight ones finish, exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time

import aiohttp
import pytest

from tests.integration.conftest import start_fakes, wait_for
from tests.integration.test_scheduler_api import sse_events

pytestmark = pytest.mark.integration


async def _draining(s: aiohttp.ClientSession, url: str) -> bool:
    """The scheduler took the signal: its /health answers 503."""
    async with s.get(url + "/health") as r:
        return r.status == 503


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _start_scheduler(prefill_port: int, decode_port: int, *extra: str) -> tuple[asyncio.subprocess.Process, str]:
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pdserve.scheduler", "--host", "127.0.0.1", "--port", str(port),
        "--prefill-url", f"127.0.0.1:{prefill_port}", "--decode-url", f"127.0.0.1:{decode_port}",
        "--health-interval", "0.5", *extra,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PDSERVE_STARTUP_TIMEOUT": "20"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            assert proc.returncode is None, (await proc.stderr.read()).decode()  # type: ignore[union-attr]
            try:
                async with s.get(url + "/health") as r:
                    if r.status == 200:
                        return proc, url
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    proc.kill()
    raise AssertionError("scheduler did not start")


@pytest.fixture
async def slow_fakes():  # type: ignore[no-untyped-def]
    prefill, decode = await start_fakes(1, 1)
    decode[0].configure(token_latency=0.1)
    yield prefill, decode
    for f in prefill + decode:
        await f.stop()


async def test_sigterm_drains_inflight_refuses_new_and_exits_0(slow_fakes) -> None:  # type: ignore[no-untyped-def]
    prefill, decode = slow_fakes
    proc, url = await _start_scheduler(prefill[0].port, decode[0].port, "--drain-seconds", "20")
    try:
        async with aiohttp.ClientSession() as s, aiohttp.ClientSession() as s2:
            async with s.post(url + "/v1/completions",
                              json={"prompt": "long answer", "max_tokens": 15, "stream": True}) as stream:
                assert stream.status == 200
                first = await stream.content.readuntil(b"\n\n")
                t_signal = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                await wait_for(lambda: _draining(s2, url), what="draining")
                async with s2.post(url + "/v1/completions", json={"prompt": "new", "max_tokens": 2}) as r:
                    assert r.status == 503
                    err = (await r.json())["error"]
                    assert "draining" in err["message"] and err["code"] == 503
                    assert r.headers.get("Connection", "").lower() == "close"
                async with s2.get(url + "/health") as r:
                    assert r.status == 503
                async with s2.get(url + "/metrics") as r:
                    assert "pdserve_scheduler_draining 1.0" in await r.text()
                rest = await stream.read()
            events = sse_events(first + rest)
            assert events[-1] == "[DONE]"
            assert [e["choices"][0]["text"] for e in events[:-1]] == [f" c0t{k}" for k in range(15)]
        code = await asyncio.wait_for(proc.wait(), 10)
        assert code == 0, (await proc.stderr.read()).decode()  # type: ignore[union-attr]
        assert time.monotonic() - t_signal < 8  # left as soon as the stream was done, not after 20 s
        log = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
        assert "draining" in log and "Traceback" not in log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # the new request never reached an instance
    assert len(decode[0].inference_requests()) == 1
    assert [r["body"]["prompt"] for r in prefill[0].inference_requests()] == ["long answer"]


async def test_drain_deadline_cuts_long_stream_and_exits_0(slow_fakes) -> None:  # type: ignore[no-untyped-def]
    prefill, decode = slow_fakes
    proc, url = await _start_scheduler(prefill[0].port, decode[0].port, "--drain-seconds", "0.5")
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/completions",
                              json={"prompt": "very long", "max_tokens": 200, "stream": True}) as stream:
                await stream.content.readuntil(b"\n\n")
                t = time.monotonic()
                proc.send_signal(signal.SIGINT)
                with pytest.raises(aiohttp.ClientPayloadError):
                    await stream.read()
        code = await asyncio.wait_for(proc.wait(), 10)
        assert code == 0
        assert time.monotonic() - t < 5
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # the cut reached the decode instance
    await wait_for(lambda: decode[0].inference_requests()[0]["aborted"], what="decode call aborted")


async def test_second_signal_stops_at_once(slow_fakes) -> None:  # type: ignore[no-untyped-def]
    prefill, decode = slow_fakes
    proc, url = await _start_scheduler(prefill[0].port, decode[0].port, "--drain-seconds", "60")
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/completions",
                              json={"prompt": "x", "max_tokens": 200, "stream": True}) as stream:
                await stream.content.readuntil(b"\n\n")
                t = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                # the first signal took effect (draining) before the second
                await wait_for(lambda: _draining(s, url), what="draining")
                assert proc.returncode is None  # still draining the stream (60 s allowed)
                proc.send_signal(signal.SIGTERM)
                with pytest.raises(aiohttp.ClientPayloadError):
                    await stream.read()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert time.monotonic() - t < 5
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
