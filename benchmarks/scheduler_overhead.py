#!/usr/bin/env python
"""Scheduler overhead: what the pdserve scheduler adds in front of zero-latency fake instances.

The same load is sent, in one run, to
  direct      one fake instance, one call (the floor of any HTTP hop)
  direct-pd   the client itself does prefill (max_tokens=1) then decode on the fake instances
              (what PD costs without any router: the baseline for "added latency")
  pdserve     the pdserve scheduler in PD mode in front of the same fakes
  vllm-router vllm-router (PyPI `vllm-router`) with --vllm-pd-disaggregation, if installed
Latency is measured at concurrency 1 (p50/p99), throughput at --concurrency. Everything runs on
127.0.0.1; every loop is bounded by --requests. The fakes are test doubles (pdserve.testing).

    python benchmarks/scheduler_overhead.py [--requests 2000] [--concurrency 32] [--stream] [--plot out.png]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

HOST = "127.0.0.1"
MODEL = "fake-model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Proc:
    """A server subprocess that is stopped (terminate, then kill) however the benchmark ends."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = open(f"/tmp/pdserve_bench_{name}.log", "w")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.log.close()

    def tail(self) -> str:
        try:
            with open(self.log.name) as f:
                return "".join(f.readlines()[-5:]).strip()
        except OSError:
            return ""


async def wait_http(url: str, proc: Proc, timeout: float = 60.0, path: str = "/health") -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited: {proc.tail()}")
            try:
                async with s.get(url + path, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{proc.name} not healthy after {timeout:g} s: {proc.tail()}")


@dataclass
class Result:
    target: str
    lat1: list[float] = field(default_factory=list)  # seconds, concurrency 1
    latc: list[float] = field(default_factory=list)  # seconds, concurrency C
    rps: float = 0.0
    errors: int = 0
    note: str = ""
    cpu_ms: float | None = None  # CPU time of the router process per request (immune to a busy host)

    @staticmethod
    def pct(xs: list[float], q: float) -> float:
        if not xs:
            return float("nan")
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3


Call = Any  # async (session) -> None, raises on failure


async def run_load(call: Call, n: int, concurrency: int) -> tuple[list[float], int, float]:
    lat: list[float] = []
    errors = 0
    it = iter(range(n))
    conn = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:
        async def worker() -> None:
            nonlocal errors
            for _ in it:
                t = time.perf_counter()
                try:
                    await call(s)
                    lat.append(time.perf_counter() - t)
                except Exception:  # count, keep going: the benchmark reports errors
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return lat, errors, wall


def make_calls(body: dict[str, Any], stream: bool) -> dict[str, Any]:
    raw = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}

    async def read_ok(r: aiohttp.ClientResponse, streamed: bool = stream) -> bytes:
        data = await r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")
        if streamed and not data.endswith(b"data: [DONE]\n\n"):
            raise RuntimeError("stream did not end with [DONE]")
        return data

    def simple(url: str) -> Call:
        async def call(s: aiohttp.ClientSession) -> None:
            async with s.post(url + "/v1/completions", data=raw, headers=headers) as r:
                await read_ok(r)
        return call

    def client_pd(prefill: str, decode: str) -> Call:
        pre = dict(body, max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True})
        pre.pop("stream_options", None)
        pre_raw = json.dumps(pre).encode()

        async def call(s: aiohttp.ClientSession) -> None:
            async with s.post(prefill + "/v1/completions", data=pre_raw, headers=headers) as r:
                kv = json.loads(await read_ok(r, streamed=False)).get("kv_transfer_params")
            dec = raw if kv is None else json.dumps(dict(body, kv_transfer_params=kv)).encode()
            async with s.post(decode + "/v1/completions", data=dec, headers=headers) as r:
                await read_ok(r)
        return call

    return {"simple": simple, "client_pd": client_pd}


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its threads, from /proc (Linux)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(name: str, call: Call, args: argparse.Namespace, note: str = "", pid: int | None = None) -> Result:
    await run_load(call, min(100, args.requests), 4)  # warm-up: connections, caches
    cpu0 = proc_cpu_seconds(pid) if pid else 0.0
    lat1, e1, _ = await run_load(call, args.latency_requests, 1)
    latc, e2, wall = await run_load(call, args.requests, args.concurrency)
    res = Result(name, lat1, latc, len(latc) / wall if wall else 0.0, e1 + e2, note)
    if pid:
        res.cpu_ms = (proc_cpu_seconds(pid) - cpu0) / max(1, len(lat1) + len(latc)) * 1e3
    return res


def router_binary() -> tuple[str | None, str]:
    exe = shutil.which("vllm-router") or os.path.join(os.path.dirname(sys.executable), "vllm-router")
    if not os.path.exists(exe):
        return None, "vllm-router is not installed (pip install vllm-router)"
    try:
        out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"vllm-router does not run here: {exc}"
    if "--vllm-pd-disaggregation" not in out.stdout + out.stderr:
        return None, "this vllm-router has no --vllm-pd-disaggregation (PD mode)"
    return exe, ""


