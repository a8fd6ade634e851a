"""The answer's usage carries the prefill side's prompt-cache facts (the decode side counts the
pulled KV as cached, which says nothing about the prefix cache)."""

from __future__ import annotations

import pytest

from pdserve.scheduler.pd_flow import PDFlow, PrefillResult, RequestContext
from pdserve.scheduler.policies import RouteKey

pytestmark = pytest.mark.unit


def _fix(usage: dict, pre: PrefillResult, endpoint: str = "chat") -> bool:
    ctx = RequestContext(request_id="r", endpoint=endpoint, path="/v1/chat/completions", body={}, raw=b"",
                         stream=False, key=RouteKey(None, 1))
    return PDFlow._fix_usage(object.__new__(PDFlow), ctx, pre, usage)


def test_cached_and_created_cache_tokens_come_from_the_prefill() -> None:
    pre = PrefillResult("prefill0", {"remote_block_ids": [1]}, 128, 300, created_cache_tokens=172)
    usage = {"prompt_tokens": 300, "completion_tokens": 5,
             "prompt_tokens_details": {"cached_tokens": 300, "created_cache_tokens": 0}}
    assert _fix(usage, pre)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 128, "created_cache_tokens": 172}


def test_a_field_the_answer_lacks_is_not_added() -> None:
    """vLLM's completions report no created_cache_tokens."""
    pre = PrefillResult("prefill0", {"remote_block_ids": [1]}, 0, 300, created_cache_tokens=300)
    usage = {"prompt_tokens": 300, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 0}}
    assert not _fix(usage, pre, "completions")  # already right: nothing to rewrite
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}


def test_a_resumed_answer_reports_the_prefills_cache_hits() -> None:
    """The resumed decode instance computed prompt + the moved tokens itself; its own cache count
    covers them too (it could exceed the client's prompt)."""
    from pdserve.scheduler.first_token import FirstToken

    first = FirstToken("chat", 9, "Hi", [4] * 300, "c", 1, "m", generated=(7,) * 63)
    pre = PrefillResult("prefill0", None, 128, 300, first)
    usage = {"prompt_tokens": 364, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 352}}
    assert _fix(usage, pre)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (300, 65)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 128}


@pytest.mark.parametrize(("endpoint", "body", "reason"), [
    ("completions", {"prompt": ["a", "b"]}, "batch"),
    ("completions", {"prompt": [[1], [2]]}, "batch"),
    ("completions", {"prompt": [1, 2.0, 3]}, None),  # one prompt's token ids
    ("completions", {"prompt": "x", "prompt_logprobs": 0}, "prompt_logprobs"),
    ("completions", {"prompt": "x", "echo": True, "logprobs": 1}, "prompt_logprobs"),
    ("completions", {"prompt": "x", "echo": True}, None),  # no logprobs: vLLM asks for none
    ("chat", {"messages": [], "echo": True}, "prompt_logprobs"),  # chat: top_logprobs defaults to 0
    ("chat", {"messages": [], "prompt": ["a", "b"]}, None),
])
def test_requests_whose_prefill_would_be_wasted_skip_it(endpoint: str, body: dict, reason: str | None) -> None:
    from pdserve.scheduler.models import decode_only_reason

    assert decode_only_reason(endpoint, body) == reason


def test_a_continued_chat_stream_reports_created_cache_tokens_as_vllms_chat_does() -> None:
    """Its usage comes from the decode instance's completion stream, which has no such field."""
    pre = PrefillResult("prefill0", {"remote_block_ids": [1]}, 16, 300, created_cache_tokens=284)
    usage = {"prompt_tokens": 300, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 300}}
    assert _fix(usage, pre)  # _fix's request is a chat request
    assert usage["prompt_tokens_details"] == {"cached_tokens": 16, "created_cache_tokens": 284}
