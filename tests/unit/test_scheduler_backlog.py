"""Load-aware decode-only: the prompt-work estimate and the busy-prefill decision."""

from __future__ import annotations

import pytest

from pdserve.scheduler.backlog import prefill_locally, work_tokens
from pdserve.scheduler.config import InstanceSpec
from pdserve.scheduler.metrics import SchedulerMetrics
from pdserve.scheduler.pool import Instance

pytestmark = pytest.mark.unit


def inst(role: str, i: int, backlog: int, metrics: SchedulerMetrics) -> Instance:
    x = Instance(InstanceSpec(role=role, index=i, global_index=i, host="127.0.0.1", port=9000 + i), metrics)
    x.add_backlog(backlog)
    return x


@pytest.mark.parametrize("endpoint,body,expected", [
    ("completions", {"prompt": list(range(37))}, 37),
    ("completions", {"prompt": [[1, 2], [3, 4, 5]]}, 5),
    ("completions", {"prompt": "x" * 400}, 100),
    ("completions", {"prompt": ["x" * 40, "y" * 40]}, 20),
    ("completions", {}, 0),
])
def test_work_tokens(endpoint: str, body: dict, expected: int) -> None:
    assert work_tokens(endpoint, body) == expected


def test_work_tokens_chat_counts_every_message() -> None:
    one = work_tokens("chat", {"messages": [{"role": "user", "content": "x" * 400}]})
    two = work_tokens("chat", {"messages": [{"role": "system", "content": "x" * 400},
                                            {"role": "user", "content": "x" * 400}]})
    assert one >= 100 and two >= 2 * 100 and two > one


@pytest.mark.parametrize("p_backlogs,d_backlogs,tokens,threshold,expected", [
    ([0], [0], 512, 512, False),          # prefill idle: disaggregate
    ([512], [0], 512, 512, True),         # prefill busy, decode free: compute locally
    ([512], [512], 512, 512, False),      # decode already computing a prompt
    ([2048], [512], 512, 512, True),      # much longer prefill queue than local work
    ([511], [0], 100, 512, False),        # below the threshold
    ([4096, 0], [0], 512, 512, False),    # one prefill instance is free
    ([4096, 1024], [0], 512, 512, True),  # every prefill instance is busy
    ([4096], [0, 9999], 512, 512, True),  # some decode instance is free
    ([4096], [0], 512, 0, False),         # feature off
])
def test_prefill_locally(p_backlogs: list[int], d_backlogs: list[int], tokens: int, threshold: int,
                         expected: bool) -> None:
    m = SchedulerMetrics()
    p = [inst("prefill", i, b, m) for i, b in enumerate(p_backlogs)]
    d = [inst("decode", len(p) + i, b, m) for i, b in enumerate(d_backlogs)]
    assert prefill_locally(p, d, tokens, threshold) is expected


def test_no_healthy_instance_never_decides() -> None:
    m = SchedulerMetrics()
    assert not prefill_locally([], [inst("decode", 1, 0, m)], 10, 1)
    assert not prefill_locally([inst("prefill", 0, 10**6, m)], [], 10, 1)
