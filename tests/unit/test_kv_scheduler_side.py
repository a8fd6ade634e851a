"""The decode-side checks of a hand-over, before any KV moves (engine-core half of the connector)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pdserve.kv.config import ConnectorSettings
from pdserve.kv.params import producer_params, prompt_digest
from pdserve.kv.scheduler_side import SchedulerSide

pytestmark = pytest.mark.unit

PROMPT = list(range(100, 140))  # 40 tokens


def consumer() -> SchedulerSide:
    return SchedulerSide(ConnectorSettings(), is_producer=False, engine_id="d0", host="127.0.0.1", port=0,
                         tp_size=1, block_size=16)


def request(prompt: list[int], digest_of: list[int], rid: str = "r1") -> SimpleNamespace:
    params = producer_params(engine_id="p0", host="127.0.0.1", port=1, req_id="remote-" + rid,
                             block_ids=[1, 2, 3], num_tokens=len(digest_of), expires_at=1e12, tp_size=1,
                             block_size=16, digest=prompt_digest(digest_of))
    return SimpleNamespace(request_id=rid, kv_transfer_params=params, num_prompt_tokens=len(prompt),
                           prompt_token_ids=prompt)


def test_same_prompt_loads_every_remote_token() -> None:
    side = consumer()
    assert side.get_num_new_matched_tokens(request(PROMPT, PROMPT), 0) == (40, True)
    assert side._load_errors == {}


def test_prompt_continued_past_the_remote_tokens_loads_them_and_computes_the_rest() -> None:
    """The scheduler sent the prefill's first token along: 41 tokens, KV for the first 40."""
    side = consumer()
    assert side.get_num_new_matched_tokens(request(PROMPT + [7], PROMPT), 0) == (40, True)
    assert side._load_errors == {}


def test_other_prompt_is_refused_with_a_reason() -> None:
    side = consumer()
    other = PROMPT[:-1] + [999]
    assert side.get_num_new_matched_tokens(request(other + [7], PROMPT), 0) == (40, True)
    assert "prompt tokens differ" in side._load_errors["r1"]


@pytest.mark.parametrize("bad", [
    {"remote_port": "abc"}, {"remote_num_tokens": "zz"}, {"remote_block_ids": 5},
    {"remote_block_ids": [1, -2]}, {"tp_size": "x"}, {"remote_port": 70000}, {"remote_host": ""},
    {"remote_request_id": 7}, {"block_size": None, "remote_port": True},
])
def test_bad_params_from_a_request_body_compute_locally_and_never_raise(bad: dict) -> None:
    """kv_transfer_params come from a request body: a bad value must not raise inside vLLM's
    engine loop (that kills the instance); the request computes its prompt itself."""
    side = consumer()
    req = request(PROMPT, PROMPT)
    req.kv_transfer_params.update(bad)
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)
    assert req.kv_transfer_params["do_remote_prefill"] is False
    req.kv_transfer_params["do_remote_prefill"] = True  # aborted before it was scheduled
    assert side.request_finished(req, []) == (False, None)
    assert side.build_connector_meta().releases == []


def test_missing_fields_compute_locally() -> None:
    side = consumer()
    req = request(PROMPT, PROMPT)
    del req.kv_transfer_params["remote_host"]
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)
