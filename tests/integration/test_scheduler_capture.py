"""Data capture (数据回流): what a JSONL record holds, sampling, redaction, rotation, crash safety,
and that a slow disk never slows a request down."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pdserve.scheduler.capture import CaptureRecord, CaptureSettings, CaptureSink
from tests.integration.conftest import Cluster, MakeCluster, wait_for

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"


async def lines_in(path: Path, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            rows = [json.loads(x) for x in path.read_text().splitlines()]
            if len(rows) >= n:
                return rows
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {n} lines in {path}")


async def capturing(make_cluster: MakeCluster, tmp_path: Path, **settings: Any) -> tuple[Cluster, Path]:
    path = tmp_path / "capture" / "requests.jsonl"
    c = await make_cluster(1, 1, capture=CaptureSettings(path=str(path), **settings),
                           served_model_names=["chat-alias"])
    return c, path


async def test_records_request_answer_timings_for_stream_and_json(make_cluster: MakeCluster, tmp_path: Path) -> None:
    c, path = await capturing(make_cluster, tmp_path)
    msgs = [{"role": "user", "content": "hello there"}]
    async with c.post(CHAT, json={"model": "chat-alias", "messages": msgs, "max_tokens": 3, "stream": True,
                                  "stream_options": {"include_usage": True}}, headers={"X-Request-Id": "rid-1"}) as r:
        assert r.status == 200
        await r.read()
    async with c.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 2, "n": 2},
                      headers={"X-Request-Id": "rid-2"}) as r:
        assert r.status == 200
    rows = await lines_in(path, 2)
    s, j = rows
    assert s["request_id"] == "rid-1" and s["endpoint"] == "chat" and s["status"] == 200 and s["stream"] is True
    assert s["model"] == "chat-alias" and s["request"]["messages"] == msgs
    assert s["response"]["choices"] == [{"index": 0, "text": " c0t0 c0t1 c0t2", "finish_reason": "length"}]
    assert s["response"]["usage"]["completion_tokens"] == 3 and s["usage"]["completion_tokens"] == 3
    assert s["ttft_ms"] > 0 and s["e2e_ms"] >= s["ttft_ms"] and s["prefill_ms"] > 0
    assert len(s["instances"]) == 2 and s["decode_only"] is None and s["error"] is None
    assert j["request_id"] == "rid-2" and j["stream"] is False
    assert [ch["text"] for ch in j["response"]["choices"]] == [" c0t0 c0t1", " c1t0 c1t1"]
    assert j["response"]["choices"][0]["finish_reason"] == "length"


async def test_failed_requests_are_captured_with_status_and_error(make_cluster: MakeCluster, tmp_path: Path) -> None:
    c, path = await capturing(make_cluster, tmp_path)
    for f in c.decode:
        f.configure(fail_status=500)
    async with c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}) as r:
        assert r.status == 502
    (row,) = await lines_in(path, 1)
    assert row["status"] == 502 and "decode instance" in row["error"] and row["response"] is None


async def test_sample_rate_zero_writes_nothing(make_cluster: MakeCluster, tmp_path: Path) -> None:
    c, path = await capturing(make_cluster, tmp_path, sample_rate=0.0)
    sink = c.state.capture
    assert sink is not None
    offered = []
    real_offer = sink.offer

    def counting_offer(rec: CaptureRecord) -> bool:
        offered.append(rec)
        return real_offer(rec)

    sink.offer = counting_offer  # type: ignore[method-assign]
    for i in range(5):
        async with c.post("/v1/completions", json={"prompt": f"x{i}", "max_tokens": 1}) as r:
            assert r.status == 200
    # a record is offered before the answer goes out: none was, so none can be written later
    assert offered == [] and sink.written == 0 and sink.dropped == 0
    assert not path.exists() or path.read_text() == ""


async def test_redaction_by_field_and_pattern(make_cluster: MakeCluster, tmp_path: Path) -> None:
    c, path = await capturing(make_cluster, tmp_path, redact=("messages",),
                              redact_patterns=(r"\b\d{4}-\d{4}-\d{4}-\d{4}\b", r"sk-[A-Za-z0-9]+"))
    secret_msgs = [{"role": "user", "content": "my card 1234-5678-9012-3456"}]
    async with c.post(CHAT, json={"messages": secret_msgs, "max_tokens": 1}) as r:
        assert r.status == 200
    async with c.post("/v1/completions", json={"prompt": "token sk-abcdef123 and card 1111-2222-3333-4444",
                                               "max_tokens": 1}) as r:
        assert r.status == 200
    rows = await lines_in(path, 2)
    text = path.read_text()
    assert "1234-5678" not in text and "sk-abcdef123" not in text and "1111-2222" not in text
    assert rows[0]["request"]["messages"] == "[REDACTED]"
    assert rows[1]["request"]["prompt"] == "token [REDACTED] and card [REDACTED]"


async def test_rotation_keeps_backups_and_whole_lines(make_cluster: MakeCluster, tmp_path: Path) -> None:
    c, path = await capturing(make_cluster, tmp_path, max_bytes=2000, backups=2)
    for i in range(30):
        async with c.post("/v1/completions", json={"prompt": f"request number {i} " + "w " * 20,
                                                   "max_tokens": 2}) as r:
            assert r.status == 200
    sink = c.state.capture
    assert sink is not None
    await wait_for(lambda: sink.written + sink.dropped == 30, what="30 records written")
    assert sink.dropped == 0
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["requests.jsonl", "requests.jsonl.1", "requests.jsonl.2"]
    for p in path.parent.iterdir():
        assert p.stat().st_size <= 2000
        for line in p.read_text().splitlines():
            json.loads(line)
    newest = [json.loads(x)["request"]["prompt"] for x in path.read_text().splitlines()]
    assert newest[-1].startswith("request number 29 ")


async def test_slow_disk_never_slows_requests_drops_counted(make_cluster: MakeCluster, tmp_path: Path) -> None:
    c, path = await capturing(make_cluster, tmp_path, queue_size=2)
    sink = c.state.capture
    assert sink is not None
    real = sink._writer.write_line
    writing, disk_back = threading.Event(), threading.Event()

    def stalled_write(line: bytes) -> None:
        writing.set()
        disk_back.wait(30)  # a stalled disk, until the test lets it go
        real(line)

    sink._writer.write_line = stalled_write  # type: ignore[method-assign]
    try:
        async with c.post("/v1/completions", json={"prompt": "x0", "max_tokens": 1}) as r:
            assert r.status == 200
        await wait_for(writing.is_set, what="the writer stuck on the first record")
        for i in range(1, 10):
            async with c.post("/v1/completions", json={"prompt": f"x{i}", "max_tokens": 1}) as r:
                assert r.status == 200
        # all 10 answered while the disk was stalled: nothing written yet, nobody waited for it
        assert sink.written == 0
        # one record in the writer's hands, two queued (queue_size=2), the other seven dropped
        assert sink.dropped == 7
        async with c.get("/metrics") as r:
            text = await r.text()
        assert "pdserve_scheduler_capture_dropped_total 7.0" in text
    finally:
        disk_back.set()
    rows = await lines_in(path, 3)
    assert [row["request"]["prompt"] for row in rows] == ["x0", "x1", "x2"]
    await wait_for(lambda: sink.written == 3, what="the three kept records written")


def test_lines_stay_valid_when_the_process_is_killed(tmp_path: Path) -> None:
    """SIGKILL while the writer thread is busy: every complete line parses, at most the last one is
    torn (Linux may cut a multi-page write on a fatal signal), and the next writer to open the file
    (the scheduler's restart) truncates that torn tail, so the file is valid JSONL again."""
    path = tmp_path / "crash.jsonl"
    script = textwrap.dedent(f"""
        import sys, time
        from pdserve.scheduler.capture import CaptureRecord, CaptureSettings, CaptureSink
        sink = CaptureSink(CaptureSettings(path={str(path)!r}, max_bytes=0, queue_size=100000))
        big = "x" * 20000
        i = 0
        while True:
            if sink.offer(CaptureRecord(meta={{"i": i}}, request={{"prompt": big}}, stream=False,
                                        response=b'{{"choices": [{{"text": "' + big.encode() + b'"}}]}}')):
                i += 1
            if i % 200 == 0:
                print(i, flush=True)
                time.sleep(0.001)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        deadline = time.monotonic() + 10
        while (not path.exists() or path.stat().st_size < 2_000_000) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    data = path.read_bytes()
    assert len(data) > 1_000_000
    complete, _, torn = data.rpartition(b"\n")
    ids = [json.loads(line)["i"] for line in complete.splitlines()]
    assert ids == list(range(len(ids)))  # nothing lost or interleaved before the cut
    if torn:  # the cut write: no newline, not JSON
        with pytest.raises(ValueError):
            json.loads(torn)
    sink = CaptureSink(CaptureSettings(path=str(path)))  # the restart
    sink.offer(CaptureRecord(meta={"i": "after"}, request={}, stream=False))
    sink.close()
    lines = path.read_bytes().splitlines()
    assert [json.loads(x)["i"] for x in lines] == [*ids, "after"]


async def test_a_non_stream_answer_continued_from_the_prefill_is_recorded_whole(make_cluster: MakeCluster,
                                                                               tmp_path: Path) -> None:
    """The record holds what the client got: the prefill's token, then the continuation."""
    c, path = await capturing(make_cluster, tmp_path)
    async with c.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 3}) as r:
        assert r.status == 200
        got = await r.json()
    (row,) = await lines_in(path, 1)
    assert row["response"]["choices"][0]["text"] == got["choices"][0]["text"] == " c0t0 c0t1 c0t2"
    assert row["response"]["usage"]["completion_tokens"] == 3
