"""Which requests may continue after the prefill's token, and how the pieces are rebuilt."""

from __future__ import annotations

import json

import pytest

from pdserve.scheduler.first_token import ChatFromCompletion, FirstToken, eligible, from_prefill
from pdserve.scheduler.relay import OpenAIRelay

pytestmark = pytest.mark.unit

BASE = {"model": "m", "prompt": "hello", "max_tokens": 8, "stream": True}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}


@pytest.mark.parametrize("extra", [
    {}, {"temperature": 0, "seed": 1}, {"temperature": 0.8}, {"top_p": 0.9, "top_k": 5, "min_p": 0.1},
    {"stop": None}, {"stop": []}, {"n": 1}, {"logprobs": None}, {"min_tokens": 3}, {"ignore_eos": True},
    {"repetition_penalty": 1.1}, {"presence_penalty": 0}, {"stream_options": {"include_usage": True}},
    {"prompt": [1, 2, 3]}, {"stream": False}, {"stream": None},
    {"max_tokens": 1},  # a one-token stream: the prefill's answer, streamed (no continuation)
])
def test_eligible_completions(extra: dict) -> None:
    assert eligible("completions", {**BASE, **extra})


@pytest.mark.parametrize("extra", [
    {"stream": "yes"}, {"stop": "x"}, {"logprobs": 0}, {"n": 2}, {"temperature": 0.8, "seed": 1}, {"seed": 1},
    {"max_tokens": 1, "stream": False}, {"max_tokens": 1, "min_tokens": 1}, {"max_tokens": 0},
    {"max_tokens": None}, {"echo": True}, {"presence_penalty": 0.5}, {"best_of": 2},
    {"prompt": ["a", "b"]}, {"prompt": [[1, 2]]}, {"prompt": []}, {"suffix": "z"}, {"unknown_field": 1},
    {"response_format": {"type": "json_object"}}, {"kv_transfer_params": {"do_remote_decode": True}},
])
def test_not_eligible_completions(extra: dict) -> None:
    assert not eligible("completions", {**BASE, **extra})


def test_completions_default_max_tokens_is_vllms_16() -> None:
    body = {k: v for k, v in BASE.items() if k != "max_tokens"}
    assert eligible("completions", body)
    first = FirstToken("completions", 5, "x", [1, 2], "cmpl-1", 0, "m")
    assert json.loads(first.decode_body(body, None))["max_tokens"] == 15


@pytest.mark.parametrize("extra, ok", [
    ({}, True), ({"max_tokens": None, "max_completion_tokens": 4}, True), ({"max_tokens": None}, False),
    ({"tools": [{"type": "function"}]}, False), ({"tools": []}, True), ({"tool_choice": "none"}, True),
    ({"logprobs": True}, False), ({"chat_template_kwargs": {"x": 1}}, True),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}, True),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]}, False),
    ({"reasoning_effort": "high"}, False),
])
def test_eligible_chat(extra: dict, ok: bool) -> None:
    assert eligible("chat", {**CHAT, **extra}) is ok
    assert not eligible("generate", {**BASE})


def test_chat_without_max_tokens_asks_for_the_rest_of_the_context() -> None:
    """vLLM's chat default is all the context leaves: the continuation asks for that minus one."""
    body = {k: v for k, v in CHAT.items() if k != "max_tokens"}
    assert not eligible("chat", body) and not eligible("chat", body, max_model_len=100)  # default unknown
    assert eligible("chat", body, max_model_len=100, chat_default_is_context=True)
    first = FirstToken("chat", 5, "x", [1, 2, 3], "chatcmpl-1", 0, "m", max_model_len=100)
    assert json.loads(first.decode_body(body, None))["max_tokens"] == 100 - 3 - 1


def completion_answer(**choice) -> dict:
    c = {"index": 0, "text": " Paris", "finish_reason": "length", "token_ids": [7042],
         "prompt_token_ids": [1, 2, 3], **choice}
    return {"id": "cmpl-abc", "created": 5, "model": "m", "choices": [c]}


