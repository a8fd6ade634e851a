#!/usr/bin/env python
"""Serving benchmark: a fixed-seed workload at given request rates against an OpenAI endpoint.

Sends streamed ``/v1/completions`` requests through vLLM's own benchmark request function
(``vllm.benchmarks.lib.endpoint_request_func``, what ``vllm bench serve`` uses), so TTFT, ITL
and E2E are timed exactly as the field's standard client times them, and reports TTFT, TPOT,
ITL, E2E (mean, median, p99), request and output-token throughput and goodput under SLOs. The
metric definitions are vLLM's ``calculate_metrics``:

  TTFT   send -> first streamed chunk with a choice
  ITL    gaps between consecutive streamed chunks (one sample per gap)
  TPOT   (E2E - TTFT) / (output tokens - 1), per request with more than one output token
  E2E    send -> last streamed chunk with a choice
  goodput  requests/s whose TTFT, TPOT (0 for 1-token outputs) and E2E all meet the SLOs

Workloads (all token-id prompts, so every prompt has exactly its length; fixed seeds):
  random        --input-len / --output-len (optionally +-range-ratio), unique prompts
  shared-prefix --num-groups groups, each prompt = the group's --prefix-len tokens + its own
                --suffix-len tokens (system-prompt style sharing)
  multi-turn    --conversations chats (num-prompts / conversations turns each); turn t's prompt is the whole chat so far
                (system + user/assistant turns, fixed synthetic assistant text), sent turn-major
                (every chat's turn 1, then every chat's turn 2, ...) so a chat's next turn
                arrives after its previous one

Repetition r uses seed+r (so the prefix cache never turns a repeat into a cache hit); warm-up
requests use their own seed. The per-rate result is the median over repeats of each metric.

    python benchmarks/serve.py --base-url http://127.0.0.1:9000 --input-len 512 --output-len 64 \\
        --num-prompts 40 --request-rate 0.5 1 2 --max-concurrency 8 --repeats 3 \\
        --goodput ttft:2000 tpot:70
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
SLO_KEYS = ("ttft", "tpot", "e2el")
METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_PERCENTILES = (50.0, 99.0)


# --------------------------------------------------------------------------------------------
# workload (pure)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Vocab:
    """Token ids a random prompt may use: [low, size) minus the tokenizer's special tokens."""

    size: int
    special: frozenset[int] = frozenset()
    low: int = 0

    def sample(self, rng: random.Random, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            t = rng.randrange(self.low, self.size)
            if t not in self.special:
                out.append(t)
        return out


def vocab_from_model(path: str | os.PathLike[str]) -> Vocab:
    """The vocabulary of an HF model folder (config.json, tokenizer.json's added tokens)."""
    p = Path(path)
    cfg = json.loads((p / "config.json").read_text())
    size = int(cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size"))
    special: set[int] = set()
    tok = p / "tokenizer.json"
    if tok.exists():
        special = {int(a["id"]) for a in json.loads(tok.read_text()).get("added_tokens", [])}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = cfg.get(key)
        for t in (v if isinstance(v, list) else [v]):
            if isinstance(t, int):
                special.add(t)
    # with no tokenizer.json, keep clear of the low ids where special tokens usually live
    return Vocab(size=size, special=frozenset(special), low=0 if tok.exists() else min(256, size - 1))


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    output_len: int
    tag: str = ""

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)


def _length(rng: random.Random, mean: int, range_ratio: float) -> int:
    if range_ratio <= 0:
        return mean
    lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
    return rng.randint(lo, hi)


def random_workload(n: int, input_len: int, output_len: int, vocab: Vocab, seed: int | str,
                    range_ratio: float = 0.0) -> list[Request]:
    """n unique random prompts; lengths uniform in mean*(1 +- range_ratio) (vLLM's random set)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        il, ol = _length(rng, input_len, range_ratio), _length(rng, output_len, range_ratio)
        out.append(Request(vocab.sample(rng, il), ol, f"random-{i}"))
    return out


def shared_prefix_workload(num_groups: int, prompts_per_group: int, prefix_len: int, suffix_len: int,
                           output_len: int, vocab: Vocab, seed: int | str) -> list[Request]:
    """Groups of prompts sharing a prefix; round-robin over groups so sharers are spread in time."""
    rng = random.Random(seed)
    prefixes = [vocab.sample(rng, prefix_len) for _ in range(num_groups)]
    out = []
    for j in range(prompts_per_group):
        for g in range(num_groups):
            out.append(Request(prefixes[g] + vocab.sample(rng, suffix_len), output_len, f"group{g}-{j}"))
    return out


def multi_turn_workload(conversations: int, turns: int, system_len: int, user_len: int, assistant_len: int,
                        output_len: int, vocab: Vocab, seed: int | str) -> list[Request]:
    """Chats whose turn t prompt is the chat so far; turn-major order (all turn 1s, then turn 2s)."""
    rng = random.Random(seed)
    history = [vocab.sample(rng, system_len) for _ in range(conversations)]
    out = []
    for t in range(turns):
        for c in range(conversations):
            if t > 0:
                history[c] = history[c] + vocab.sample(rng, assistant_len)  # the previous answer
            history[c] = history[c] + vocab.sample(rng, user_len)
            out.append(Request(list(history[c]), output_len, f"chat{c}-turn{t}"))
    return out


def arrival_offsets(n: int, rate: float, seed: int, burstiness: float = 1.0) -> list[float]:
    """Send offsets (s) of n requests: gamma inter-arrivals (Poisson at burstiness 1), rescaled so
    the last one is at n/rate, as vLLM's ``get_request`` does; rate inf sends all at once."""
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be positive")
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    acc, out = 0.0, []
    for _ in range(n):
        acc += rng.gammavariate(burstiness, theta)
        out.append(acc)
    scale = (n / rate) / out[-1]
    return [x * scale for x in out]


# --------------------------------------------------------------------------------------------
# metrics (pure)
# --------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One request's measurement (the fields of vLLM's RequestFuncOutput that metrics need)."""

    success: bool
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    start_time: float = 0.0
    error: str = ""


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default); 0.0 for no values (as vLLM reports)."""
    if not values:
        return 0.0
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def parse_goodput(items: Iterable[str]) -> dict[str, float]:
    """``["ttft:2000", "tpot:70"]`` (ms) -> ``{"ttft": 2000.0, "tpot": 70.0}``."""
    out: dict[str, float] = {}
    for item in items:
        for part in str(item).replace(",", " ").split():
            key, sep, val = part.partition(":")
            key = key.strip().lower()
            if not sep or key not in SLO_KEYS:
                raise ValueError(f"bad SLO {part!r}: write NAME:MS with NAME one of {', '.join(SLO_KEYS)}")
            try:
                ms = float(val)
            except ValueError:
                raise ValueError(f"bad SLO {part!r}: {val!r} is not a number of milliseconds") from None
            if not ms > 0:
                raise ValueError(f"bad SLO {part!r}: the limit must be positive")
            out[key] = ms
    return out


def is_good(o: Outcome, slo_ms: Mapping[str, float]) -> bool:
    """vLLM's goodput rule: TTFT, TPOT (0 for a 1-token output) and E2E all within their SLO."""
    if not o.success:
        return False
    tpot = (o.latency - o.ttft) / (o.output_tokens - 1) if o.output_tokens > 1 else 0.0
    got = {"ttft": o.ttft, "tpot": tpot, "e2el": o.latency}
    return all(got[k] * 1000.0 <= v for k, v in slo_ms.items())


