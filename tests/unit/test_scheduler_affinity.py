"""The decode-side prefix tracker, the conservative token estimate and stream assembly for capture."""

from __future__ import annotations

import pytest

from pdserve.scheduler.affinity import PrefixTracker, prompt_upper_tokens, upper_tokens
from pdserve.scheduler.capture import Redactor, assemble_json, assemble_stream

pytestmark = pytest.mark.unit


def chat(*contents: str) -> dict:
    roles = ["system", "user", "assistant"]
    return {"messages": [{"role": roles[min(i, 2)] if i < 2 else ("assistant" if i % 2 == 0 else "user"),
                          "content": c} for i, c in enumerate(contents)]}


def test_next_turn_matches_previous_prompt_at_message_boundary() -> None:
    t = PrefixTracker(chunk_chars=64)
    turn1 = chat("sys", "first question")
    t.record("d0", t.points("chat", turn1))
    turn2 = chat("sys", "first question", "an answer", "second question")
    pp = t.points("chat", turn2)
    matched = t.matched("d0", pp)
    assert matched == len("<system>sys") + len("<user>first question")
    assert pp.suffix(matched) == "<assistant>an answer<user>second question"
    assert t.matched("d1", pp) == 0
    assert t.matched("d0", t.points("chat", chat("other sys", "first question"))) == 0


def test_long_completion_prompts_match_in_chunks() -> None:
    t = PrefixTracker(chunk_chars=16)
    base = "x" * 100
    t.record("d0", t.points("completions", {"prompt": base}))
    assert t.matched("d0", t.points("completions", {"prompt": base + "yyy"})) == 96
    assert t.matched("d0", t.points("completions", {"prompt": base})) == 100
    t.forget("d0")
    assert t.matched("d0", t.points("completions", {"prompt": base})) == 0


def test_an_adapters_prefixes_are_its_own() -> None:
    """The same prompt under a LoRA adapter has other KV: cached under the base model, it is no match."""
    t = PrefixTracker(chunk_chars=16)
    prompt = {"prompt": "x" * 40}
    t.record("d0", t.points("completions", prompt))
    t.record("d1", t.points("completions", prompt, adapter="a1"))
    assert t.matched("d0", t.points("completions", prompt, adapter="a1")) == 0
    assert t.matched("d1", t.points("completions", prompt, adapter="a1")) == 40
    assert t.matched("d1", t.points("completions", prompt, adapter="a2")) == 0
    assert t.matched("d1", t.points("completions", prompt)) == 0


def test_a_responses_input_counts_every_items_text() -> None:
    """Tool outputs and calls carry their text outside ``content``: a long one is a long prompt."""
    body = {"instructions": "be brief", "input": [
        {"role": "user", "content": "run it"},
        {"type": "function_call", "name": "f", "arguments": "{}", "call_id": "c"},
        {"type": "function_call_output", "call_id": "c", "output": "x" * 25_000}]}
    assert prompt_upper_tokens("responses", body, 100_000) >= 12_500
    assert PrefixTracker(64).points("responses", body).total_chars > 25_000


def test_a_messages_request_routes_without_its_billing_header() -> None:
    """Claude Code's per-request billing header would give every request its own prefix; vLLM
    drops it from the prompt, so routing does too."""
    from pdserve.scheduler.models import prompt_text_for_routing

    def body(cch: str) -> dict:
        return {"system": [{"type": "text", "text": f"x-anthropic-billing-header: cc_version=1; cch={cch}"},
                           {"type": "text", "text": "You are a coding agent."}],
                "messages": [{"role": "user", "content": [{"type": "text", "text": "fix the bug"}]}]}
    a, b = (prompt_text_for_routing("messages", body(x), 2048) for x in ("abc1", "def2"))
    assert a == b == "<system>You are a coding agent.<user>fix the bug"


def test_tracker_is_bounded_lru() -> None:
    t = PrefixTracker(chunk_chars=16, max_entries=10)
    for i in range(50):
        t.record("d0", t.points("completions", {"prompt": f"prompt {i}"}))
    assert len(t._seen["d0"]) == 10
    assert t.matched("d0", t.points("completions", {"prompt": "prompt 49"})) == 9


def test_upper_token_estimate_is_high() -> None:
    assert upper_tokens("abcd") == 2 and upper_tokens("你好") == 2 and upper_tokens("a你") == 2
    assert prompt_upper_tokens("completions", {"prompt": [1, 2, 3]}, 100) == 3
    assert prompt_upper_tokens("completions", {"prompt": "x" * 10_000}, 50) >= 50
    assert prompt_upper_tokens("chat", chat("hi"), 100) == upper_tokens("<system>hi") + 8


def test_assemble_stream_chat_and_completions() -> None:
    chunks = [b'data: {"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n',
              b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\ndata: {"choices":[{"index":1,'
              b'"delta":{"content":"B"},"finish_reason":"stop"}]}\n\n',
              b'data: {"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"length"}]}\n\n'
              b'data: {"choices":[],"usage":{"completion_tokens":3}}\n\ndata: [DONE]\n\n']
    out = assemble_stream(chunks)
    assert out["choices"] == [{"index": 0, "text": "Hello", "finish_reason": "length"},
                              {"index": 1, "text": "B", "finish_reason": "stop"}]
    assert out["usage"] == {"completion_tokens": 3} and out["model"] == "m"
    out = assemble_stream([b'data: {"choices":[{"index":0,"text":"a"}]}\n\ndata: {"error":{"code":502}}\n\n'])
    assert out["choices"][0]["text"] == "a" and out["error"] == {"code": 502}
    assert assemble_json(b"not json")["raw"] == "not json"


def test_assemble_stream_responses() -> None:
    chunks = [b'event: response.created\ndata: {"type":"response.created","response":{"model":"m"}}\n\n'
              b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"Hel"}\n\n',
              b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"lo"}\n\n'
              b'event: response.completed\ndata: {"type":"response.completed","response":{"model":"m",'
              b'"status":"completed","usage":{"output_tokens":2}}}\n\n']
    out = assemble_stream(chunks)
    assert out["choices"] == [{"index": 0, "text": "Hello", "finish_reason": "completed"}]
    assert out["usage"] == {"output_tokens": 2} and out["model"] == "m" and out["error"] is None
    out = assemble_stream([b'event: error\ndata: {"type":"error","code":"502","message":"x"}\n\n'])
    assert out["error"] == {"code": "502", "message": "x"}


def test_redactor() -> None:
    r = Redactor(["prompt"], [r"\d{3}"])
    assert r.apply({"prompt": "x", "a": [{"prompt": 1, "b": "id 123 ok"}]}) == \
        {"prompt": "[REDACTED]", "a": [{"prompt": "[REDACTED]", "b": "id [REDACTED] ok"}]}
