#!/usr/bin/env python
"""Soak: a bounded mixed load against a real local cluster, then a ledger of what happened.

Sends streams, non-streams, client aborts and bad inputs for ``--duration`` seconds at
``--concurrency``, then checks, and prints as a ledger:

- every request is accounted for: a success, or the deliberate error it asked for (4xx for bad
  input); anything else (5xx, a hang past ``--request-timeout``, a wrong status) is counted as
  unexpected;
- no instance restarted (each instance's process id is the same at the end);
- KV usage is back to idle on every instance (nothing stranded on the prefill or decode side);
- the private (anonymous) resident memory of each process did not grow by more than
  ``--max-rss-growth-mb``.

``--start`` brings the cluster up itself with ``pdserve up --demo`` (and stops it after);
otherwise ``--url`` points at a running scheduler. Only 127.0.0.1 is ever targeted.
Exit code 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import psutil

LOOPBACK = ("127.0.0.1", "localhost")


@dataclass
class Ledger:
    sent: Counter = field(default_factory=Counter)
    outcome: Counter = field(default_factory=Counter)  # (kind, "ok"|"expected-error"|"unexpected:<why>")
    latencies: list[float] = field(default_factory=list)

    def record(self, kind: str, result: str, seconds: float) -> None:
        self.outcome[(kind, result)] += 1
        if result == "ok":
            self.latencies.append(seconds)

    @property
    def unexpected(self) -> int:
        return sum(n for (_, r), n in self.outcome.items() if r.startswith("unexpected"))


BAD_BODIES: list[tuple[bytes, int]] = [
    (b"{not json", 400),
    (json.dumps({"model": "no-such-model", "prompt": "hi", "max_tokens": 4}).encode(), 404),
    (json.dumps({"model": "MODEL", "prompt": "hi", "temperature": -1}).encode(), 400),
    (json.dumps({"model": "MODEL", "prompt": "hi", "max_tokens": "lots"}).encode(), 400),
    (json.dumps({"model": "MODEL", "prompt": "hi", "top_p": 7}).encode(), 400),
    (json.dumps({"model": "MODEL", "messages": "not a list"}).encode(), 400),
]

TOPICS = ["the sea", "a lighthouse", "mountains", "a robot", "bread", "the moon", "a library"]


def _prompt(rng: random.Random) -> str:
    topic = rng.choice(TOPICS)
    return f"Write a few sentences about {topic}. " + "Add detail. " * rng.randint(0, 120)


async def one_request(session: aiohttp.ClientSession, url: str, model: str, rng: random.Random,
                      ledger: Ledger, timeout: float) -> None:
    kind = rng.choices(["stream", "nonstream", "abort", "bad"], weights=[4, 3, 1.5, 1.5])[0]
    ledger.sent[kind] += 1
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            result = await _send(session, url, model, rng, kind)
    except TimeoutError:
        result = "unexpected:timeout"
    except aiohttp.ClientError as exc:
        result = f"unexpected:{type(exc).__name__}"
    ledger.record(kind, result, time.monotonic() - t0)


async def _send(session: aiohttp.ClientSession, url: str, model: str, rng: random.Random, kind: str) -> str:
    if kind == "bad":
        body, want = rng.choice(BAD_BODIES)
        body = body.replace(b"MODEL", model.encode())
        async with session.post(f"{url}/v1/completions", data=body,
                                headers={"Content-Type": "application/json"}) as r:
            await r.read()
            return "expected-error" if r.status == want else f"unexpected:status {r.status} (want {want})"
    max_tokens = rng.randint(8, 64)
    if kind == "nonstream":
        body = {"model": model, "prompt": _prompt(rng), "max_tokens": max_tokens, "temperature": 0}
        async with session.post(f"{url}/v1/completions", json=body) as r:
            data = await r.json(content_type=None)
            if r.status != 200:
                return f"unexpected:status {r.status}"
            text = data["choices"][0].get("text")
            return "ok" if isinstance(text, str) and data["usage"]["completion_tokens"] > 0 \
                else "unexpected:empty answer"
    body = {"model": model, "messages": [{"role": "user", "content": _prompt(rng)}],
            "max_tokens": max_tokens if kind == "stream" else 512, "stream": True}
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        if r.status != 200:
            return f"unexpected:status {r.status}"
        chunks, done = 0, False
        async for line in r.content:
            if line.startswith(b"data: [DONE]"):
                done = True
                break
            if line.startswith(b"data: {"):
                if b'"error"' in line[:40]:
                    return "unexpected:error event"
                chunks += 1
                if kind == "abort" and chunks >= 3:
                    return "ok"  # the client walks away; the cluster must clean up
        return "ok" if done and chunks else "unexpected:stream ended early"


async def drive(url: str, model: str, duration: float, concurrency: int, seed: int,
                timeout: float) -> Ledger:
    ledger = Ledger()
    rng = random.Random(seed)
    deadline = time.monotonic() + duration
    conn = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=conn) as session:
        async def worker(i: int) -> None:
            local = random.Random(rng.random())
            while time.monotonic() < deadline:
                await one_request(session, url, model, local, ledger, timeout)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return ledger


# ---------------------------------------------------------------------------- cluster state
def _get(url: str, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{url}{path}", timeout=10) as r:
        return r.read().decode()


def instance_urls(url: str) -> list[str]:
    return [i["url"] for i in json.loads(_get(url, "/pdserve/v1/instances"))["instances"]]


def kv_usage(instance_url: str) -> float:
    for line in _get(instance_url, "/metrics").splitlines():
        if line.startswith("vllm:kv_cache_usage_perc"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def listener_pid(instance_url: str) -> int | None:
    port = int(instance_url.rsplit(":", 1)[1].split("/")[0])
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    return None


def process_tree_rss(pid: int) -> dict[int, tuple[str, int]]:
    """pid → (name, private resident bytes) of a process and its descendants.

    Private means anonymous memory (RSS minus file- and shmem-backed pages): where a leak
    grows. A prefill worker's KV cache, shared with same-host decode workers through a memfd,
    becomes resident block by block as it is first used (and shows in the decode worker's RSS
    too once mapped): that is neither a leak nor private, so it is left out.
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out = {}
    for p in procs:
        try:
            mem = p.memory_info()
            private = mem.rss - getattr(mem, "shared", 0)  # Linux: RssFile + RssShmem
            out[p.pid] = (" ".join(p.cmdline()[1:4])[:60] or p.name(), private)
        except psutil.Error:
            pass
    return out