def summarize(outcomes: Sequence[Outcome], duration_s: float, slo_ms: Mapping[str, float] | None = None,
              percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, Any]:
    """Metrics of one run, in ms and per second (keys like ``median_ttft_ms``, ``p99_tpot_ms``)."""
    ok = [o for o in outcomes if o.success]
    samples: dict[str, list[float]] = {m: [] for m in METRICS}
    for o in ok:
        samples["ttft"].append(o.ttft)
        samples["e2el"].append(o.latency)
        samples["itl"].extend(o.itl)
        if o.output_tokens > 1:
            samples["tpot"].append((o.latency - o.ttft) / (o.output_tokens - 1))
    dur = max(duration_s, 1e-9)
    total_out = sum(o.output_tokens for o in ok)
    total_in = sum(o.prompt_len for o in ok)
    good = sum(is_good(o, slo_ms) for o in ok) if slo_ms else len(ok)
    res: dict[str, Any] = {
        "completed": len(ok), "failed": len(outcomes) - len(ok), "duration_s": duration_s,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur, "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "request_goodput": good / dur, "good_requests": good, "slo_ms": dict(slo_ms or {}),
    }
    for m in METRICS:
        xs = [x * 1000.0 for x in samples[m]]
        res[f"mean_{m}_ms"] = statistics.fmean(xs) if xs else 0.0
        res[f"median_{m}_ms"] = percentile(xs, 50)
        for p in percentiles:
            res[f"p{p:g}_{m}_ms"] = percentile(xs, p)
    errors = [o.error for o in outcomes if not o.success]
    res["errors"] = errors[:5]
    return res


