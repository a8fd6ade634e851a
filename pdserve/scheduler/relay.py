"""How the decode instance's answer is shaped for the client.

``OpenAIRelay`` passes bytes through (SSE events exactly as vLLM wrote them); ``GenerateRelay``
turns /v1/completions answers into vLLM's plain ``/generate`` format (``{"text": [prompt +
output, ...]}``, streamed as NUL-terminated JSON chunks with the text so far), because vLLM 0.32's
OpenAI server, which the instances run, has no ``/generate`` of its own.
"""

from __future__ import annotations

import re
from typing import Any

from pdserve.scheduler.errors import ApiError
from pdserve.scheduler.jsonio import dumps, loads

__all__ = ["DONE", "GenerateRelay", "MessagesRelay", "OpenAIRelay", "ReadsOpenAIStream", "Relay", "ResponsesRelay",
           "dumps", "loads"]

DONE = b"data: [DONE]\n\n"




class ReadsOpenAIStream:
    """How a relay that reads a completions or chat stream from the decode instance counts its
    output events and sees its end."""

    last_event = "[DONE]"

    @staticmethod
    def tokens(events: bytes) -> int:
        """The stream events in ``events`` that carry output: every ``data:`` event but ``[DONE]``
        and chat's role chunks (a role delta carries no token; an escaped ``"role":`` in a text
        cannot match)."""
        return events.count(b"data: {") - events.count(b'"role":')

    @staticmethod
    def ended(events: bytes) -> bool:
        """``events`` end the stream (vLLM's last event)."""
        return events.endswith(DONE)

    _OPENING: tuple[bytes, ...] = ()  # events a stream starts with before its first token

    @classmethod
    def opening_only(cls, buf: bytes) -> bool:
        """``buf`` (the stream's first bytes) has nothing but the stream's opening yet: every event
        so far (the last one maybe partial) is one of ``_OPENING``."""
        if not cls._OPENING:
            return False
        *done, rest = buf.split(b"\n\n")
        if not all(ev.startswith(cls._OPENING) for ev in done if ev):
            return False
        return not rest or any(p.startswith(rest[:len(p)]) for p in cls._OPENING)


class OpenAIRelay(ReadsOpenAIStream):
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


class ResponsesRelay(OpenAIRelay):
    """``/v1/responses`` streams: ``event: <type>`` lines, no ``[DONE]``; they open with
    ``response.created`` and ``response.in_progress`` before any token, end with
    ``response.completed`` (or ``.incomplete``/``.failed``), and carry output in ``*.delta``
    events. Events are numbered (``sequence_number``): an error event the scheduler adds goes on
    from the last one relayed."""

    last_event = "response.completed"
    _END = (b"event: response.completed\n", b"event: response.incomplete\n", b"event: response.failed\n")
    _OPENING = (b"event: response.created\n", b"event: response.in_progress\n")
    _DELTA = re.compile(rb"^event: response\.[a-z_.]*delta$", re.MULTILINE)
    _SEQ = re.compile(rb'"sequence_number":(\d+)')

    def __init__(self, rename: tuple[bytes, bytes] | None = None) -> None:
        super().__init__(rename)
        self.sequence = -1

    def transform(self, events: bytes) -> bytes:
        if seqs := self._SEQ.findall(events):
            self.sequence = int(seqs[-1])
        return super().transform(events)

    def error(self, err: ApiError) -> bytes:
        return b"event: error\ndata: " + dumps({
            "type": "error", "code": "server_error" if err.status >= 500 else "invalid_request_error",
            "message": err.message, "param": err.param, "sequence_number": self.sequence + 1}) + b"\n\n"

    @classmethod
    def tokens(cls, events: bytes) -> int:
        return len(cls._DELTA.findall(events))

    @classmethod
    def ended(cls, events: bytes) -> bool:
        return any(end in events for end in cls._END)


class MessagesRelay(OpenAIRelay):
    """Anthropic ``/v1/messages`` streams: ``event: <type>`` lines, no ``[DONE]``; they open with
    ``message_start`` (and maybe ``ping``), carry output in ``content_block_delta`` events and
    end with ``message_stop``. Errors in Anthropic's shape."""

    last_event = "message_stop"
    _OPENING = (b"event: message_start\n", b"event: ping\n")

    def error(self, err: ApiError) -> bytes:
        return b"event: error\ndata: " + dumps(err.anthropic_dict()) + b"\n\n"

    @staticmethod
    def tokens(events: bytes) -> int:
        # text and thinking deltas (a tool call's JSON and a signature come in other delta types)
        return events.count(b'"type":"text_delta"') + events.count(b'"type":"thinking_delta"')

    @staticmethod
    def ended(events: bytes) -> bool:
        return b"event: message_stop\n" in events


class GenerateRelay(ReadsOpenAIStream):
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
