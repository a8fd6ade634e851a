"""Cache-aware decode routing: what each decode instance probably has in its prefix cache.

vLLM keeps the KV of finished requests in its prefix cache. A decode instance that served a
conversation's earlier turns therefore holds that history: sending the next turn there means
(a) in PD mode the KV connector pulls only the blocks it does not have, and (b) when the part it
lacks is small, the prompt can be computed on the decode instance alone, with no prefill
instance and no KV hand-over at all ("decode-only").

The scheduler cannot see the instances' caches, so :class:`PrefixTracker` remembers, per decode
instance, hashes of the prompt prefixes it sent there: a chained hash at every ``chunk_chars``
characters and at every chat message boundary (so turn N+1's history, which is turn N's prompt,
matches exactly). The longest remembered prefix approximates what that instance has cached. The
tracker forgets an instance when it leaves the pool (a restarted engine has a cold cache) and
evicts least-recently-used prefixes beyond a bound (vLLM evicts too). An approximation that errs
towards "not cached" only costs a prefill that was not strictly needed.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdserve.scheduler.policies import Policy, RouteKey
    from pdserve.scheduler.pool import Instance

CHAT_OVERHEAD_TOKENS = 8  # per message: role markers of the chat template


def as_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A ``/v1/responses`` request as chat messages, for routing and estimates: ``instructions``
    is the system message, a string ``input`` one user message, input items keep their role."""
    msgs: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        msgs.append({"role": "system", "content": body["instructions"]})
    inp = body.get("input")
    if isinstance(inp, str):
        msgs.append({"role": "user", "content": inp})
    elif isinstance(inp, list):
        for item in inp:
            if not isinstance(item, dict):
                continue
            # a message has content; tool calls, their outputs and reasoning items have their text elsewhere
            text = next((item[k] for k in ("content", "output", "arguments", "text", "summary")
                         if item.get(k) is not None), None)
            msgs.append({"role": item.get("role", item.get("type")),
                         "content": text if text is not None else repr(item)})
    return {"messages": msgs}


_BILLING_HEADER = "x-anthropic-billing-header"  # per request (Claude Code): vLLM drops it from the prompt


def _block_text(content: Any) -> Any:
    """The text of an Anthropic message's content blocks (text, thinking, tool input and results),
    without the billing-header block vLLM strips."""
    if isinstance(content, str) and content.startswith(_BILLING_HEADER):
        return ""
    if not isinstance(content, list):
        return content
    parts = []
    for block in content:
        if not isinstance(block, dict) or str(block.get("text", "")).startswith(_BILLING_HEADER):
            continue
        value = next((block[k] for k in ("text", "thinking", "input", "content") if block.get(k) is not None), "")
        parts.append(value if isinstance(value, str) else repr(_block_text(value)))
    return "".join(parts)


