#!/usr/bin/env python
"""pdserve 1P1D against vLLM's own PD recipes and colocated vLLM, on this host, in one run.

Starts each selected system in turn (see ``_servers.py``), warms it up, sends the same fixed-seed
workloads through ``serve.py``'s client (vLLM's request function), stops it, and at the end prints
one table per workload with every system's medians and its ratio to pdserve, then the targets of
issue 8 marked PASS/FAIL. JSON + PNG go to benchmarks/results/compare-<time>/.

Workloads (same model, same vLLM flags --enforce-eager --max-model-len 2048, same seeds):
  main  random 512-token prompts / 64-token outputs, 40 prompts, 1 req/s, concurrency 8
  long  random 1536-token prompts / 64-token outputs, 24 prompts, 0.5 req/s, concurrency 8
        (the goodput target: --goodput ttft:2000 tpot:70)

    python benchmarks/compare.py                      # everything, 3 interleaved rounds (45-60 min)
    python benchmarks/compare.py --quick              # smoke run: few prompts, 1 repeat
    python benchmarks/compare.py --systems pdserve,colocated --workloads main
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pdserve.platform import usable_cores

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _cpu_account  # noqa: E402
import _servers  # noqa: E402
import serve  # noqa: E402

BASELINE = "pdserve"
DEFAULT_SYSTEMS = ("pdserve", "vllm-example", "vllm-nixl", "colocated", "colocated-rr")


@dataclass(frozen=True)
class Workload:
    name: str
    spec: serve.WorkloadSpec
    rates: tuple[float, ...]
    max_concurrency: int

    def describe(self) -> str:
        rates = ", ".join(f"{r:g}" for r in self.rates)
        return f"{self.spec.describe()} @ {rates} req/s, concurrency {self.max_concurrency}"


def default_workloads(long_input_len: int = 1536, long_prompts: int = 24, long_rate: float = 0.5,
                      rates: Sequence[float] = (1.0,), long_concurrency: int = 8) -> dict[str, Workload]:
    return {
        "main": Workload("main", serve.WorkloadSpec("random", 40, 512, 64), tuple(rates), 8),
        "long": Workload("long", serve.WorkloadSpec("random", long_prompts, long_input_len, 64), (long_rate,),
                         long_concurrency),
    }


def quick(w: Workload) -> Workload:
    return replace(w, spec=replace(w.spec, num_prompts=min(w.spec.num_prompts, 6)))


# --------------------------------------------------------------------------------------------
# table and targets (pure)
# --------------------------------------------------------------------------------------------
COLUMNS = [  # (key, header, format, lower_is_better)
    ("median_ttft_ms", "TTFT p50 ms", "{:.0f}", True),
    ("p99_ttft_ms", "TTFT p99 ms", "{:.0f}", True),
    ("median_tpot_ms", "TPOT p50 ms", "{:.1f}", True),
    ("p99_tpot_ms", "TPOT p99 ms", "{:.1f}", True),
    ("median_itl_ms", "ITL p50 ms", "{:.1f}", True),
    ("median_e2el_ms", "E2E p50 ms", "{:.0f}", True),
    ("request_throughput", "req/s", "{:.3f}", False),
    ("output_throughput", "out tok/s", "{:.1f}", False),
    ("request_goodput", "goodput req/s", "{:.3f}", False),
]


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or not math.isfinite(value) or not math.isfinite(base) or base == 0:
        return None
    return value / base


def format_table(rows: Mapping[str, Mapping[str, Any] | None], baseline: str = BASELINE,
                 errors: Mapping[str, str] | None = None) -> str:
    """One line per system: each metric's median and, in brackets, system / baseline."""
    base = rows.get(baseline)
    headers = ["system"] + [h for _, h, _, _ in COLUMNS] + ["failed"]
    body: list[list[str]] = []
    for name, r in rows.items():
        if not r:
            why = (errors or {}).get(name) or "not measured"
            body.append([name, f"-- {why.splitlines()[0][:100]}"])
            continue
        if not r.get("completed"):
            body.append([name, f"-- no request completed ({r.get('failed', 0):g} failed)"])
            continue
        line = [name]
        for key, _, fmt, _ in COLUMNS:
            v = r.get(key)
            cell = fmt.format(v) if isinstance(v, (int, float)) else "-"
            q = ratio(v, base.get(key)) if base and name != baseline else None
            if q is not None:
                cell += f" ({q:.2f}x)"
            line.append(cell)
        line.append(str(r.get("failed", 0)))
        body.append(line)
    full = [b for b in body if len(b) == len(headers)]  # "--" lines span the row: not in the widths
    widths = [max([len(headers[i])] + [len(b[i]) for b in full]) for i in range(len(headers))]
    widths[0] = max([widths[0]] + [len(b[0]) for b in body])
    out = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    for b in body:
        if len(b) == 2 and b[1].startswith("-- "):
            out.append(b[0].ljust(widths[0]) + "  " + b[1])
        else:
            out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(b, widths))))
    return "\n".join(out)