def test_from_prefill_completion() -> None:
    first = from_prefill("completions", completion_answer(), 100)
    assert first is not None and (first.token_id, first.text, first.prompt_ids) == (7042, " Paris", [1, 2, 3])


@pytest.mark.parametrize("change", [
    {"finish_reason": "stop"}, {"token_ids": None}, {"token_ids": [1, 2]}, {"prompt_token_ids": None},
    {"text": ""}, {"text": "\ufffd"},
])
def test_from_prefill_refuses(change: dict) -> None:
    assert from_prefill("completions", completion_answer(**change), 100) is None


def test_from_prefill_refuses_a_full_context() -> None:
    assert from_prefill("completions", completion_answer(), 4) is None
    assert from_prefill("completions", completion_answer(), 5) is not None


def test_from_prefill_chat_leaves_reasoning_and_tools_to_vllm() -> None:
    def answer(**msg) -> dict:
        return {"id": "chatcmpl-1", "created": 1, "model": "m", "prompt_token_ids": [4, 5],
                "choices": [{"index": 0, "finish_reason": "length", "token_ids": [9],
                             "message": {"role": "assistant", "content": "Hi", **msg}}]}
    assert from_prefill("chat", answer(), None) is not None
    assert from_prefill("chat", answer(content=None, reasoning="think"), None) is None
    assert from_prefill("chat", answer(tool_calls=[{"id": "t"}]), None) is None


def test_decode_body_continues_after_the_token() -> None:
    first = FirstToken("chat", 9, "Hi", [4, 5], "chatcmpl-1", 1, "m")
    body = {**CHAT, "max_completion_tokens": 6, "min_tokens": 1, "temperature": 0, "seed": 3,
            "chat_template_kwargs": {"a": 1}, "stream_options": {"include_usage": True}}
    assert "return_token_ids" not in json.loads(first.decode_body(body, None))
    out = json.loads(first.decode_body(body, {"remote_request_id": "r"}, token_ids=True))
    assert out == {"model": "m", "stream": True, "stream_options": {"include_usage": True}, "temperature": 0,
                   "prompt": [4, 5, 9], "max_tokens": 5, "min_tokens": 0, "seed": 3,
                   "return_token_ids": True,  # a stream records its tokens, to resume elsewhere
                   "kv_transfer_params": {"remote_request_id": "r"}}


def test_a_resumed_stream_continues_after_the_tokens_the_client_has() -> None:
    first = FirstToken("completions", 9, "Hi", [4, 5], "cmpl-1", 1, "m", max_model_len=100)
    body = {**BASE, "max_tokens": 6, "min_tokens": 4}
    again = first.resumed([11, 12], body)
    assert again is not None and again.moved == 3 and again.prompt_ids == [4, 5]
    out = json.loads(again.decode_body(body, None))
    assert (out["prompt"], out["max_tokens"], out["min_tokens"]) == ([4, 5, 9, 11, 12], 3, 1)
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    again.fix_usage(usage)
    assert usage == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}
    assert again.resumed([13, 14], body) is not None and again.resumed([13, 14, 15], body) is None  # 6 reached
    # chat's default max_tokens (the rest of the context): resumed while context is left
    chat = FirstToken("chat", 9, "Hi", [4, 5], "c", 1, "m", max_model_len=6)
    no_max = {k: v for k, v in CHAT.items() if k != "max_tokens"}
    assert chat.resumed([1, 2], no_max) is not None and chat.resumed([1, 2, 3], no_max) is None


def test_token_tap_records_and_hides_the_ids() -> None:
    from pdserve.scheduler.first_token import TokenTap

    tap = TokenTap()
    out = tap.take(b'data: {"choices":[{"index":0,"text":"say \\"token_ids\\":[7]","finish_reason":null,'
                   b'"prompt_token_ids":[4, 5, 9],"token_ids":[11,12]}]}\n\n')
    assert tap.ids == [11, 12] and not tap.finished
    choice = json.loads(out[6:])["choices"][0]
    assert choice["token_ids"] is None and choice["prompt_token_ids"] is None
    assert choice["text"] == 'say "token_ids":[7]'  # generated text is left alone
    tap.take(b'data: {"choices":[{"index":0,"text":"","finish_reason":"length","token_ids":[13]}]}\n\n')
    assert tap.finished