# ---------------------------------------------------------------------------- main
def start_cluster(port: int, timeout: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pdserve", "up", "--demo", "--port", str(port), "--quiet",
           "--timeout", str(timeout)]
    proc = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"pdserve up exited with {proc.returncode}")
        try:
            if json.loads(_get(f"http://127.0.0.1:{port}", "/pdserve/v1/instances"))["instances"] and \
                    _get(f"http://127.0.0.1:{port}", "/health") is not None:
                return proc
        except Exception:
            pass
        time.sleep(2)
    raise SystemExit("cluster not ready in time")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:9000", help="scheduler URL (loopback only)")
    ap.add_argument("--start", action="store_true", help="start `pdserve up --demo` on --port and stop it after")
    ap.add_argument("--port", type=int, default=9300)
    ap.add_argument("--model", default=None, help="served model name (default: the scheduler's first)")
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--settle-seconds", type=float, default=45.0,
                    help="how long to wait for KV usage to return to idle (≥ the KV lease)")
    ap.add_argument("--max-rss-growth-mb", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the ledger here too")
    args = ap.parse_args(argv)

    cluster = None
    url = f"http://127.0.0.1:{args.port}" if args.start else args.url.rstrip("/")
    if url.split("//", 1)[1].split(":")[0] not in LOOPBACK:
        ap.error("only 127.0.0.1 may be targeted")
    try:
        if args.start:
            cluster = start_cluster(args.port, 600)
        model = args.model or json.loads(_get(url, "/v1/models"))["data"][0]["id"]
        instances = instance_urls(url)
        pids = {u: listener_pid(u) for u in instances}
        sched_pid = listener_pid(url)
        # warm up once, then take the memory baseline
        asyncio.run(drive(url, model, 5, 2, args.seed + 1, args.request_timeout))
        watched = {u: p for u, p in [*pids.items(), (url, sched_pid)] if p}
        rss0 = {u: sum(r for _, r in process_tree_rss(p).values()) for u, p in watched.items()}

        t0 = time.monotonic()
        ledger = asyncio.run(drive(url, model, args.duration, args.concurrency, args.seed,
                                   args.request_timeout))
        wall = time.monotonic() - t0

        settle_deadline = time.monotonic() + args.settle_seconds
        usage = {u: kv_usage(u) for u in instances}
        while any(v != 0.0 for v in usage.values()) and time.monotonic() < settle_deadline:
            time.sleep(1)
            usage = {u: kv_usage(u) for u in instances}
        rss1 = {u: sum(r for _, r in process_tree_rss(p).values()) for u, p in watched.items()}
        pids_after = {u: listener_pid(u) for u in instances}
    finally:
        if cluster is not None:
            os.killpg(cluster.pid, signal.SIGTERM)
            cluster.wait(120)

    checks = {
        "every request accounted for": ledger.unexpected == 0,
        "no instance restarted": pids == pids_after,
        "KV usage back to idle": all(v == 0.0 for v in usage.values()),
        "memory growth bounded": all((rss1[u] - rss0[u]) / 2**20 <= args.max_rss_growth_mb for u in rss0),
    }
    total = sum(ledger.sent.values())
    print(f"\nsoak: {total} requests in {wall:.0f}s at concurrency {args.concurrency} ({os.cpu_count()} cores)")
    print(f"{'kind':<10} {'outcome':<40} {'count':>6}")
    for (kind, result), n in sorted(ledger.outcome.items()):
        print(f"{kind:<10} {result:<40} {n:>6}")
    lat = sorted(ledger.latencies)
    if lat:
        print(f"successful request latency: median {lat[len(lat) // 2]:.2f}s, "
              f"p99 {lat[min(len(lat) - 1, int(len(lat) * 0.99))]:.2f}s")
    print(f"\n{'process':<34} {'private before MB':>18} {'after MB':>10} {'growth MB':>10}")
    for u in rss0:
        print(f"{u:<34} {rss0[u] / 2**20:>18.0f} {rss1[u] / 2**20:>10.0f} {(rss1[u] - rss0[u]) / 2**20:>10.0f}")
    print(f"\n{'instance':<34} {'pid before':>10} {'pid after':>10} {'KV usage':>9}")
    for u in instances:
        print(f"{u:<34} {pids[u]!s:>10} {pids_after[u]!s:>10} {usage[u]:>9.3f}")
    print()
    for name, ok in checks.items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sent": dict(ledger.sent), "outcomes": {f"{k}|{r}": n for (k, r), n in ledger.outcome.items()},
                       "checks": checks, "kv_usage": usage, "seconds": wall}, f, indent=2)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
