#!/usr/bin/env python
"""How far routing alone can move TTFT: a queue simulation of the main workload.

One prefill instance serves prompts first come, first served, each in ``--prefill-s`` seconds
(one core, one 512-token prompt per step). A prompt routed decode-only instead takes
``--decode-only-s`` seconds on the decode instance, which takes one such prompt at a time.
Arrivals are Poisson, rescaled like vLLM's benchmark so N prompts span N/rate seconds. Each
policy decides per arrival from the prefill backlog in tokens: ``raw`` counts queued and running
prompts whole (what ``--decode-only-when-queued`` does), ``progress`` counts only what is left of
the running one. Prints the median over seeds of each run's TTFT median and the share of
prompts sent decode-only. No server runs; the numbers come from the measured service times.

    python benchmarks/queue_sim.py                      # the README's table
    python benchmarks/queue_sim.py --prefill-s 0.78 --rate 0.8
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass

Policy = Callable[[float, float], bool]  # (raw backlog tokens, progress-aware backlog) -> decode-only


@dataclass(frozen=True)
class Shape:
    prompts: int = 40
    rate: float = 1.0
    prompt_tokens: int = 512
    prefill_s: float = 0.82
    decode_only_s: float = 0.95


def arrivals(shape: Shape, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(shape.prompts):
        t += rng.expovariate(shape.rate)
        out.append(t)
    span = shape.prompts / shape.rate
    return [a * span / out[-1] for a in out]


def simulate(policy: Policy, shape: Shape, seed: int) -> tuple[float, float]:
    """(TTFT median in seconds, share of prompts sent decode-only) of one run."""
    prefill_free = decode_free = 0.0
    pending: list[float] = []  # finish times of prompts on the prefill instance, in order
    ttfts: list[float] = []
    offloaded = 0
    for at in arrivals(shape, seed):
        pending = [f for f in pending if f > at]
        raw = shape.prompt_tokens * len(pending)
        left = shape.prompt_tokens * (len(pending) - 1 + (pending[0] - at) / shape.prefill_s) if pending else 0.0
        if decode_free <= at and policy(raw, left):
            offloaded += 1
            decode_free = at + shape.decode_only_s
            ttfts.append(shape.decode_only_s)
        else:
            prefill_free = max(at, prefill_free) + shape.prefill_s
            pending.append(prefill_free)
            ttfts.append(prefill_free - at)
    return statistics.median(ttfts), offloaded / shape.prompts


def policies(tokens: int) -> dict[str, Policy]:
    return {
        "never decode-only": lambda raw, left: False,
        f"raw >= {2 * tokens} (pdserve up's default)": lambda raw, left: raw >= 2 * tokens,
        f"raw >= {tokens} (any wait)": lambda raw, left: raw >= tokens,
        **{f"progress >= {t}": (lambda raw, left, t=t: left >= t) for t in (tokens // 2, tokens, 3 * tokens // 2)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=40)
    p.add_argument("--rate", type=float, default=1.0, help="req/s (default 1)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--prefill-s", type=float, default=0.82, help="prefill seconds per prompt (measured 0.78-0.85)")
    p.add_argument("--decode-only-s", type=float, default=0.95, help="decode-only seconds per prompt")
    p.add_argument("--seeds", type=int, default=200)
    a = p.parse_args()
    shape = Shape(a.prompts, a.rate, a.prompt_tokens, a.prefill_s, a.decode_only_s)
    print(f"{a.prompts} prompts at {a.rate:g} req/s, prefill {a.prefill_s} s, decode-only {a.decode_only_s} s, "
          f"{a.seeds} seeds")
    print(f"{'policy':40} {'TTFT p50 s':>10} {'decode-only':>11}")
    for name, policy in policies(a.prompt_tokens).items():
        runs = [simulate(policy, shape, s) for s in range(a.seeds)]
        print(f"{name:40} {statistics.median(r[0] for r in runs):10.3f} "
              f"{statistics.mean(r[1] for r in runs):10.0%}")


if __name__ == "__main__":
    main()