def test_token_tap_never_resumes_mid_character() -> None:
    """A token holding part of a character comes with empty text (vLLM holds the bytes back): it
    stays pending, so a resume regenerates it instead of starting inside the character."""
    from pdserve.scheduler.first_token import TokenTap

    tap = TokenTap()
    chunk = b'data: {"choices":[{"index":0,"text":"%s","finish_reason":null,"token_ids":[%d]}]}\n\n'
    tap.take(chunk % (b" a", 1) + chunk % (b"", 2))
    assert (tap.ids, tap.pending) == ([1], [2])
    tap.take(chunk % (b"\xf0\x9f\x98\x80", 3))  # the character is complete: both are the client's
    assert (tap.ids, tap.pending) == ([1, 2, 3], [])


def test_usage_counts_the_token_as_output() -> None:
    usage = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
    FirstToken("chat", 9, "Hi", [4, 5], "chatcmpl-1", 1, "m").fix_usage(usage)
    assert usage == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def test_first_events_look_like_vllms() -> None:
    chat = FirstToken("chat", 9, "Hi", [4, 5], "chatcmpl-1", 1, "m").events(continuous_usage=True)
    evs = [json.loads(e[6:]) for e in chat.split(b"\n\n") if e]
    assert [e["choices"][0]["delta"] for e in evs] == [{"role": "assistant", "content": ""}, {"content": "Hi"}]
    assert [e["usage"]["completion_tokens"] for e in evs] == [0, 1]
    comp = FirstToken("completions", 9, " Hi", [4], "cmpl-1", 1, "m").events(continuous_usage=False)
    ev = json.loads(comp[6:-2])
    assert ev["object"] == "text_completion" and ev["choices"][0]["text"] == " Hi" and "usage" not in ev


def test_the_chunks_built_from_the_prefill_carry_vllms_fields() -> None:
    """The same keys as vLLM 0.32's own chunks, nulls included (clients that index them must work)."""
    chat = FirstToken("chat", 9, "Hi", [4, 5], "chatcmpl-1", 1, "m").events(False).split(b"\n\n")
    role, token = json.loads(chat[0][6:]), json.loads(chat[1][6:])
    assert role["prompt_token_ids"] is None and role["prompt_text"] is None and "token_ids" not in role["choices"][0]
    assert token["choices"][0]["token_ids"] is None and "prompt_text" not in token
    comp = json.loads(FirstToken("completions", 9, "Hi", [4, 5], "cmpl-1", 1, "m").events(False)[6:])
    assert list(comp["choices"][0]) == ["index", "text", "logprobs", "finish_reason", "stop_reason",
                                        "prompt_token_ids", "token_ids"]


