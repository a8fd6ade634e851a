"""CPU seconds each process of a system used during a workload: who competes for the cores.

On a host with as few cores as this one, what a disaggregated setup loses is often not compute
but contention: vLLM's engine cores, API servers and the router float over the cores the model
workers are bound to. ``compare.py`` takes a snapshot before and after each workload and prints
the difference per process, next to the CPU the host had (cores x wall time).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_PORT = re.compile(r"--port[= ](\d+)")


@dataclass(frozen=True)
class Proc:
    label: str
    cpu_s: float


def _is_server(cmdline: str) -> bool:
    return "vllm.entrypoints" in cmdline or "vllm serve" in cmdline


def _role(cmdline: str) -> str:
    if "kv_producer" in cmdline:
        return "prefill "
    if "kv_consumer" in cmdline:
        return "decode "
    return ""


def label(name: str, cmdline: str, server_cmdline: str | None) -> str:
    """A short, stable name: the process kind plus the vLLM server it belongs to (role, port)."""
    if name.startswith("VLLM::Worker") or "VLLM::Worker" in cmdline:
        kind = "worker"
    elif name.startswith("VLLM::EngineCor") or "VLLM::EngineCore" in cmdline:
        kind = "engine core"
    elif _is_server(cmdline):
        kind = "API server"
    elif "pdserve" in cmdline and "serve" in cmdline:
        kind = "pdserve daemon"
    elif "proxy" in cmdline:
        kind = "proxy"
    elif "resource_tracker" in cmdline:
        kind = "resource tracker"
    else:
        kind = name or "process"
    if server_cmdline is None:
        return kind
    port = _PORT.search(server_cmdline)
    return f"{_role(server_cmdline)}{kind} :{port.group(1) if port else '?'}"


def snapshot(root_pids: Iterable[int]) -> dict[int, Proc]:
    """pid -> (label, CPU seconds so far) of the roots and all their descendants."""
    import psutil

    out: dict[int, Proc] = {}
    for pid in root_pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for p in procs:
            try:
                with p.oneshot():
                    cmd = " ".join(p.cmdline())
                    t = p.cpu_times()
                    # the vLLM server this process belongs to: itself or its nearest ancestor
                    server = next((c for c in (" ".join(q.cmdline()) for q in [p, *p.parents()])
                                   if _is_server(c)), None)
                    out[p.pid] = Proc(label(p.name(), cmd, server), t.user + t.system)
            except psutil.Error:
                continue
    return out


def used(before: Mapping[int, Proc], after: Mapping[int, Proc]) -> dict[str, float]:
    """CPU seconds per label between two snapshots (processes of one label summed), largest first."""
    acc: dict[str, float] = {}
    for pid, a in after.items():
        b = before.get(pid)
        acc[a.label] = acc.get(a.label, 0.0) + a.cpu_s - (b.cpu_s if b else 0.0)
    return dict(sorted(acc.items(), key=lambda kv: -kv[1]))


def format_usage(usage: Mapping[str, float], wall_s: float, cores: int) -> str:
    """One line per process kind, with its share of the host's CPU (cores x wall)."""
    avail = max(wall_s * cores, 1e-9)
    total = sum(usage.values())
    lines = [f"CPU during the workload: {total:.1f} s of {avail:.1f} s available "
             f"({cores} cores x {wall_s:.1f} s, {total / avail:.0%})"]
    lines += [f"  {name:<28} {sec:7.1f} s  {sec / avail:5.1%}" for name, sec in usage.items() if sec >= 0.05]
    return "\n".join(lines)