def messages_as_chat(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic ``/v1/messages`` request as chat messages: ``system`` first, block text joined."""
    msgs: list[dict[str, Any]] = []
    if body.get("system") is not None:
        msgs.append({"role": "system", "content": _block_text(body["system"])})
    msgs += [{"role": m.get("role"), "content": _block_text(m.get("content"))}
             for m in body.get("messages") or () if isinstance(m, dict)]
    return {"messages": msgs}


def chat_view(endpoint: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(endpoint, body) with a responses or messages request seen as the chat request it renders like."""
    if endpoint == "responses":
        return "chat", as_chat(body)
    if endpoint == "messages":
        return "chat", messages_as_chat(body)
    return endpoint, body


def prompt_pieces(endpoint: str, body: dict[str, Any]) -> list[str]:
    """The prompt as text pieces (one per chat message), a stand-in for the rendered template."""
    endpoint, body = chat_view(endpoint, body)
    if endpoint == "chat":
        out = []
        for m in body.get("messages") or ():
            if not isinstance(m, dict):
                continue
            c = m.get("content")
            out.append(f"<{m.get('role')}>" + (c if isinstance(c, str) else repr(c)))
        return out
    p = body.get("prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        first = p[0]
        if isinstance(first, str):
            return [first]
        if isinstance(first, int):
            return [",".join(map(str, p)) + ","]
        if isinstance(first, list):
            return [",".join(map(str, first)) + ","]
    return []


def upper_tokens(text: str) -> int:
    """A deliberately high token estimate: 2 characters per token for ASCII (real tokenizers
    average ~4), one token per non-ASCII character (CJK averages ~1.3 characters per token). Used
    to decide "short enough for decode-only", where overestimating is the safe side."""
    n = len(text)
    if text.isascii():
        return (n + 1) // 2
    non = sum(1 for ch in text if ch > "\x7f")
    return (n - non + 1) // 2 + non


def _capped(text: str, limit: int) -> int:
    # every 2 characters are at least one estimated token: a long text need not be scanned
    return max(limit, 0) if len(text) >= 2 * limit else upper_tokens(text)


def batch_prompts(endpoint: str, body: dict[str, Any]) -> tuple[str, list[Any]] | None:
    """A completions ``prompt`` given as a list, as (kind, prompts): ("ids", [token-id list, ...])
    or ("text", [str, ...]); None for one text prompt or chat (see :func:`prompt_pieces`)."""
    p = body.get("prompt")
    if endpoint in ("chat", "responses", "messages") or not isinstance(p, list) or not p:
        return None
    if isinstance(p[0], int):
        return "ids", [p]
    if isinstance(p[0], list):
        return "ids", [x for x in p if isinstance(x, list)]
    if isinstance(p[0], str):
        return "text", [x for x in p if isinstance(x, str)]
    return None


def prompt_upper_tokens(endpoint: str, body: dict[str, Any], limit: int) -> int:
    """Upper token estimate of the prompt (exact for token ids); values >= ``limit`` are not exact."""
    batch = batch_prompts(endpoint, body)
    if batch is not None:  # the longest prompt of the batch
        kind, prompts = batch
        return max(len(x) if kind == "ids" else _capped(x, limit) for x in prompts)
    total = 0
    for piece in prompt_pieces(endpoint, body):
        overhead = CHAT_OVERHEAD_TOKENS if endpoint in ("chat", "responses", "messages") else 0
        total += _capped(piece, limit - total) + overhead
        if total >= limit:
            break
    return total


@dataclass(slots=True)
class PrefixPoints:
    pieces: list[str]
    points: list[tuple[int, bytes]]  # (character offset, hash of everything before it)
    total_chars: int

    def suffix(self, offset: int) -> str:
        return "".join(self.pieces)[offset:]


class PrefixTracker:
    def __init__(self, chunk_chars: int = 256, max_chars: int = 128 * 1024, max_entries: int = 100_000) -> None:
        self.chunk = chunk_chars
        self.max_chars = max_chars
        self.max_entries = max_entries
        self._seen: dict[str, OrderedDict[bytes, None]] = {}

    def points(self, endpoint: str, body: dict[str, Any], adapter: str | None = None) -> PrefixPoints:
        """``adapter``: a LoRA adapter's KV differs from the base model's for the same prompt, so
        its prefixes hash apart."""
        pieces = prompt_pieces(endpoint, body)
        k = self.chunk
        h = hashlib.blake2b(digest_size=8)
        if adapter:
            h.update(b"\x01lora:" + adapter.encode("utf-8", "surrogatepass") + b"\x00")
        pts: list[tuple[int, bytes]] = []
        pos = 0
        for piece in pieces:
            start, n = 0, len(piece)
            while start < n and pos < self.max_chars:
                take = min(n - start, (pos // k + 1) * k - pos)
                h.update(piece[start:start + take].encode("utf-8", "surrogatepass"))
                start += take
                pos += take
                if pos % k == 0:
                    pts.append((pos, h.copy().digest()))
            if pos >= self.max_chars:
                break
            h.update(b"\x00")  # a message boundary is part of the prefix's identity
            if not pts or pts[-1][0] != pos:
                pts.append((pos, h.copy().digest()))
        return PrefixPoints(pieces, pts, sum(len(p) for p in pieces))

    def matched(self, name: str, pp: PrefixPoints) -> int:
        """Characters of the prompt's prefix that instance ``name`` was sent before."""
        seen = self._seen.get(name)
        if not seen:
            return 0
        best = 0
        for off, d in pp.points:
            if d not in seen:
                break
            best = off
        return best

    def record(self, name: str, pp: PrefixPoints) -> None:
        seen = self._seen.setdefault(name, OrderedDict())
        for _, d in pp.points:
            if d in seen:
                seen.move_to_end(d)
            else:
                seen[d] = None
        while len(seen) > self.max_entries:
            seen.popitem(last=False)

    def forget(self, name: str) -> None:
        self._seen.pop(name, None)


class AffinityFirst:
    """Decode policy wrapper: the instance with the longest cached prefix of this prompt wins,
    unless it would carry more than ``load_factor`` × its fair share of the requests in flight;
    then (and when nothing matches) the configured policy decides — least-load by default."""

    def __init__(self, base: Policy, load_factor: float = 1.5) -> None:
        self.base = base
        self.name = base.name
        self.load_factor = load_factor

    def within_bound(self, inst: Instance, healthy: Sequence[Instance]) -> bool:
        total = sum(i.inflight for i in healthy)
        return inst.inflight + 1 <= math.ceil(self.load_factor * (total + 1) / max(1, len(healthy)))

    def preferred(self, avail: Sequence[Instance], healthy: Sequence[Instance], key: RouteKey) -> Instance | None:
        if not key.affinity:
            return None
        best: Instance | None = None
        best_len = 0
        for inst in avail:
            n = key.affinity.get(inst.spec.name, 0)
            if n > best_len:
                best, best_len = inst, n
        if best is not None and self.within_bound(best, healthy):
            return best
        return None

    def choose(self, avail: Sequence[Instance], healthy: Sequence[Instance], key: RouteKey) -> Instance:
        return self.preferred(avail, healthy, key) or self.base.choose(avail, healthy, key)