def test_chat_from_completion_stream() -> None:
    first = FirstToken("chat", 9, "Hi", [4, 5], "chatcmpl-1", 1, "m")
    relay = ChatFromCompletion(first, OpenAIRelay((b'"model":"m"', b'"model":"alias"')))
    src = (b'data: {"id":"cmpl-1","object":"text_completion","created":2,"model":"m","choices":[{"index":0,'
           b'"text":" there","logprobs":null,"finish_reason":"length","stop_reason":null,"prompt_token_ids":null,'
           b'"token_ids":null}]}\n\n'
           b'data: {"id":"cmpl-1","object":"text_completion","created":2,"model":"m","choices":[],'
           b'"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4},"system_fingerprint":"fp"}\n\n'
           b'data: {"error":{"message":"boom","code":500}}\n\ndata: [DONE]\n\n')
    out = relay.transform(src).split(b"\n\n")
    a, b = json.loads(out[0][6:]), json.loads(out[1][6:])
    assert a == {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "alias",
                 "choices": [{"index": 0, "delta": {"content": " there"}, "logprobs": None,
                              "finish_reason": "length", "stop_reason": None, "token_ids": None}]}
    assert b["choices"] == [] and b["usage"]["total_tokens"] == 4 and b["object"] == "chat.completion.chunk"
    assert b["system_fingerprint"] == "fp"  # the terminal chunk carries vLLM's fingerprint
    assert out[2] == b'data: {"error":{"message":"boom","code":500}}' and out[3] == b"data: [DONE]"


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_non_stream_answer_is_the_prefills_answer_with_the_continuation(endpoint: str) -> None:
    if endpoint == "chat":
        pre = {"id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": " Paris", "tool_calls": []},
                            "logprobs": None, "finish_reason": "length", "stop_reason": None, "token_ids": [7042]}],
               "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
               "prompt_token_ids": [1, 2, 3], "kv_transfer_params": {"do_remote_prefill": True},
               "system_fingerprint": None}
    else:
        pre = {**completion_answer(), "id": "cmpl-1", "object": "text_completion", "created": 7,
               "usage": {"prompt_tokens": 3, "completion_tokens": 1}, "kv_transfer_params": {"do_remote_prefill": True}}
    first = from_prefill(endpoint, pre, 100)
    assert first is not None
    cont = {"id": "cmpl-other", "created": 8, "choices": [{"index": 0, "text": " is big.", "finish_reason": "stop",
                                                           "stop_reason": None, "token_ids": None}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}}
    out = first.answer(cont)
    choice = out["choices"][0]
    text = choice["message"]["content"] if endpoint == "chat" else choice["text"]
    assert text == " Paris is big." and choice["finish_reason"] == "stop" and choice["token_ids"] is None
    assert (out["id"], out["created"], out["object"]) == (pre["id"], 7, pre["object"])
    assert out["kv_transfer_params"] is None and out.get("prompt_token_ids") is None
    assert out["usage"] is cont["usage"]  # the scheduler then moves the token from prompt to output
    assert pre["choices"][0]["finish_reason"] == "length"  # the template itself is left alone
    if endpoint == "chat":
        assert choice["message"]["tool_calls"] == [] and out["system_fingerprint"] is None


def test_a_completion_stream_keeps_the_first_chunks_created() -> None:
    from pdserve.scheduler.first_token import SameCreated

    relay = SameCreated(FirstToken("completions", 9, "Hi", [4, 5], "cmpl-1", 100, "m"), OpenAIRelay())
    ev = (b'data: {"id":"cmpl-1","object":"text_completion","created":101,"model":"m","choices":[{"index":0,'
          b'"text":"say \\"created\\":7","logprobs":null,"finish_reason":null}]}\n\n')
    out = json.loads(relay.transform(ev)[6:])
    assert out["created"] == 100 and out["choices"][0]["text"] == 'say "created":7'  # text untouched


@pytest.mark.parametrize(("body", "finish", "whole"), [
    ({"max_tokens": 8}, "stop", True),               # EOS (or a stop string) as the first token
    ({"max_tokens": 1}, "length", True),             # one token asked for
    ({"max_tokens": 8}, "length", False),            # the answer goes on
    ({"max_tokens": 8, "min_tokens": 2}, "stop", False),  # the prefill call left min_tokens out
    ({"max_tokens": 8, "n": 2}, "stop", False),
    ({"max_tokens": 8, "stream": True}, "stop", True),  # streamed by stream_events
    ({"max_tokens": 1, "stream": True, "min_tokens": 1}, "length", False),
])
def test_complete_answer(body: dict, finish: str, whole: bool) -> None:
    from pdserve.scheduler.first_token import complete_answer

    data = {**completion_answer(finish_reason=finish), "kv_transfer_params": {"remote_block_ids": [1]}}
    out = complete_answer("completions", {"prompt": "x", **body}, data)
    assert (out is not None) is whole
    if out is not None:
        assert out["kv_transfer_params"] is None and out["choices"][0]["token_ids"] is None
        assert out["choices"][0]["prompt_token_ids"] is None and data["choices"][0]["token_ids"] == [7042]
        kept = complete_answer("completions", {"prompt": "x", "return_token_ids": True, **body}, data)
        assert kept is not None and kept["choices"][0]["token_ids"] == [7042]  # the client asked for them


