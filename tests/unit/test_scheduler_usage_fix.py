"""The answer's usage carries the prefill side's prompt-cache facts (the decode side counts the
pulled KV as cached, which says nothing about the prefix cache)."""

from __future__ import annotations

import pytest

from pdserve.scheduler.pd_flow import PDFlow, PrefillResult, RequestContext
from pdserve.scheduler.policies import RouteKey

pytestmark = pytest.mark.unit


def _fix(usage: dict, pre: PrefillResult) -> bool:
    ctx = RequestContext(request_id="r", endpoint="chat", path="/v1/chat/completions", body={}, raw=b"",
                         stream=False, key=RouteKey(None, 1))
    return PDFlow._fix_usage(object.__new__(PDFlow), ctx, pre, usage)


def test_cached_and_created_cache_tokens_come_from_the_prefill() -> None:
    pre = PrefillResult("prefill0", {"remote_block_ids": [1]}, 128, 300, created_cache_tokens=172)
    usage = {"prompt_tokens": 300, "completion_tokens": 5,
             "prompt_tokens_details": {"cached_tokens": 300, "created_cache_tokens": 0}}
    assert _fix(usage, pre)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 128, "created_cache_tokens": 172}


def test_a_field_the_answer_lacks_is_not_added() -> None:
    pre = PrefillResult("prefill0", {"remote_block_ids": [1]}, 0, 300, created_cache_tokens=300)
    usage = {"prompt_tokens": 300, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 0}}
    assert not _fix(usage, pre)  # already right: nothing to rewrite
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
