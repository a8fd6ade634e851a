"""The prefill instance's token goes to the client at once; the decode instance continues after it.

The prefill call samples the first output token anyway (``max_tokens=1``). In the plain hand-over
that token is thrown away: the decode instance pulls the KV, computes the last prompt token again
and samples the same token, one HTTP hop, one pull and one or two engine steps later. Here the
scheduler streams the prefill's token as soon as the prefill answers, and asks the decode instance
to continue from *prompt + that token*, as token ids on ``/v1/completions``: it pulls the prompt's
KV as usual and computes one token (the first one) before sampling the second. The client's first
token no longer waits for the hand-over, and the tokens are the ones one server would produce
(the continuation is conditioned on exactly the token the client got).

Non-stream requests take the same path: the first token is then computed exactly as one server
computes it, in one pass over the whole prompt (the plain hand-over recomputes the last prompt
token alone on the decode side, whose bf16 rounding can flip a near-tie). Their answer is the
prefill's own answer with the continuation's text, finish reason and usage put in (``answer``).

Only requests whose every field continues exactly take this path: one choice, no stop strings,
no logprobs, greedy or unseeded sampling, an explicit or default ``max_tokens`` (chat's default,
the rest of the context, needs the model length and instances that report that default: a
generation-config ``max_new_tokens`` would change it), and for chat, text-only messages without
tools. Anything else, and a first token that is empty or an incomplete character, takes the
plain hand-over. Chat streams are rebuilt from the completion stream (``ChatFromCompletion``) in
vLLM's chunk format. An answer that its first token completes is the prefill's answer
(``complete_answer``; streams get it as vLLM's events, ``stream_events``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from pdserve.scheduler.jsonio import dumps, loads
from pdserve.scheduler.relay import ReadsOpenAIStream

__all__ = ["FirstToken", "ChatFromCompletion", "SameCreated", "TokenTap", "complete_answer", "eligible",
           "from_prefill", "stream_events", "MAX_TOKENS_DEFAULT"]

MAX_TOKENS_DEFAULT = 16  # vLLM's /v1/completions default when max_tokens is absent

# Fields the continuation honours exactly (the token moved from output to prompt changes nothing:
# vLLM's repetition penalty covers prompt and output alike; min_tokens is reduced by one).
_SAFE = frozenset({
    "model", "stream", "stream_options", "max_tokens", "min_tokens", "temperature", "top_p", "top_k",
    "min_p", "ignore_eos", "repetition_penalty", "stop_token_ids", "skip_special_tokens",
    "spaces_between_special_tokens", "include_stop_str_in_output", "user", "priority", "logit_bias",
    "allowed_token_ids",
})
# Fields that only shape the prompt: the prefill instance rendered them into the token ids.
_CHAT_PROMPT = frozenset({"messages", "add_generation_prompt", "continue_final_message", "chat_template",
                          "chat_template_kwargs", "documents", "max_completion_tokens", "parallel_tool_calls"})
_COMPLETION_PROMPT = frozenset({"prompt", "add_special_tokens"})
# Fields allowed only with a value that turns their feature off.
_OFF = frozenset({
    "stop", "logprobs", "top_logprobs", "echo", "suffix", "best_of", "use_beam_search", "length_penalty",
    "prompt_logprobs", "return_token_ids", "return_tokens_as_token_ids", "response_format",
    "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "tools", "tool_choice", "functions", "function_call", "bad_words", "truncate_prompt_tokens",
    "presence_penalty", "frequency_penalty", "kv_transfer_params", "reasoning_effort", "include_reasoning",
})


def _is_off(key: str, value: Any) -> bool:
    if value is None or value is False or value in ("", [], {}):
        return True
    if key == "best_of":
        return value == 1
    if key in ("presence_penalty", "frequency_penalty", "top_logprobs"):
        return value == 0
    if key == "tool_choice":
        return value == "none"
    return False


def _text_only(messages: Any) -> bool:
    if not isinstance(messages, list):
        return False
    for m in messages:
        if not isinstance(m, dict):
            return False
        c = m.get("content")
        if isinstance(c, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in c):
                return False  # images, audio: their data is not in the token ids
        elif c is not None and not isinstance(c, str):
            return False
    return True


def requested_max_tokens(endpoint: str, body: dict[str, Any]) -> int | None:
    if endpoint == "chat":
        return body.get("max_completion_tokens") or body.get("max_tokens")
    return body.get("max_tokens", MAX_TOKENS_DEFAULT)


def eligible(endpoint: str, body: dict[str, Any], max_model_len: int | None = None,
             chat_default_is_context: bool = False) -> bool:
    """Whether the request can continue from the prefill's token and give exactly what one server
    gives (pure; unknown fields say no)."""
    if endpoint not in ("completions", "chat") or body.get("stream") not in (True, False, None):
        return False
    prompt_keys = _CHAT_PROMPT if endpoint == "chat" else _COMPLETION_PROMPT
    for key, value in body.items():
        if key in _SAFE or key in prompt_keys:
            continue
        if key == "n" and value in (None, 1):
            continue
        if key == "seed" and (value is None or body.get("temperature") == 0):
            continue  # a seeded sampler would restart its random stream on the decode side
        if key in _OFF and _is_off(key, value):
            continue
        return False
    m = requested_max_tokens(endpoint, body)
    if m is None and endpoint == "chat" and max_model_len and chat_default_is_context:
        pass  # vLLM's chat default, the rest of the context: the continuation asks for it minus one
    elif not isinstance(m, int) or m < 1 or (m == 1 and (not body.get("stream") or body.get("min_tokens"))):
        # one non-stream token: the prefill's answer is the whole answer anyway; with min_tokens the
        # prefill's answer (called without it) may end too early and nothing could continue it
        return False
    if endpoint == "chat":
        return _text_only(body.get("messages"))
    prompt = body.get("prompt")
    return isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt)
                                       and all(type(t) is int for t in prompt))


@dataclass(slots=True)
class FirstToken:
    """The prefill's sampled token, and how to continue after it."""

    endpoint: str
    token_id: int
    text: str
    prompt_ids: list[int]
    response_id: str
    created: int
    model: str
    max_model_len: int | None = None
    prefill_answer: dict[str, Any] | None = None  # vLLM's own answer for this token (non-stream template)
    generated: tuple[int, ...] = ()  # tokens after this one the client already got (a resumed stream)

    @property
    def fingerprint(self) -> str | None:
        """The prefill's ``system_fingerprint``: every chunk of the answer carries one, as from one server."""
        fp = (self.prefill_answer or {}).get("system_fingerprint")
        return fp if isinstance(fp, str) else None

    @property
    def moved(self) -> int:
        """Output tokens the continuation's prompt carries (the decode instance counts them as prompt)."""
        return 1 + len(self.generated)

    def resumed(self, generated: list[int], body: dict[str, Any]) -> "FirstToken | None":
        """The same answer, to go on after ``generated`` more tokens (a decode instance failed
        mid-stream; another one continues from exactly what the client has). None: nothing is left
        to generate."""
        nxt = replace(self, generated=(*self.generated, *generated))
        room = len(self.prompt_ids) + nxt.moved < (self.max_model_len or 1 << 62)
        return nxt if room and nxt._wanted(body) - nxt.moved >= 1 else None

    def _wanted(self, body: dict[str, Any]) -> int:
        wanted = requested_max_tokens(self.endpoint, body)
        if wanted is None:  # chat's default: all the context leaves
            wanted = (self.max_model_len or 0) - len(self.prompt_ids)
        return wanted

    # -- what the client gets at once --------------------------------------------------------------
    def events(self, continuous_usage: bool) -> bytes:
        """The SSE events vLLM would have sent for this token (chat: the role chunk first)."""
        n = len(self.prompt_ids)
        out = []
        if self.endpoint == "chat":  # vLLM 0.32's fields, nulls included
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}
            token = {"index": 0, "delta": {"content": self.text}, "logprobs": None, "finish_reason": None,
                     "token_ids": None}
            for choice, k in ((role, 0), (token, 1)):
                obj = self._head("chat.completion.chunk", [choice])
                if continuous_usage:
                    obj["usage"] = {"prompt_tokens": n, "completion_tokens": k, "total_tokens": n + k,
                                    "completion_tokens_details": None}
                if k == 0:
                    obj.update(prompt_token_ids=None, prompt_text=None)
                out.append(b"data: " + dumps(obj) + b"\n\n")
        else:
            obj = self._head("text_completion", [{"index": 0, "text": self.text, "logprobs": None,
                                                  "finish_reason": None, "stop_reason": None,
                                                  "prompt_token_ids": None, "token_ids": None}])
            if continuous_usage:
                obj["usage"] = {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1}
            out.append(b"data: " + dumps(obj) + b"\n\n")
        return b"".join(out)

    def _head(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.response_id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    # -- what the decode instance gets -------------------------------------------------------------
    def decode_body(self, body: dict[str, Any], kvtp: dict[str, Any] | None, token_ids: bool = False) -> bytes:
        """A /v1/completions request that continues after the token (with the prompt's KV params).
        ``token_ids``: ask for them (a stream that may resume elsewhere if its decode instance
        fails; ``TokenTap`` records and hides them)."""
        out: dict[str, Any] = {k: v for k, v in body.items() if k in _SAFE}
        out["prompt"] = [*self.prompt_ids, self.token_id, *self.generated]
        # chat's default is all the context leaves (the prompt now holds the moved tokens too)
        out["max_tokens"] = self._wanted(body) - self.moved
        if body.get("min_tokens"):
            out["min_tokens"] = max(0, int(body["min_tokens"]) - self.moved)
        if token_ids:
            out["return_token_ids"] = True
        if body.get("seed") is not None:
            out["seed"] = body["seed"]
        if kvtp is not None:
            out["kv_transfer_params"] = kvtp
        return dumps(out)

    def answer(self, cont: dict[str, Any]) -> dict[str, Any]:
        """A non-stream answer: the prefill's token and the decode instance's continuation (a
        /v1/completions answer), in the prefill's answer, which is vLLM's format for the endpoint."""
        out, choice = _clients_copy(self.prefill_answer or {}, keep_ids=False)
        got = (cont.get("choices") or [{}])[0]
        text = self.text + (got.get("text") or "")
        if self.endpoint == "chat":
            choice["message"] = {**choice["message"], "content": text}
        else:
            choice["text"] = text
        choice["finish_reason"], choice["stop_reason"] = got.get("finish_reason"), got.get("stop_reason")
        out["usage"] = cont.get("usage")
        return out

    def fix_usage(self, usage: dict[str, Any]) -> None:
        """The decode instance counted the moved tokens as prompt; the client's answer counts them
        as output."""
        if isinstance(usage.get("prompt_tokens"), int) and usage["prompt_tokens"] >= self.moved:
            usage["prompt_tokens"] -= self.moved
        if isinstance(usage.get("completion_tokens"), int):
            usage["completion_tokens"] += self.moved


def from_prefill(endpoint: str, data: Any, max_model_len: int | None) -> FirstToken | None:
    """The prefill answer's token, when the answer can go on after it; else None (plain hand-over)."""
    choice = _one_choice(data)
    if choice is None or choice.get("finish_reason") != "length":
        return None  # nothing to continue (a stop ended it: complete_answer's case) or another shape
    ids = choice.get("token_ids")
    prompt_ids = data.get("prompt_token_ids") if endpoint == "chat" else choice.get("prompt_token_ids")
    if not (isinstance(ids, list) and len(ids) == 1 and type(ids[0]) is int):
        return None
    if not (isinstance(prompt_ids, list) and prompt_ids and all(type(t) is int for t in prompt_ids)):
        return None
    if endpoint == "chat":
        msg = choice.get("message")
        if not isinstance(msg, dict) or msg.get("reasoning") or msg.get("reasoning_content") or msg.get("tool_calls"):
            return None  # a reasoning or tool parser is at work: leave the answer to vLLM's chat server
        text = msg.get("content")
    else:
        text = choice.get("text")
    if not isinstance(text, str) or not text or "\ufffd" in text:
        return None  # an empty (special) token or part of a character: no text to send yet
    if max_model_len and len(prompt_ids) + 1 >= max_model_len:
        return None  # the context is full after this token
    return FirstToken(endpoint, ids[0], text, list(prompt_ids), str(data.get("id") or ""),
                      int(data.get("created") or 0), str(data.get("model") or ""), max_model_len, data)


def complete_answer(endpoint: str, body: dict[str, Any], data: Any) -> dict[str, Any] | None:
    """The prefill's answer as the whole non-stream answer, when it is one: its first token ended
    it (a stop token or string) or the client asked for one token. It is then exactly what one
    server answers (the prefill call honoured every field but the ones checked here), and the
    decode instance is not asked at all: its recompute of the last prompt token could even turn a
    near-tie the other way. A stream gets it as events (``stream_events``); the caller checks that
    the stream is ``eligible`` (its events are built here, so no logprobs or token ids). None: the
    answer goes on (pure)."""
    if body.get("n") not in (None, 1) or body.get("best_of") not in (None, 1) \
            or body.get("use_beam_search") or body.get("min_tokens"):
        return None  # fields the prefill call leaves out
    choice = _one_choice(data)
    if choice is None:
        return None
    reason = choice.get("finish_reason")
    if not (reason == "stop" or (reason == "length" and requested_max_tokens(
            "chat" if endpoint == "chat" else "completions", body) == 1)):
        return None
    msg = choice.get("message")
    if body.get("stream") and isinstance(msg, dict) and (
            msg.get("reasoning") or msg.get("reasoning_content") or msg.get("tool_calls")):
        return None  # a parser is at work: stream_events builds content deltas only
    return _clients_copy(data, keep_ids=bool(body.get("return_token_ids")))[0]


def stream_events(endpoint: str, answer: dict[str, Any], stream_options: Any) -> bytes:
    """A complete one-token answer (``complete_answer``'s) as the SSE events vLLM 0.32 streams for
    it: chat's role chunk, the token's chunk with its finish reason, the usage chunk when asked
    for, ``[DONE]``; nulls and ``system_fingerprint`` where vLLM puts them."""
    opts = stream_options if isinstance(stream_options, dict) else {}
    include = opts.get("include_usage") is True
    continuous = include and opts.get("continuous_usage_stats") is True
    choice = answer["choices"][0]
    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
    n, k = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    chat = endpoint == "chat"
    kind = "chat.completion.chunk" if chat else "text_completion"

    def head(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": answer.get("id"), "object": kind, "created": answer.get("created"),
                "model": answer.get("model"), "choices": choices}

    def running(done: int) -> dict[str, Any]:  # per-chunk usage (continuous_usage_stats)
        u: dict[str, Any] = {"prompt_tokens": n, "total_tokens": n + done, "completion_tokens": done}
        if chat:
            u["completion_tokens_details"] = None
        return u

    events = []
    ending = {"finish_reason": choice.get("finish_reason"), "stop_reason": choice.get("stop_reason")}
    if chat:
        role = head([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
        if continuous:
            role["usage"] = running(0)
        role.update(prompt_token_ids=None, prompt_text=None)
        events.append(role)
        text = (choice.get("message") or {}).get("content") or ""
        last = head([{"index": 0, "delta": {"content": text}, "logprobs": None, **ending, "token_ids": None}])
    else:
        last = head([{"index": 0, "text": choice.get("text") or "", "logprobs": None, **ending,
                      "prompt_token_ids": None, "token_ids": None}])
    if continuous:
        last["usage"] = running(k)
    fingerprint = answer.get("system_fingerprint")
    if not include and fingerprint is not None:
        last["system_fingerprint"] = fingerprint
    events.append(last)
    if include:  # vLLM dumps the final usage chunk without its null fields
        final = head([])
        final["usage"] = {key: ({d: x for d, x in v.items() if x is not None} if isinstance(v, dict) else v)
                          for key, v in usage.items() if v is not None}
        if fingerprint is not None:
            final["system_fingerprint"] = fingerprint
        events.append(final)
    return b"".join(b"data: " + dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def _one_choice(data: Any) -> dict[str, Any] | None:
    """The only choice of a prefill answer (it was called with n=1), or None if it has another shape."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    return choices[0]


def _clients_copy(answer: dict[str, Any], keep_ids: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """A copy of the prefill's one-choice answer (and of its choice) without what the scheduler
    added to the prefill call: the token ids (unless the client asked for them too) and the
    kv_transfer_params, nulled as vLLM nulls them."""
    out = dict(answer)
    choice = dict(out["choices"][0])
    out["choices"] = [choice]
    if not keep_ids:
        for key in ("token_ids", "prompt_token_ids"):
            if key in choice:
                choice[key] = None
        if "prompt_token_ids" in out:
            out["prompt_token_ids"] = None
    if "kv_transfer_params" in out:
        out["kv_transfer_params"] = None
    return out, choice


class ChatFromCompletion(ReadsOpenAIStream):
    """Rewrites the decode instance's completion stream into chat chunks (id, created and model of
    the prefill's answer; errors and [DONE] unchanged), then hands them to the client's relay."""

    def __init__(self, first: FirstToken, inner: Any) -> None:
        self.first = first
        self.inner = inner
        self.stream_content_type = inner.stream_content_type

    def error(self, err: Any) -> bytes:
        return self.inner.error(err)

    def transform(self, events: bytes) -> bytes:
        return self.inner.transform(self._rewrite(events))

    def _rewrite(self, events: bytes) -> bytes:
        return b"".join(self._chunk(ev) + b"\n\n" for ev in events.split(b"\n\n") if ev)

    def _chunk(self, ev: bytes) -> bytes:
        """One event as a chat chunk; anything that is not a completion chunk ([DONE], an error
        event) as it is."""
        try:
            obj = loads(ev[6:]) if ev.startswith(b"data: {") else None
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or "choices" not in obj:
            return ev
        choices = []
        for c in obj["choices"] or ():
            ch: dict[str, Any] = {"index": c.get("index", 0), "delta": {"content": c.get("text") or ""},
                                  "logprobs": None, "finish_reason": c.get("finish_reason")}
            if c.get("finish_reason") is not None:
                ch["stop_reason"] = c.get("stop_reason")
            ch["token_ids"] = c.get("token_ids")
            choices.append(ch)
        chat = self.first._head("chat.completion.chunk", choices)
        if "usage" in obj:
            chat["usage"] = usage = obj["usage"]
            if choices and isinstance(usage, dict):  # vLLM's per-chunk chat usage has this null
                usage.setdefault("completion_tokens_details", None)
        if "system_fingerprint" in obj:  # vLLM stamps it on the terminal chunk
            chat["system_fingerprint"] = self.first.fingerprint or obj["system_fingerprint"]
        return b"data: " + dumps(chat)


_IDS = re.compile(rb'"(prompt_token_ids|token_ids)":\[([0-9, ]*)\]')
_FINISHED = re.compile(rb'"finish_reason":"')
_NO_TEXT = re.compile(rb'"text":""')  # a completion chunk without text


class TokenTap:
    """Records the token ids of the decode instance's stream (the continuation asks for them) and
    nulls them, as the client did not ask: if that instance fails mid-stream, another one can go
    on from the tokens the client has (``FirstToken.resumed``). (The patterns, with their
    unescaped quotes, cannot match inside generated text.)

    Ids of chunks without text (a token holding part of a character, which vLLM holds back) stay
    pending until text follows: a resume regenerates them, so it never starts mid-character."""

    def __init__(self) -> None:
        self.ids: list[int] = []  # tokens whose text the client has
        self.pending: list[int] = []
        self.finished = False  # a finish reason went out: nothing is left to resume

    def take(self, events: bytes) -> bytes:
        """``events`` with their ids recorded and nulled."""
        if _FINISHED.search(events):
            self.finished = True
        if b"token_ids" not in events:
            return events
        return b"\n\n".join(self._event(ev) for ev in events.split(b"\n\n"))

    def _event(self, ev: bytes) -> bytes:
        got: list[int] = []

        def null(m: re.Match[bytes]) -> bytes:
            if m.group(1) == b"token_ids" and m.group(2).strip():
                got.extend(int(t) for t in m.group(2).split(b","))
            return b'"' + m.group(1) + b'":null'

        out = _IDS.sub(null, ev)
        if got:
            self.pending.extend(got)
            if not _NO_TEXT.search(ev):
                self.ids.extend(self.pending)
                self.pending.clear()
        return out


_CREATED = re.compile(rb'"created":\d+')
_FINGERPRINT = re.compile(rb'"system_fingerprint":"[^"\\]*"')


class SameCreated(ReadsOpenAIStream):
    """A completion stream's later chunks come from the decode instance, whose ``created`` can be
    a second past the prefill's on the first chunk: every chunk gets the first one's, as from one
    server, and the prefill's ``system_fingerprint`` (the decode instance's config hashes
    differently). (The patterns, with their unescaped quotes, cannot match inside generated
    text.)"""

    def __init__(self, first: FirstToken, inner: Any) -> None:
        self.inner = inner
        self.created = b'"created":%d' % first.created
        fp = first.fingerprint
        self.fingerprint = None if fp is None else b'"system_fingerprint":' + dumps(fp)
        self.stream_content_type = inner.stream_content_type

    def error(self, err: Any) -> bytes:
        return self.inner.error(err)

    def transform(self, events: bytes) -> bytes:
        events = _CREATED.sub(self.created, events)
        if self.fingerprint is not None and b'"system_fingerprint"' in events:
            events = _FINGERPRINT.sub(lambda _: self.fingerprint, events)
        return self.inner.transform(events)