def median_of_repeats(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Each numeric metric's median over the repeats; other fields from the first run."""
    if not runs:
        return {}
    out: dict[str, Any] = {}
    for k, v in runs[0].items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            out[k] = v
            continue
        vals = [r[k] for r in runs if isinstance(r.get(k), (int, float))]
        out[k] = statistics.median(vals)
    out["repeats"] = len(runs)
    out["errors"] = [e for r in runs for e in r.get("errors", [])][:5]
    return out


def format_summary(s: Mapping[str, Any], label: str = "") -> str:
    """A short human-readable block (like vllm bench serve's)."""
    head = f"== {label} ==" if label else "=="
    lines = [head,
             f"completed/failed        {s['completed']}/{s['failed']}  ({s.get('repeats', 1)} repeat(s), median)",
             f"request throughput      {s['request_throughput']:.3f} req/s",
             f"output throughput       {s['output_throughput']:.1f} tok/s"]
    if s.get("slo_ms"):
        slo = " ".join(f"{k}:{v:g}" for k, v in s["slo_ms"].items())
        lines.append(f"goodput ({slo})  {s['request_goodput']:.3f} req/s")
    for m, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E")):
        lines.append(f"{name:<5} ms  mean {s[f'mean_{m}_ms']:9.1f}  median {s[f'median_{m}_ms']:9.1f}  "
                     f"p99 {s.get(f'p99_{m}_ms', 0.0):9.1f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# load generation (talks to a server)
# --------------------------------------------------------------------------------------------
async def run_load(base_url: str, model: str, requests: Sequence[Request], rate: float,
                   max_concurrency: int | None, seed: int, burstiness: float = 1.0,
                   timeout_s: float = 3600.0, ignore_eos: bool = True) -> tuple[list[Outcome], float]:
    """Send the requests at ``rate`` (Poisson, seeded), at most ``max_concurrency`` in flight.

    Returns the outcomes in request order and the wall time from the first send to the last answer.
    """
    import aiohttp
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncInput, async_request_openai_completions

    api_url = base_url.rstrip("/") + "/v1/completions"
    offsets = arrival_offsets(len(requests), rate, seed, burstiness)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    outcomes: list[Outcome | None] = [None] * len(requests)

    async with aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False) as session:
        async def one(i: int, req: Request) -> None:
            inp = RequestFuncInput(prompt=list(req.prompt), api_url=api_url, prompt_len=req.prompt_len,
                                   output_len=req.output_len, model=model, model_name=model,
                                   ignore_eos=ignore_eos, request_id=f"bench-{seed}-{i}")
            if sem is None:
                out = await async_request_openai_completions(inp, session)
            else:
                async with sem:
                    out = await async_request_openai_completions(inp, session)
            outcomes[i] = Outcome(success=bool(out.success), prompt_len=int(out.prompt_len or req.prompt_len),
                                  output_tokens=int(out.output_tokens or 0), ttft=float(out.ttft),
                                  latency=float(out.latency), itl=list(out.itl), start_time=float(out.start_time),
                                  error=str(out.error or "")[-500:])

        t0 = time.perf_counter()
        tasks = []
        for i, (req, off) in enumerate(zip(requests, offsets, strict=True)):
            delay = t0 + off - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, req)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return [o for o in outcomes if o is not None], duration


