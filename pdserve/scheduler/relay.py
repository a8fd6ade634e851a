"""How the decode instance's answer is shaped for the client.

``OpenAIRelay`` passes bytes through (SSE events exactly as vLLM wrote them); ``GenerateRelay``
turns /v1/completions answers into vLLM's plain ``/generate`` format (``{"text": [prompt +
output, ...]}``, streamed as NUL-terminated JSON chunks with the text so far), because vLLM 0.32's
OpenAI server, which the instances run, has no ``/generate`` of its own.
"""

from __future__ import annotations

from typing import Any

from pdserve.scheduler.errors import ApiError
from pdserve.scheduler.jsonio import dumps, loads

__all__ = ["DONE", "GenerateRelay", "OpenAIRelay", "Relay", "dumps", "loads"]

DONE = b"data: [DONE]\n\n"




class OpenAIRelay:
    """Bytes as the decode instance wrote them; with a model alias, ``"model":"<instance name>"``
    becomes ``"model":"<the name the client used>"`` (a byte replace: the pattern, with its
    unescaped quotes, cannot occur inside a JSON string value such as generated text)."""

    stream_content_type: str | None = None  # None: copy the decode instance's

    def __init__(self, rename: tuple[bytes, bytes] | None = None) -> None:
        self.rename = rename
        self.passthrough = rename is None

    def transform(self, events: bytes) -> bytes:
        if self.rename is not None:
            return events.replace(*self.rename)
        return events

    def error(self, err: ApiError) -> bytes:
        # vLLM, when a stream fails after it started: one `data: {"error": ...}` event, then [DONE]
        return err.sse_event() + DONE

    def json_body(self, data: dict[str, Any]) -> bytes:
        return self.transform(dumps(data))


class GenerateRelay:
    passthrough = False
    stream_content_type = "application/octet-stream"

    def __init__(self, prompt: str) -> None:
        self.prompt = prompt
        self._texts: dict[int, str] = {}

    def _current(self) -> bytes:
        return dumps({"text": [self.prompt + self._texts[i] for i in sorted(self._texts)]}) + b"\0"

    def transform(self, events: bytes) -> bytes:
        out: list[bytes] = []
        for ev in events.split(b"\n\n"):
            if not ev.startswith(b"data: {"):
                continue
            try:
                obj = loads(ev[6:])
            except ValueError:
                continue
            if "error" in obj:
                out.append(dumps(obj) + b"\0")
                continue
            choices = obj.get("choices") or ()
            for c in choices:
                i = int(c.get("index", 0))
                self._texts[i] = self._texts.get(i, "") + (c.get("text") or "")
            if choices:
                out.append(self._current())
        return b"".join(out)

    def error(self, err: ApiError) -> bytes:
        return err.to_bytes() + b"\0"

    def json_body(self, data: dict[str, Any]) -> bytes:
        choices = sorted(data.get("choices") or (), key=lambda c: c.get("index", 0))
        return dumps({"text": [self.prompt + (c.get("text") or "") for c in choices]})


Relay = OpenAIRelay | GenerateRelay