def _events(raw: bytes) -> list:
    return [e[6:] if e == b"data: [DONE]" else json.loads(e[6:]) for e in raw.split(b"\n\n") if e]


# vLLM 0.32's own streams of one-token answers (captured from `vllm serve` on the demo model)
_VLLM_COMPLETION = [
    {"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "m", "choices": [
        {"index": 0, "text": "\n", "logprobs": None, "finish_reason": "length", "stop_reason": None,
         "prompt_token_ids": None, "token_ids": None}], "system_fingerprint": "fp"},
    b"[DONE]"]
_VLLM_CHAT_USAGE = [
    {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "m", "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
     "usage": {"prompt_tokens": 31, "total_tokens": 31, "completion_tokens": 0, "completion_tokens_details": None},
     "prompt_token_ids": None, "prompt_text": None},
    {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "m", "choices": [
        {"index": 0, "delta": {"content": ""}, "logprobs": None, "finish_reason": "stop", "stop_reason": 19556,
         "token_ids": None}],
     "usage": {"prompt_tokens": 31, "total_tokens": 32, "completion_tokens": 1, "completion_tokens_details": None}},
    {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "m", "choices": [],
     "usage": {"prompt_tokens": 31, "total_tokens": 32, "completion_tokens": 1,
               "prompt_tokens_details": {"cached_tokens": 16}}, "system_fingerprint": "fp"},
    b"[DONE]"]


def test_a_complete_one_token_answer_streams_as_vllm_streams_it() -> None:
    from pdserve.scheduler.first_token import stream_events

    comp = {**completion_answer(text="\n", finish_reason="length"), "id": "cmpl-1", "created": 5,
            "system_fingerprint": "fp", "usage": {"prompt_tokens": 8, "total_tokens": 9, "completion_tokens": 1}}
    assert _events(stream_events("completions", comp, None)) == _VLLM_COMPLETION
    chat = {"id": "chatcmpl-1", "object": "chat.completion", "created": 5, "model": "m", "system_fingerprint": "fp",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": "stop", "stop_reason": 19556, "token_ids": None}],
            "usage": {"prompt_tokens": 31, "total_tokens": 32, "completion_tokens": 1,
                      "prompt_tokens_details": {"cached_tokens": 16, "created_cache_tokens": None},
                      "completion_tokens_details": None}}
    opts = {"include_usage": True, "continuous_usage_stats": True}
    assert _events(stream_events("chat", chat, opts)) == _VLLM_CHAT_USAGE


def test_a_one_token_chat_stream_with_reasoning_is_left_to_vllm() -> None:
    """stream_events builds content deltas only: a reasoning or tool-call answer takes the plain way."""
    from pdserve.scheduler.first_token import complete_answer

    for msg in ({"role": "assistant", "content": None, "reasoning": "hmm"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "t"}]}):
        data = {"id": "c", "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]}
        assert complete_answer("chat", {"max_tokens": 4, "stream": True}, data) is None
        assert complete_answer("chat", {"max_tokens": 4}, data) is not None  # non-stream: vLLM's own answer


def test_a_continued_stream_carries_the_prefills_fingerprint() -> None:
    """Prefill and decode instances hash different configs: a client sees one fingerprint per
    answer, the prefill's (as in a non-stream answer, which is the prefill's own)."""
    from pdserve.scheduler.first_token import SameCreated

    pre = {"system_fingerprint": "vllm-0.32.0-prefill"}
    first = FirstToken("completions", 9, "Hi", [4, 5], "cmpl-1", 100, "m", prefill_answer=pre)
    ev = b'data: {"id":"cmpl-1","created":101,"choices":[],"usage":{},"system_fingerprint":"vllm-0.32.0-decode"}\n\n'
    assert json.loads(SameCreated(first, OpenAIRelay()).transform(ev)[6:])["system_fingerprint"] == \
        "vllm-0.32.0-prefill"
    chat = ChatFromCompletion(FirstToken("chat", 9, "Hi", [4, 5], "c-1", 100, "m", prefill_answer=pre), OpenAIRelay())
    assert json.loads(chat.transform(ev)[6:])["system_fingerprint"] == "vllm-0.32.0-prefill"