@dataclass
class Target:
    name: str
    passed: bool | None  # None: a system it needs was not measured
    detail: str

    def line(self) -> str:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[self.passed]
        return f"[{mark}] {self.name}: {self.detail}"


def _ok(r: Mapping[str, Any] | None) -> bool:
    return bool(r) and r.get("completed", 0) > 0  # type: ignore[union-attr]


def paired_ratios(key: str, other: str,
                  runs: Mapping[str, Sequence[Mapping[str, Any]]] | None) -> str:
    """`` (by repetition: 0.20 0.37 0.33)``: pdserve / other, repetition i against repetition i.

    With ``--rounds`` the systems take turns, so repetition i of each ran in the same round; the
    paired ratios show how much of a median ratio is the host's noise (pure; empty when the
    repetitions do not pair up)."""
    a, b = (runs or {}).get(BASELINE) or [], (runs or {}).get(other) or []
    if len(a) < 2 or len(a) != len(b):
        return ""
    qs = [ratio(x.get(key), y.get(key)) for x, y in zip(a, b)]
    cells = [f"{q:.2f}" for q in qs if q is not None]
    return f" (by repetition: {' '.join(cells)})" if len(cells) == len(qs) else ""


def evaluate_targets(main: Mapping[str, Mapping[str, Any] | None],
                     long: Mapping[str, Mapping[str, Any] | None] | None = None,
                     runs: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> list[Target]:
    """Issue 8's targets from the per-system medians of the main and the long workload.

    ``runs``: the main workload's repetitions per system, for the paired per-repetition ratios."""
    out: list[Target] = []
    pd = main.get(BASELINE)
    col = main.get("colocated")
    recipes = {n: main[n] for n in _servers.PD_RECIPES if _ok(main.get(n))}

    def need(name: str, *rows: Any) -> bool:
        if all(_ok(r) for r in rows):
            return True
        out.append(Target(name, None, "a system it compares was not measured"))
        return False

    name = "TTFT p50 <= 0.25x the best vLLM PD recipe's"
    if _ok(pd) and recipes:
        best_name, best = min(recipes.items(), key=lambda kv: kv[1]["median_ttft_ms"])
        q = pd["median_ttft_ms"] / best["median_ttft_ms"]
        out.append(Target(name, q <= 0.25, f"{pd['median_ttft_ms']:.0f} ms vs {best_name} "
                          f"{best['median_ttft_ms']:.0f} ms = {q:.3f}x"
                          + paired_ratios("median_ttft_ms", best_name, runs)))
    else:
        out.append(Target(name, None, "pdserve or every vLLM PD recipe missing"))
    name = "TTFT p50 <= 1.5x colocated"
    if need(name, pd, col):
        q = pd["median_ttft_ms"] / col["median_ttft_ms"]
        out.append(Target(name, q <= 1.5,
                          f"{pd['median_ttft_ms']:.0f} ms vs {col['median_ttft_ms']:.0f} ms = {q:.2f}x"
                          + paired_ratios("median_ttft_ms", "colocated", runs)))
    name = "TPOT p50 <= 0.9x colocated"
    if need(name, pd, col):
        q = pd["median_tpot_ms"] / col["median_tpot_ms"]
        out.append(Target(name, q <= 0.9,
                          f"{pd['median_tpot_ms']:.1f} ms vs {col['median_tpot_ms']:.1f} ms = {q:.2f}x"
                          + paired_ratios("median_tpot_ms", "colocated", runs)))
    name = "output throughput >= colocated"
    if need(name, pd, col):
        q = pd["output_throughput"] / col["output_throughput"]
        out.append(Target(name, q >= 1.0, f"{pd['output_throughput']:.1f} vs {col['output_throughput']:.1f} tok/s "
                          f"= {q:.2f}x" + paired_ratios("output_throughput", "colocated", runs)))
    name = "long prompts: goodput > colocated"
    lpd, lcol = (long or {}).get(BASELINE), (long or {}).get("colocated")
    if need(name, lpd, lcol):
        slo = " ".join(f"{k}:{v:g}" for k, v in lpd.get("slo_ms", {}).items())
        out.append(Target(name, lpd["request_goodput"] > lcol["request_goodput"],
                          f"{lpd['request_goodput']:.3f} vs {lcol['request_goodput']:.3f} req/s ({slo}; good "
                          f"{lpd.get('good_requests', 0):g} vs {lcol.get('good_requests', 0):g} requests)"))
    return out


def pick_cores(text: str | None, usable: Sequence[int] | None = None) -> tuple[int, int] | None:
    """``--cores P,D``, else the first two usable cores; None when that is not two usable cores."""
    have = list(usable if usable is not None else usable_cores())
    if not text:
        return (have[0], have[1]) if len(have) >= 2 else None
    parts = [x.strip() for x in text.split(",")]
    if len(parts) != 2 or not all(x.isascii() and x.isdigit() for x in parts):
        return None
    p, d = int(parts[0]), int(parts[1])
    return (p, d) if p != d and p in have and d in have else None


def parse_overrides(items: Sequence[str] | None) -> dict[str, str]:
    """``["vllm-nixl=1", "x=main+long"]`` -> ``{"vllm-nixl": "1", "x": "main+long"}`` (pure)."""
    out: dict[str, str] = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{item!r}: write SYSTEM=VALUE")
        if name.strip() not in _servers.SYSTEMS:
            raise ValueError(f"{item!r}: unknown system {name.strip()!r}")
        out[name.strip()] = value.strip()
    return out


def merge_rounds(old: Sequence[Mapping[str, Any]] | None, new: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Pool the repetitions of two rounds rate by rate; the median is taken over all of them (pure)."""
    by_rate: dict[float, list[dict[str, Any]]] = {}
    for entry in [*(old or []), *new]:
        by_rate.setdefault(entry["rate"], []).extend(entry["runs"])
    out = []
    for rate, runs in by_rate.items():
        med = serve.median_of_repeats(runs)
        med["rate"] = rate
        out.append({"rate": rate, "median": med, "runs": runs})
    return out


def primary(per_rate: Sequence[Mapping[str, Any]] | None) -> dict[str, Any] | None:
    """The table row of a system: the median at the workload's first rate."""
    if not per_rate:
        return None
    return dict(per_rate[0]["median"])


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def plot_bars(rows: Mapping[str, Mapping[str, Any] | None], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, r in rows.items() if _ok(r)]
    panels = [("TTFT ms", "median_ttft_ms", "p99_ttft_ms"), ("TPOT ms", "median_tpot_ms", "p99_tpot_ms"),
              ("E2E ms", "median_e2el_ms", "p99_e2el_ms"), ("output tok/s", "output_throughput", None),
              ("goodput req/s", "request_goodput", None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    xs = range(len(names))
    for ax, (label, k50, k99) in zip(axes, panels):
        w = 0.4 if k99 else 0.7
        ax.bar([x - (w / 2 if k99 else 0) for x in xs], [rows[n][k50] for n in names], w,
               label="p50" if k99 else None)
        if k99:
            ax.bar([x + w / 2 for x in xs], [rows[n].get(k99, 0.0) for n in names], w, label="p99", alpha=0.7)
            ax.legend(fontsize=7)
        if label.startswith(("TTFT", "E2E")):
            ax.set_yscale("log")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# profiling (optional): py-spy on every pdserve process while the main workload runs
# --------------------------------------------------------------------------------------------
def start_profiles(system: _servers.RunningSystem, out_dir: Path, seconds: int, tag: str = "") -> list:
    import shutil
    import subprocess

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("  (--profile: py-spy not found; pip install py-spy)")
        return []
    procs = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for pid, cmd in system.pids().items():
        if "python" not in cmd and "VLLM" not in cmd and "pdserve" not in cmd:
            continue
        if cmd.split()[-1:] == ["up"] or " up " in f" {cmd} ":
            continue  # the `pdserve up` supervisor only sleeps
        stem = f"{system.plan.name}-{tag}-{pid}" if tag else f"{system.plan.name}-{pid}"
        # --idle --threads: waiting threads too (a side-channel thread parked on the GIL or a lock shows up)
        argv = [spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "50", "--nonblocking",
                "--idle", "--threads", "--format", "raw", "-o", str(out_dir / f"{stem}.txt")]
        (out_dir / f"{stem}.cmd").write_text(cmd + "\n")
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
    print(f"  profiling {len(procs)} processes with py-spy for {seconds}s -> {out_dir}")
    return procs


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def write_report(doc: Mapping[str, Any], out_dir: Path) -> str:
    """The table, notes and targets of a saved ``compare.json``; writes table.txt and the plots."""
    info, slo, repeats, warmup = doc["machine"], doc["slo_ms"], doc["repeats"], doc["warmup"]
    plans, results, errors = doc["systems"], doc["results"], doc["errors"]
    systems = list(plans) + [s for s in errors if "/" not in s and s not in plans]
    header = (f"machine: {info['cpu_count']} cores (affinity {info['affinity']}), load average at start "
              f"{info['loadavg_at_start']}; every vLLM server --enforce-eager --max-model-len 2048, "
              f"VLLM_CPU_KVCACHE_SPACE={doc.get('kvcache_gib', 2)}")
    rounds = doc.get("rounds", 1)
    pooled = f" ({rounds} rounds, systems interleaved)" if rounds > 1 else ""
    report = [header, f"results: median of {repeats} repeat(s){pooled}, each after {warmup} warm-up request(s); "
              f"ratios are system / pdserve; SLO {' '.join(f'{k}:{v:g}' for k, v in slo.items())} ms"]
    for name in plans:
        reps = plans[name].get("repeats", repeats)
        note = f" ({reps} repeat(s) only)" if reps != repeats else ""
        report.append(f"  {name}: {plans[name]['bindings']}{note}")
    rows_by_wl: dict[str, dict[str, Any]] = {}
    for wname, w in doc["workloads"].items():
        rows = {s: primary(results.get(s, {}).get(wname)) for s in systems}
        rows_by_wl[wname] = rows
        why = {s: errors.get(f"{s}/{wname}") or errors.get(s) or "not measured" for s in systems}
        report += ["", f"workload {wname}: {w['describe']}", format_table(rows, errors=why)]
        title = f"{wname}: {w['describe']} ({repeats} repeat(s), median)"
        plot_bars(rows, out_dir / f"{wname}-bars.png", title)
        if len(w["rates"]) > 1:
            series = {s: [e["median"] for e in results[s][wname]] for s in systems if results.get(s, {}).get(wname)}
            serve.plot_vs_rate(series, out_dir / f"{wname}-vs-rate.png", title)
    if errors:
        report += ["", "notes:"] + [f"  {k}: {v.splitlines()[0][:300] if v else ''}" for k, v in errors.items()]
    main_runs = {s: results[s]["main"][0]["runs"] for s in systems if results.get(s, {}).get("main")}
    targets = evaluate_targets(rows_by_wl.get("main", {}), rows_by_wl.get("long"), main_runs)
    report += ["", "targets (pdserve 1P1D, same load, this run):"] + [t.line() for t in targets]
    text = "\n".join(report)
    (out_dir / "table.txt").write_text(text + "\n")
    return text


class Stop(BaseException):  # not an Exception: the per-system handler must not swallow it
    pass


def _on_signal(_sig: int, _frame: object) -> None:
    raise Stop()


def run(a: argparse.Namespace) -> int:
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in _servers.SYSTEMS]
    if bad:
        print(f"unknown system(s) {', '.join(bad)}: choose from {', '.join(_servers.SYSTEMS)}", file=sys.stderr)
        return 2
    workloads = default_workloads(a.long_input_len, a.long_prompts, a.long_rate, a.request_rate,
                                  a.long_concurrency)
    names = [w.strip() for w in a.workloads.split(",") if w.strip()]
    if any(n not in workloads for n in names):
        print(f"--workloads: choose from {', '.join(workloads)}", file=sys.stderr)
        return 2
    workloads = {n: workloads[n] for n in names}
    repeats, warmup, rounds = a.repeats, a.warmup, max(1, a.rounds)
    try:
        repeats_for = {k: int(v) for k, v in parse_overrides(a.repeats_for).items()}
        rounds_for = {k: int(v) for k, v in parse_overrides(a.rounds_for).items()}
        workloads_for = {k: [w for w in v.split("+") if w] for k, v in parse_overrides(a.workloads_for).items()}
    except ValueError as exc:
        print(f"--repeats-for/--rounds-for/--workloads-for: {exc}", file=sys.stderr)
        return 2
    if a.quick:
        workloads = {n: quick(w) for n, w in workloads.items()}
        repeats, warmup, rounds = 1, 1, 1
    slo = serve.parse_goodput(a.goodput)
    model = a.model_path or serve.default_model_path()
    vocab = serve.vocab_from_model(model)
    cores = pick_cores(a.cores)
    if cores is None:
        print(f"--cores: give two usable cores, e.g. --cores 0,1 (usable: {usable_cores()})", file=sys.stderr)
        return 2
    common = _servers.Common(model=model, vllm_args=tuple(a.vllm_arg or ()), kvcache_gib=a.kvcache_gib,
                             cores=cores)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = a.result_dir / f"compare-{stamp}{'-quick' if a.quick else ''}"
    out_dir.mkdir(parents=True, exist_ok=True)
    info = serve.machine_info()
    header = (f"machine: {info['cpu_count']} cores (affinity {info['affinity']}), load average at start "
              f"{info['loadavg_at_start']}; every vLLM server --enforce-eager --max-model-len 2048, "
              f"VLLM_CPU_KVCACHE_SPACE={a.kvcache_gib}")
    print(header, flush=True)
    results: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    plans: dict[str, dict[str, Any]] = {}
    cpu: dict[str, dict[str, list[dict[str, Any]]]] = {}  # system -> workload -> one entry per round

    def save() -> Path:
        doc = {"machine": info, "repeats": repeats * rounds, "rounds": rounds, "warmup": warmup,
               "quick": a.quick, "slo_ms": slo, "kvcache_gib": a.kvcache_gib,
               "workloads": {n: {"spec": asdict(w.spec), "rates": w.rates, "max_concurrency": w.max_concurrency,
                                 "describe": w.describe()} for n, w in workloads.items()},
               "systems": plans, "errors": errors, "results": results, "cpu_seconds": cpu}
        p = out_dir / "compare.json"
        p.write_text(json.dumps(doc, indent=1, default=str))
        return p

    def run_system(name: str, rnd: int, round_note: str, measured: dict[str, Any]) -> None:
        """Start one system, measure every workload into ``measured`` (kept on failure or Ctrl-C), stop it."""
        plan = _servers.plan_system(name, common, _servers.free_ports(name))
        reps = 1 if a.quick else repeats_for.get(name, repeats)
        plans[name] = {"description": plan.description, "url": plan.url, "bindings": plan.bindings(),
                       "argv": {p.name: p.argv for p in plan.procs},
                       "repeats": reps * min(rounds, rounds_for.get(name, rounds))}
        print(f"== {name}{round_note}: {plan.description}\n   {plan.bindings()}", flush=True)
        log_dir = out_dir / "logs" / f"round{rnd + 1}" if rounds > 1 else out_dir / "logs"
        system = _servers.RunningSystem(plan, log_dir, say=lambda m: print(m, flush=True))
        try:
            took = system.start(a.startup_timeout)
            print(f"   ready in {took:.0f}s at {plan.url}", flush=True)
            for wname, w in workloads.items():
                if name in workloads_for and wname not in workloads_for[name]:
                    errors.setdefault(f"{name}/{wname}", f"not run (--workloads-for {name}="
                                      f"{'+'.join(workloads_for[name])})")
                    continue
                if f"{name}/{wname}" in errors:
                    continue  # it broke the system in an earlier round: the other workloads still run
                # another seed per round: a round never repeats the prompts of an earlier one
                load = serve.LoadSpec(rates=list(w.rates), max_concurrency=w.max_concurrency, repeats=reps,
                                      warmup=warmup, seed=a.seed + rnd * repeats, slo_ms=slo,
                                      timeout_s=a.request_timeout)
                print(f"   {wname}: {w.describe()}", flush=True)
                spies = start_profiles(system, out_dir / "profile", a.profile, wname) \
                    if a.profile and name == BASELINE and rnd == 0 else []
                roots = [p.pid for p in system.procs]
                before, t0 = _cpu_account.snapshot(roots), time.monotonic()
                try:
                    measured[wname] = asyncio.run(serve.measure(
                        plan.url, common.served_name, vocab, w.spec, load,
                        log=lambda m: print("  " + m, flush=True), alive=system.alive))
                    usage = _cpu_account.used(before, _cpu_account.snapshot(roots))
                    wall = time.monotonic() - t0
                    print("   " + _cpu_account.format_usage(usage, wall, info["cpu_count"]).replace("\n", "\n   "),
                          flush=True)
                    cpu.setdefault(name, {}).setdefault(wname, []).append({"wall_s": wall, "seconds": usage})
                except serve.SystemDied as died:
                    measured[wname] = died.args[0]  # what was measured until the process died
                    errors[f"{name}/{wname}"] = (f"a process died during the {wname} workload "
                                                 f"(logs in {out_dir}/logs)")
                    print(f"   FAILED: {name}: {errors[f'{name}/{wname}']}", flush=True)
                    break  # the system is broken: stop it; later rounds run its other workloads
                finally:
                    for sp in spies:
                        sp.wait(timeout=a.profile + 60)
        except _servers.StartError as exc:
            errors[name] = str(exc)
            print(f"   FAILED: {exc}", flush=True)
        except Exception as exc:  # noqa: BLE001 - one system failing must not lose the others
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"   FAILED: {errors[name]}", flush=True)
        finally:
            print(f"   stopping {name} ...", flush=True)
            system.stop()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for rnd in range(rounds):
            for name in systems:
                if name == "vllm-nixl" and (why := _servers.nixl_problem()):
                    errors[name] = why
                    if rnd == 0:
                        print(f"== {name}: skipped: {why}", flush=True)
                    continue
                if rnd > 0 and name in errors:
                    continue  # failed in an earlier round: its error stands
                if rnd >= rounds_for.get(name, rounds):
                    continue  # --rounds-for: a slow system takes part in the first rounds only
                round_note = f" (round {rnd + 1}/{rounds})" if rounds > 1 else ""
                measured: dict[str, Any] = {}
                try:
                    run_system(name, rnd, round_note, measured)
                finally:  # also when interrupted: what was measured stays in the results
                    for wname, per_rate in measured.items():
                        results.setdefault(name, {})[wname] = merge_rounds(results.get(name, {}).get(wname),
                                                                           per_rate)
                    save()
    except Stop:
        print("interrupted: systems stopped; partial results saved", file=sys.stderr)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

    text = write_report(json.loads(save().read_text()), out_dir)
    print("\n" + text, flush=True)
    doc_path = save()
    print(f"\nwrote {doc_path}, {out_dir / 'table.txt'} and the PNG plots in {out_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help=f"comma-separated, in run order (default {','.join(DEFAULT_SYSTEMS)})")
    p.add_argument("--workloads", default="main,long", help="main, long (default both)")
    p.add_argument("--quick", action="store_true", help="smoke run: at most 6 prompts per workload, 1 repeat")
    p.add_argument("--repeats", type=int, default=1,
                   help="repetitions per workload and round; the median of all is reported (default 1)")
    p.add_argument("--repeats-for", action="append", default=None, metavar="SYSTEM=N",
                   help="fewer repetitions for a slow system (default vllm-nixl=1: ~50 s TTFT, ~5 tok/s)")
    p.add_argument("--rounds-for", action="append", default=None, metavar="SYSTEM=N",
                   help="a slow system takes part in the first N rounds only (default vllm-nixl=1)")
    p.add_argument("--workloads-for", action="append", default=None, metavar="SYSTEM=W1+W2",
                   help="only these workloads for a system (default vllm-nixl=main; no target uses its long run)")
    p.add_argument("--rounds", type=int, default=3,
                   help="measure every system this many times, interleaved in time (restarting it each "
                        "round), and pool the repetitions: evens out a noisy shared host (default 3)")
    p.add_argument("--warmup", type=int, default=4, help="warm-up requests per workload (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-rate", type=float, nargs="+", default=[1.0],
                   help="main workload rate(s); several draw a latency-vs-rate plot (default 1)")
    p.add_argument("--long-input-len", type=int, default=1536, help="long workload prompt tokens (default 1536)")
    p.add_argument("--long-prompts", type=int, default=24, help="long workload prompts (default 24)")
    p.add_argument("--long-rate", type=float, default=0.5, help="long workload req/s (default 0.5)")
    p.add_argument("--long-concurrency", type=int, default=8,
                   help="long workload requests in flight at most (default 8; 1 measures unqueued latency)")
    p.add_argument("--goodput", nargs="+", default=["ttft:2000", "tpot:70"], metavar="NAME:MS")
    p.add_argument("--model-path", help="HF model folder (default: the demo model, `pdserve model demo`)")
    p.add_argument("--vllm-arg", action="append", metavar="ARG",
                   help="extra flag for every vLLM server, repeatable (e.g. --vllm-arg=--max-num-seqs=16)")
    p.add_argument("--cores", metavar="P,D", help="the two cores every system runs on: P (prefill, server 0) and "
                   "D (decode, server 1); colocated gets both (default: the first two usable cores)")
    p.add_argument("--kvcache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (default 2)")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--request-timeout", type=float, default=1800.0)
    p.add_argument("--profile", type=int, default=0, metavar="SECONDS",
                   help="py-spy record every pdserve process for this long at the start of each workload")
    p.add_argument("--result-dir", type=Path, default=serve.RESULTS_DIR)
    p.add_argument("--report", type=Path, metavar="COMPARE.JSON",
                   help="start nothing: print the table of a saved run again (and redraw its plots)")
    a = p.parse_args(argv)
    if a.report:
        print(write_report(json.loads(a.report.read_text()), a.report.parent))
        return 0
    if a.repeats_for is None:
        a.repeats_for = ["vllm-nixl=1"]
    if a.rounds_for is None:
        a.rounds_for = ["vllm-nixl=1"]
    if a.workloads_for is None:
        a.workloads_for = ["vllm-nixl=main"]
    try:
        serve.parse_goodput(a.goodput)
    except ValueError as exc:
        p.error(str(exc))
    if a.repeats < 1:
        p.error("--repeats must be at least 1")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
