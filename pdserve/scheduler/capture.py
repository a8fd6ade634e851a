"""Data capture (数据回流): each sampled request and its final answer as one JSON line.

Off by default. The request path only does ``queue.put_nowait`` of a record that holds references
(the request dict, the raw answer bytes or the list of relayed SSE chunks): it never waits, never
serialises, never parses. A full queue drops the record and counts it
(``pdserve_scheduler_capture_dropped_total``); a slow disk can cost records, never latency.

The writer thread assembles the answer (for streams: the text of every choice from the SSE
chunks), applies redaction, serialises, and appends the line with **one** ``os.write`` on an
``O_APPEND`` descriptor: there is no user-space buffer to lose, and a line is never interleaved
with another. One write is not atomic against SIGKILL, though: Linux stops a multi-page write to a
regular file between pages when a fatal signal is pending (measured: ``kill -9`` during 40 KB
records leaves a torn last line about one run in three). So a crash can leave at most the *last*
line torn, without its newline, and the writer repairs that when it opens the file again (the
scheduler's next start): it truncates the file back to its last complete line and logs how many
bytes it dropped. Every complete line always parses. Files rotate at ``max_bytes`` like
``logging.handlers.RotatingFileHandler``: ``FILE`` → ``FILE.1`` → ... → ``FILE.<backups>``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("pdserve.scheduler.capture")

REDACTED = "[REDACTED]"


@dataclass(frozen=True)
class CaptureSettings:
    path: str
    sample_rate: float = 1.0
    max_bytes: int = 100 * 1024 * 1024
    backups: int = 5
    redact: tuple[str, ...] = ()
    redact_patterns: tuple[str, ...] = ()
    queue_size: int = 10000


@dataclass(slots=True)
class CaptureRecord:
    """What the request path hands over: references only, turned into JSON by the writer thread."""

    meta: dict[str, Any]  # request id, endpoint, model, status, timings, instances, usage, error, ...
    request: Any  # the JSON body forwarded to the instances (what the model saw)
    stream: bool
    response: bytes | None = None  # non-stream: the decode instance's JSON answer
    chunks: list[bytes] = field(default_factory=list)  # stream: the SSE events as relayed


def assemble_stream(chunks: Iterable[bytes]) -> dict[str, Any]:
    """Text, finish reason and usage of an OpenAI SSE stream (completions or chat, n choices; a
    responses stream: its text deltas, and status and usage from its last event; a messages
    stream: its text deltas and stop reason)."""
    texts: dict[int, list[str]] = {}
    finish: dict[int, Any] = {}
    usage: Any = None
    error: Any = None
    model: Any = None
    for ev in b"".join(chunks).split(b"\n\n"):
        if ev.startswith(b"event: "):  # a responses event: `event: <type>` then its data line
            ev = ev.partition(b"\n")[2]
        if not ev.startswith(b"data: {"):
            continue
        try:
            obj = json.loads(ev[6:])
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        kind = obj.get("type")
        if kind == "response.output_text.delta" and isinstance(obj.get("delta"), str):
            texts.setdefault(0, []).append(obj["delta"])
        elif kind in ("response.completed", "response.incomplete", "response.failed") \
                and isinstance(obj.get("response"), dict):
            resp = obj["response"]
            usage, model, finish[0] = resp.get("usage"), resp.get("model"), resp.get("status")
        elif kind == "content_block_delta" and isinstance(obj.get("delta"), dict):  # /v1/messages
            if isinstance(obj["delta"].get("text"), str):
                texts.setdefault(0, []).append(obj["delta"]["text"])
        elif kind == "message_start" and isinstance(obj.get("message"), dict):
            model = obj["message"].get("model")
        elif kind == "message_delta":
            finish[0] = (obj.get("delta") or {}).get("stop_reason")
        elif kind == "error":
            error = {k: v for k, v in obj.items() if k != "type"}
        if "error" in obj:
            error = obj["error"]
        if obj.get("usage"):
            usage = obj["usage"]
        model = obj.get("model", model)
        for c in obj.get("choices") or ():
            if not isinstance(c, dict):
                continue
            i = c.get("index", 0)
            delta = c.get("delta")
            piece = delta.get("content") if isinstance(delta, dict) else c.get("text")
            if isinstance(piece, str):
                texts.setdefault(i, []).append(piece)
            else:
                texts.setdefault(i, [])
            if c.get("finish_reason") is not None:
                finish[i] = c["finish_reason"]
    order = sorted(set(texts) | set(finish))
    return {"model": model, "choices": [{"index": i, "text": "".join(texts.get(i, ())),
                                         "finish_reason": finish.get(i)} for i in order],
            "usage": usage, "error": error}


def assemble_json(payload: bytes) -> dict[str, Any]:
    """The same summary for a non-stream answer (chat message content or completion text)."""
    try:
        obj = json.loads(payload)
    except ValueError:
        return {"raw": payload[:4096].decode("utf-8", "replace")}
    if not isinstance(obj, dict):
        return {"raw": obj}
    choices = []
    for c in obj.get("choices") or ():
        if not isinstance(c, dict):
            continue
        msg = c.get("message")
        text = msg.get("content") if isinstance(msg, dict) else c.get("text")
        choices.append({"index": c.get("index", 0), "text": text, "finish_reason": c.get("finish_reason")})
    if obj.get("type") == "message":  # /v1/messages: the text blocks
        text = "".join(b.get("text") or "" for b in obj.get("content") or () if isinstance(b, dict))
        choices = [{"index": 0, "text": text, "finish_reason": obj.get("stop_reason")}]
    if obj.get("object") == "response":  # /v1/responses: the output messages' text
        text = "".join(part.get("text") or "" for item in obj.get("output") or () if isinstance(item, dict)
                       for part in item.get("content") or () if isinstance(part, dict))
        choices = [{"index": 0, "text": text, "finish_reason": obj.get("status")}]
    return {"model": obj.get("model"), "choices": choices, "usage": obj.get("usage"), "error": obj.get("error")}


class Redactor:
    """Field names (matched at any depth) and regexes (in every string) → ``[REDACTED]``."""

    def __init__(self, fields: Iterable[str], patterns: Iterable[str]) -> None:
        self.fields = frozenset(fields)
        self.patterns = [re.compile(p) for p in patterns]

    def __bool__(self) -> bool:
        return bool(self.fields or self.patterns)

    def apply(self, obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: REDACTED if k in self.fields else self.apply(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.apply(v) for v in obj]
        if isinstance(obj, str) and self.patterns:
            for p in self.patterns:
                obj = p.sub(REDACTED, obj)
        return obj


class RotatingJsonlWriter:
    """Appends whole lines with one ``os.write`` each; rotates before a line would pass max_bytes."""

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._fd = self._open()
        self._size = self._repair_torn_tail()

    def _repair_torn_tail(self) -> int:
        """Truncate a last line without its newline (a write cut by a crash); return the size."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return 0
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return size
            end, keep = size, 0
            while end > 0:
                start = max(0, end - 65536)
                f.seek(start)
                block = f.read(end - start)
                nl = block.rfind(b"\n")
                if nl >= 0:
                    keep = start + nl + 1
                    break
                end = start
        os.truncate(self.path, keep)
        log.warning("capture: %s ended with a torn line (a crash cut its write); dropped its %d bytes",
                    self.path, size - keep)
        return keep

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)

    def _rotate(self) -> None:
        os.close(self._fd)
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        else:
            os.truncate(self.path, 0)
        self._fd = self._open()
        self._size = 0

    def write_line(self, line: bytes) -> None:
        if self.max_bytes > 0 and self._size > 0 and self._size + len(line) > self.max_bytes:
            self._rotate()
        view = memoryview(line)
        while view:  # a regular file takes it in one call; loop only for the pathological case
            n = os.write(self._fd, view)
            view = view[n:]
        self._size += len(line)

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass


_STOP = object()


class CaptureSink:
    """Bounded queue + one writer thread. ``offer`` never blocks the event loop."""

    def __init__(self, settings: CaptureSettings, on_drop: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.redactor = Redactor(settings.redact, settings.redact_patterns)
        self._q: queue.Queue[Any] = queue.Queue(maxsize=max(1, settings.queue_size))
        self._on_drop = on_drop
        self.dropped = 0
        self.written = 0
        self._writer = RotatingJsonlWriter(settings.path, settings.max_bytes, settings.backups)
        self._thread = threading.Thread(target=self._run, name="pdserve-capture", daemon=True)
        self._thread.start()

    def offer(self, record: CaptureRecord) -> bool:
        try:
            self._q.put_nowait(record)
            return True
        except queue.Full:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()
            return False

    def line(self, rec: CaptureRecord) -> bytes:
        """One record as one JSON line (runs on the writer thread)."""
        obj: dict[str, Any] = {"ts": rec.meta.pop("ts", time.time()), **rec.meta, "request": rec.request}
        if rec.stream:
            obj["response"] = assemble_stream(rec.chunks) if rec.chunks else None
        else:
            obj["response"] = assemble_json(rec.response) if rec.response is not None else None
        if self.redactor:
            obj = self.redactor.apply(obj)
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str).encode() + b"\n"

    def _run(self) -> None:
        while True:
            rec = self._q.get()
            if rec is _STOP:
                break
            try:
                self._writer.write_line(self.line(rec))
                self.written += 1
            except Exception:  # a bad record or a full disk must not kill the writer
                log.exception("capture: could not write a record")

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (bounded by ``timeout``), then stop the thread."""
        try:
            self._q.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._writer.close()