async def main_async(args: argparse.Namespace) -> list[Result]:
    procs: list[Proc] = []
    results: list[Result] = []
    py = sys.executable
    try:
        pp, dp = free_port(), free_port()
        fp = Proc("fake_prefill", [py, "-m", "pdserve.testing.fake_instance", "--port", str(pp), "--role", "prefill",
                                   "--index", "0", "--global-index", "0", "--model", MODEL])
        fd = Proc("fake_decode", [py, "-m", "pdserve.testing.fake_instance", "--port", str(dp), "--role", "decode",
                                  "--index", "0", "--global-index", "1", "--model", MODEL, "--no-require-kv-params"])
        procs += [fp, fd]
        pre_url, dec_url = f"http://{HOST}:{pp}", f"http://{HOST}:{dp}"
        await wait_http(pre_url, fp)
        await wait_http(dec_url, fd)

        body: dict[str, Any] = {"model": MODEL, "prompt": "The quick brown fox jumps over the lazy dog. " * 8,
                                "max_tokens": args.max_tokens, "temperature": 0}
        if args.stream:
            body.update(stream=True, stream_options={"include_usage": True})
        calls = make_calls(body, args.stream)

        results.append(await measure("direct", calls["simple"](dec_url), args, "1 call to the decode fake"))
        results.append(await measure("direct-pd", calls["client_pd"](pre_url, dec_url), args,
                                     "client does prefill + decode itself"))

        sp = free_port()
        sched = Proc("pdserve", [py, "-m", "pdserve.scheduler", "--host", HOST, "--port", str(sp),
                                 "--prefill-url", f"{HOST}:{pp}", "--decode-url", f"{HOST}:{dp}",
                                 "--served-model-name", MODEL],
                     env={"PDSERVE_LOG_LEVEL": "WARNING"})
        procs.append(sched)
        await wait_http(f"http://{HOST}:{sp}", sched)
        results.append(await measure("pdserve", calls["simple"](f"http://{HOST}:{sp}"), args,
                                     "policies prefix-affinity / least-load", pid=sched.p.pid))
        sched.stop()

        exe, why = (None, "skipped (--skip-router)") if args.skip_router else router_binary()
        if exe is None:
            results.append(Result("vllm-router", note=f"unavailable: {why}"))
        else:
            rp = free_port()
            router = Proc("vllm_router", [exe, "--host", HOST, "--port", str(rp), "--vllm-pd-disaggregation",
                                          "--prefill", pre_url, "--decode", dec_url,
                                          "--max-concurrent-requests", str(max(256, args.concurrency * 4)),
                                          "--log-level", "warning"])
            procs.append(router)
            try:
                await wait_http(f"http://{HOST}:{rp}", router, timeout=60)
                results.append(await measure("vllm-router", calls["simple"](f"http://{HOST}:{rp}"), args,
                                             "--vllm-pd-disaggregation, default policies", pid=router.p.pid))
            except RuntimeError as exc:
                results.append(Result("vllm-router", note=f"unavailable: {exc}"))
    finally:
        for p in procs:
            p.stop()
    return results


def print_table(results: list[Result], args: argparse.Namespace) -> None:
    base = next((r for r in results if r.target == "direct-pd"), None)
    base_p50 = Result.pct(base.lat1, 0.5) if base else float("nan")
    print(f"\nscheduler overhead: {args.requests} requests at concurrency {args.concurrency}, "
          f"{args.latency_requests} at concurrency 1, stream={args.stream}, max_tokens={args.max_tokens}\n")
    hdr = (f"{'target':<12} {'p50 ms c=1':>10} {'p99 ms c=1':>10} {'added p50':>10} {'req/s':>9} "
           f"{'p50 ms c=N':>10} {'p99 ms c=N':>10} {'cpu ms/req':>10} {'errors':>6}  note")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        if not r.lat1 and not r.latc:
            print(f"{r.target:<12} {'-':>10} {'-':>10} {'-':>10} {'-':>9} {'-':>10} {'-':>10} {'-':>10} {'-':>6}  "
                  f"{r.note}")
            continue
        p50 = Result.pct(r.lat1, 0.5)
        added = f"{p50 - base_p50:+.3f}" if r.target not in ("direct", "direct-pd") else "-"
        print(f"{r.target:<12} {p50:>10.3f} {Result.pct(r.lat1, 0.99):>10.3f} {added:>10} {r.rps:>9.0f} "
              f"{Result.pct(r.latc, 0.5):>10.3f} {Result.pct(r.latc, 0.99):>10.3f} "
              f"{'-' if r.cpu_ms is None else f'{r.cpu_ms:.3f}':>10} {r.errors:>6}  {r.note}")
    print("\nadded p50 = target p50 - direct-pd p50 at concurrency 1 (the scheduler's own cost per request)")
    print("cpu ms/req = CPU time of the router process per request (does not depend on other load on the host)")
    try:
        print(f"host: {os.cpu_count()} CPUs, load average {open('/proc/loadavg').read().split()[0]} "
              "(other processes make the latency columns noisy)")
    except OSError:
        pass


def plot(results: list[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if r.lat1]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r.target for r in shown]
    a1.bar(names, [Result.pct(r.lat1, 0.5) for r in shown], label="p50")
    a1.bar(names, [Result.pct(r.lat1, 0.99) - Result.pct(r.lat1, 0.5) for r in shown],
           bottom=[Result.pct(r.lat1, 0.5) for r in shown], alpha=0.5, label="p99")
    a1.set_ylabel("latency at concurrency 1 (ms)")
    a1.legend()
    a2.bar(names, [r.rps for r in shown])
    a2.set_ylabel("requests/s at concurrency N")
    fig.suptitle("scheduler overhead in front of zero-latency fake instances")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="requests for the throughput phase")
    p.add_argument("--latency-requests", type=int, default=500, help="requests at concurrency 1")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--stream", action="store_true", help="streaming requests (SSE) instead of JSON")
    p.add_argument("--skip-router", action="store_true", help="do not try vllm-router")
    p.add_argument("--plot", metavar="OUT.png", help="also draw a PNG (matplotlib)")
    args = p.parse_args(argv)
    try:
        import uvloop
        results = uvloop.run(main_async(args))
    except ImportError:
        results = asyncio.run(main_async(args))
    print_table(results, args)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