async def served_model(base_url: str, timeout_s: float = 10.0) -> str:
    import aiohttp

    async with aiohttp.ClientSession(trust_env=False) as s, \
            s.get(base_url.rstrip("/") + "/v1/models", timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
        data = await r.json()
    return str(data["data"][0]["id"])


@dataclass
class WorkloadSpec:
    """What to send; ``build(seed)`` gives the requests (pure)."""

    dataset: str = "random"
    num_prompts: int = 40
    input_len: int = 512
    output_len: int = 64
    range_ratio: float = 0.0
    num_groups: int = 4
    prefix_len: int = 384
    suffix_len: int = 128
    conversations: int = 8
    system_len: int = 128
    user_len: int = 96
    assistant_len: int = 64

    def build(self, vocab: Vocab, seed: int, n: int | None = None) -> list[Request]:
        """The requests of one repetition. The RNG seed also names the workload's shape, so two
        workloads with the same --seed never share prompt prefixes (no cross-workload cache hits)."""
        n = self.num_prompts if n is None else n
        key = f"{seed}/{self.key()}"  # random.Random takes str seeds (deterministic)
        if self.dataset == "random":
            return random_workload(n, self.input_len, self.output_len, vocab, key, self.range_ratio)
        if self.dataset == "shared-prefix":
            per = max(1, math.ceil(n / self.num_groups))
            return shared_prefix_workload(self.num_groups, per, self.prefix_len, self.suffix_len,
                                          self.output_len, vocab, key)[:n]
        if self.dataset == "multi-turn":
            turns = max(1, math.ceil(n / self.conversations))
            return multi_turn_workload(self.conversations, turns, self.system_len, self.user_len,
                                       self.assistant_len, self.output_len, vocab, key)[:n]
        raise ValueError(f"unknown dataset {self.dataset!r} (random, shared-prefix, multi-turn)")

    def key(self) -> str:
        if self.dataset == "random":
            return f"random/{self.input_len}/{self.output_len}/{self.range_ratio:g}"
        if self.dataset == "shared-prefix":
            return f"shared-prefix/{self.num_groups}/{self.prefix_len}/{self.suffix_len}/{self.output_len}"
        return (f"multi-turn/{self.conversations}/{self.system_len}/{self.user_len}/{self.assistant_len}/"
                f"{self.output_len}")

    def describe(self) -> str:
        if self.dataset == "random":
            rr = f" +-{self.range_ratio:g}" if self.range_ratio else ""
            return f"random {self.input_len}{rr} in / {self.output_len} out, {self.num_prompts} prompts"
        if self.dataset == "shared-prefix":
            return (f"shared-prefix {self.num_groups} groups x {self.prefix_len} prefix + {self.suffix_len} "
                    f"suffix / {self.output_len} out, {self.num_prompts} prompts")
        return (f"multi-turn {self.conversations} chats, system {self.system_len}, user {self.user_len}, "
                f"assistant {self.assistant_len} / {self.output_len} out, {self.num_prompts} prompts")


@dataclass
class LoadSpec:
    rates: list[float]
    max_concurrency: int | None = None
    repeats: int = 1
    warmup: int = 2
    seed: int = 0
    burstiness: float = 1.0
    slo_ms: dict[str, float] = field(default_factory=dict)
    timeout_s: float = 3600.0


WARMUP_SEED = 999_983


class SystemDied(RuntimeError):
    pass


async def measure(base_url: str, model: str, vocab: Vocab, work: WorkloadSpec, load: LoadSpec,
                  log: Any = print, alive: Any = None) -> list[dict[str, Any]]:
    """Warm-up, then every rate x repeat; one entry per rate with the median and every repeat.

    ``alive()`` (optional) is checked after each repetition: once the system under test has lost a
    process, the rest is not sent (its repetitions would only count connection errors)."""
    if load.warmup > 0:
        warm = work.build(vocab, WARMUP_SEED, n=load.warmup)
        outs, _ = await run_load(base_url, model, warm, math.inf, 2, WARMUP_SEED, timeout_s=load.timeout_s)
        bad = [o.error for o in outs if not o.success]
        if bad:  # counted again, if it recurs, as failures of the measured requests
            log(f"  warning: {len(bad)}/{len(outs)} warm-up request(s) failed against {base_url}: "
                f"{bad[0].strip().splitlines()[-1][:200] if bad[0].strip() else '?'}")
    per_rate = []
    for rate in load.rates:
        runs = []
        for r in range(load.repeats):
            seed = load.seed + r
            reqs = work.build(vocab, seed)
            outs, dur = await run_load(base_url, model, reqs, rate, load.max_concurrency, seed,
                                       load.burstiness, load.timeout_s)
            s = summarize(outs, dur, load.slo_ms)
            s.update(rate=rate, seed=seed, repeat=r)
            runs.append(s)
            log(f"  rate {rate:g} repeat {r + 1}/{load.repeats}: TTFT p50 {s['median_ttft_ms']:.0f} ms, "
                f"TPOT p50 {s['median_tpot_ms']:.1f} ms, {s['output_throughput']:.1f} tok/s, "
                f"goodput {s['request_goodput']:.3f} req/s, {s['failed']} failed")
            if alive is not None and not alive():
                med = median_of_repeats(runs)
                med["rate"] = rate
                per_rate.append({"rate": rate, "median": med, "runs": runs})
                raise SystemDied(per_rate)
        med = median_of_repeats(runs)
        med["rate"] = rate
        per_rate.append({"rate": rate, "median": med, "runs": runs})
    return per_rate


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        affinity = []
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = (0.0, 0.0, 0.0)
    return {"cpu_count": os.cpu_count(), "affinity": affinity, "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_at_start": [round(x, 2) for x in load],
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def plot_vs_rate(series: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike[str],
                 title: str = "") -> Path:
    """Latency percentiles (median solid, p99 dashed) vs request rate, one colour per label.

    ``series``: label -> list of per-rate medians (``summarize``/``median_of_repeats`` dicts with
    ``rate``). Also plots output throughput. One rate still draws points (a bar-chart substitute).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(22, 4.2))
    panels = [("ttft", "TTFT (ms)"), ("tpot", "TPOT (ms)"), ("itl", "ITL (ms)"), ("e2el", "E2E latency (ms)")]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rates = sorted({p["rate"] for points in series.values() for p in points})
    numeric = all(math.isfinite(r) for r in rates)  # 'inf' (all at once) gets a categorical axis
    for ci, (label, points) in enumerate(series.items()):
        pts = sorted(points, key=lambda s: s["rate"])
        xs = [p["rate"] if numeric else rates.index(p["rate"]) for p in pts]
        c = colours[ci % len(colours)]
        for ax, (m, name) in zip(axes, panels):
            ax.plot(xs, [p[f"median_{m}_ms"] for p in pts], "o-", color=c, label=f"{label} p50")
            ax.plot(xs, [p.get(f"p99_{m}_ms", float("nan")) for p in pts], "s--", color=c, alpha=0.7,
                    label=f"{label} p99")
            ax.set_title(name)
        axes[4].plot(xs, [p["output_throughput"] for p in pts], "o-", color=c, label=label)
        axes[4].set_title("output throughput (tok/s)")
    for ax in axes:
        ax.set_xlabel("request rate (req/s)")
        ax.grid(True, alpha=0.3)
        if not numeric:
            ax.set_xticks(range(len(rates)))
            ax.set_xticklabels([f"{r:g}" for r in rates])
    axes[0].set_yscale("log")
    axes[3].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[4].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _rate(text: str) -> float:
    return math.inf if text.lower() in ("inf", "infinity") else float(text)


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", choices=("random", "shared-prefix", "multi-turn"), default="random")
    g.add_argument("--num-prompts", type=int, default=40)
    g.add_argument("--input-len", type=int, default=512, help="random: prompt tokens (default 512)")
    g.add_argument("--output-len", type=int, default=64, help="output tokens (ignore_eos; default 64)")
    g.add_argument("--range-ratio", type=float, default=0.0, help="random: lengths vary by +- this fraction")
    g.add_argument("--num-groups", type=int, default=4, help="shared-prefix: groups (default 4)")
    g.add_argument("--prefix-len", type=int, default=384, help="shared-prefix: shared tokens (default 384)")
    g.add_argument("--suffix-len", type=int, default=128, help="shared-prefix: own tokens (default 128)")
    g.add_argument("--conversations", type=int, default=8, help="multi-turn: chats (default 8)")
    g.add_argument("--system-len", type=int, default=128, help="multi-turn: system prompt tokens")
    g.add_argument("--user-len", type=int, default=96, help="multi-turn: tokens per user turn")
    g.add_argument("--assistant-len", type=int, default=64, help="multi-turn: tokens per earlier answer")


def workload_from_args(a: argparse.Namespace) -> WorkloadSpec:
    return WorkloadSpec(dataset=a.dataset, num_prompts=a.num_prompts, input_len=a.input_len,
                        output_len=a.output_len, range_ratio=a.range_ratio, num_groups=a.num_groups,
                        prefix_len=a.prefix_len, suffix_len=a.suffix_len, conversations=a.conversations,
                        system_len=a.system_len, user_len=a.user_len, assistant_len=a.assistant_len)


def add_load_args(p: argparse.ArgumentParser, rates: Sequence[float] = (1.0,)) -> None:
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=_rate, nargs="+", default=list(rates), metavar="RPS",
                   help=f"one or more request rates, req/s ('inf' = all at once; default {' '.join(map(str, rates))})")
    g.add_argument("--max-concurrency", type=int, default=8,
                   help="requests in flight at most (0 = no bound; default 8)")
    g.add_argument("--burstiness", type=float, default=1.0, help="1 = Poisson arrivals (default)")
    g.add_argument("--repeats", type=int, default=3, help="repetitions per rate, median reported (default 3)")
    g.add_argument("--warmup", type=int, default=2, help="warm-up requests before measuring (default 2)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--goodput", nargs="+", default=["ttft:2000", "tpot:70"], metavar="NAME:MS",
                   help="SLOs in ms for goodput, e.g. ttft:2000 tpot:70 (e2el also accepted)")
    g.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request (default 3600)")


def load_from_args(a: argparse.Namespace) -> LoadSpec:
    if a.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    return LoadSpec(rates=list(a.request_rate), max_concurrency=a.max_concurrency or None, repeats=a.repeats,
                    warmup=a.warmup, seed=a.seed, burstiness=a.burstiness, slo_ms=parse_goodput(a.goodput),
                    timeout_s=a.request_timeout)


def default_model_path() -> str:
    from pdserve.model.demo import build_demo_model

    return str(build_demo_model(progress=False))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:9000", help="OpenAI endpoint (127.0.0.1 only)")
    p.add_argument("--model", help="model name to request (default: the endpoint's first /v1/models entry)")
    p.add_argument("--model-path", help="HF folder whose vocabulary the prompts use (default: the demo model)")
    p.add_argument("--label", default="", help="name of the system under test (in the JSON and plot)")
    p.add_argument("--result-dir", type=Path, default=RESULTS_DIR,
                   help="where JSON + PNG go (default benchmarks/results)")
    p.add_argument("--tag", default="", help="file name stem (default serve-<label>-<time>)")
    add_workload_args(p)
    add_load_args(p)
    a = p.parse_args(argv)
    from urllib.parse import urlparse

    if urlparse(a.base_url).hostname not in ("127.0.0.1", "localhost", "::1"):
        p.error("--base-url must be a loopback address (127.0.0.1)")
    try:
        load = load_from_args(a)
    except ValueError as exc:
        p.error(str(exc))
    work = workload_from_args(a)
    vocab = vocab_from_model(a.model_path or default_model_path())
    model = a.model or asyncio.run(served_model(a.base_url))
    info = machine_info()
    print(f"machine: {info['cpu_count']} cores, affinity {info['affinity']}, load {info['loadavg_at_start']}")
    print(f"workload: {work.describe()}; rates {load.rates}, concurrency {load.max_concurrency}, "
          f"{load.repeats} repeat(s), SLO {load.slo_ms}")
    per_rate = asyncio.run(measure(a.base_url, model, vocab, work, load))
    label = a.label or urlparse(a.base_url).netloc
    for entry in per_rate:
        print(format_summary(entry["median"], f"{label} @ {entry['rate']:g} req/s"))
    stem = a.tag or f"serve-{(a.label or 'endpoint')}-{time.strftime('%Y%m%d-%H%M%S')}"
    a.result_dir.mkdir(parents=True, exist_ok=True)
    doc = {"label": label, "base_url": a.base_url, "model": model, "machine": info,
           "workload": asdict(work), "load": asdict(load), "results": per_rate}
    jpath = a.result_dir / f"{stem}.json"
    jpath.write_text(json.dumps(doc, indent=1, default=str))
    ppath = plot_vs_rate({label: [e["median"] for e in per_rate]}, a.result_dir / f"{stem}.png",
                         f"{label}: {work.describe()}, concurrency {load.max_concurrency}")
    print(f"wrote {jpath} and {ppath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
