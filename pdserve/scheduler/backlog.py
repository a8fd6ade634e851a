"""Prefill backlog per instance, and the load-aware choice to prefill on the decode instance.

Disaggregation pays off while the prefill instances keep up. When they fall behind, a request
that waits behind a long prefill queue starts sooner if its decode instance computes the prompt
itself (vLLM mixes that prefill into its decode steps, as a colocated server would). This is
Dynamo's "conditional disaggregation" driven by queue depth: with ``--decode-only-when-queued
TOKENS`` a request is served by a decode instance alone ("busy") when even the least-loaded
prefill instance has at least TOKENS prompt tokens queued or running, and the decode side's own
pending prompt work plus this prompt is no more than that. The threshold is the operator's
trade: lower starts first tokens sooner, higher protects decode TPOT.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pdserve.scheduler.affinity import CHAT_OVERHEAD_TOKENS, batch_prompts, prompt_pieces

if TYPE_CHECKING:
    from pdserve.scheduler.pool import Instance

TYPICAL_CHARS_PER_TOKEN = 4.0  # English BPE average; only compares backlogs, never rejects


def work_tokens(endpoint: str, body: dict[str, Any]) -> int:
    """A typical (not bounding) estimate of the prompt tokens to compute: exact for token ids."""
    batch = batch_prompts(endpoint, body)
    if batch is not None:  # every prompt of the batch is computed
        kind, prompts = batch
        total = sum(len(x) for x in prompts)
        return total if kind == "ids" else int(total / TYPICAL_CHARS_PER_TOKEN)
    chars = 0
    pieces = 0
    for piece in prompt_pieces(endpoint, body):
        chars += len(piece)
        pieces += 1
    overhead = CHAT_OVERHEAD_TOKENS * pieces if endpoint in ("chat", "responses", "messages") else 0
    return int(chars / TYPICAL_CHARS_PER_TOKEN) + overhead


def prefill_locally(prefill: Sequence["Instance"], decode: Sequence["Instance"], tokens: int,
                    threshold: int) -> bool:
    """True when this prompt should be computed on a decode instance because prefill is busy."""
    if threshold <= 0 or not prefill or not decode:
        return False
    queued = min(i.prefill_backlog for i in prefill)
    local = min(i.prefill_backlog for i in decode)
    return queued >= threshold and local + tokens <= queued
