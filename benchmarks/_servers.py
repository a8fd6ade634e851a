"""Start and stop the systems ``compare.py`` measures, on 127.0.0.1 only, with no orphans.

Each system is a list of processes (``ProcSpec``: argv + env + the URL whose /health says it is
ready) built by a pure function, so the command lines and CPU bindings are unit tested. Every
process runs under ``pdserve.worker.process.ManagedProcess``: its own session/process group,
SIGTERM if the benchmark dies (PR_SET_PDEATHSIG), the whole group and every descendant seen
SIGKILLed after a deadline.

  pdserve       ``pdserve up`` (ranktables + ``pdserve serve`` role daemons): prefill on core 0,
                decode on core 1 (the ranktable's CPU device ids), scheduler unbound
  pdserve-shared  the same with ``--cpu-bind prefill=0-1 --cpu-bind decode=0-1``: each instance's
                worker runs on both cores, so a lone prefill (or decode step) gets two (not in
                the default run; README "Benchmarks" has its measurement)
  vllm-example  vLLM servers with ExampleConnector (kv_producer on core 0, kv_consumer on core 1,
                one shared_storage_path under /dev/shm) behind pd_proxy.py --mode pd
  vllm-nixl     vLLM servers with NixlConnector (kv_both, kv_buffer_device cpu, UCX on host
                memory) on cores 0 / 1 behind pd_proxy.py --mode pd
  colocated     one vLLM server, no connector, VLLM_CPU_OMP_THREADS_BIND=0-1
  colocated-rr  two vLLM servers, no connector, on core 0 and core 1, behind pd_proxy.py --mode rr
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pdserve.platform import core_ranges
from pdserve.up.runner import port_in_use
from pdserve.worker.process import ManagedProcess

HOST = "127.0.0.1"
HERE = Path(__file__).resolve().parent
PROXY = HERE / "pd_proxy.py"
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
SERVED_NAME = "demo"
PD_RECIPES = ("vllm-example", "vllm-nixl")
PDSERVE_SYSTEMS = ("pdserve", "pdserve-shared")
SYSTEMS = ("pdserve", "pdserve-shared", "vllm-example", "vllm-nixl", "colocated", "colocated-rr")
DESCRIPTIONS = {
    "pdserve": "pdserve 1P1D: prefill core 0, decode core 1, scheduler",
    "pdserve-shared": "pdserve 1P1D, prefill and decode workers each on both cores, scheduler",
    "vllm-example": "vLLM PD recipe, ExampleConnector (shared storage on /dev/shm), P core 0 / D core 1, toy proxy",
    "vllm-nixl": "vLLM PD recipe, NixlConnector (UCX, kv_buffer_device cpu), P core 0 / D core 1, toy proxy",
    "colocated": "one vLLM server on both cores (OMP bind 0-1)",
    "colocated-rr": "two vLLM servers, core 0 and core 1, round-robin toy proxy",
}
NIXL_HINT = "pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1 (into the venv)"


@dataclass(frozen=True)
class ProcSpec:
    name: str
    argv: list[str]
    env: dict[str, str]  # added to the inherited environment
    health_url: str
    binding: str = "unbound"  # what VLLM_CPU_OMP_THREADS_BIND (or the ranktable) gives it


@dataclass
class SystemPlan:
    name: str
    url: str  # the OpenAI endpoint the client talks to
    procs: list[ProcSpec]
    description: str = ""
    scratch: list[Path] = field(default_factory=list)  # removed on stop

    def bindings(self) -> str:
        return ", ".join(f"{p.name}={p.binding}" for p in self.procs)


@dataclass(frozen=True)
class Common:
    """What every system shares: the model, the same vLLM flags, the KV cache size."""

    model: str
    served_name: str = SERVED_NAME
    max_model_len: int = 2048
    vllm_args: tuple[str, ...] = ()
    kvcache_gib: int = 2
    python: str = field(default_factory=lambda: sys.executable)
    cores: tuple[int, int] = (0, 1)  # P (or server 0) and D (or server 1); colocated gets both

    @property
    def both(self) -> str:
        return core_ranges(self.cores)

    def server_flags(self) -> list[str]:
        return ["--model", self.model, "--served-model-name", self.served_name,
                "--max-model-len", str(self.max_model_len), "--enforce-eager", *self.vllm_args]

    def env(self) -> dict[str, str]:
        return {"VLLM_CPU_KVCACHE_SPACE": str(self.kvcache_gib), "PYTHONUNBUFFERED": "1"}


def _vllm(c: Common, name: str, port: int, bind: str, kv: Mapping[str, object] | None = None,
          extra_env: Mapping[str, str] | None = None) -> ProcSpec:
    argv = [c.python, "-m", VLLM_MODULE, *c.server_flags(), "--host", HOST, "--port", str(port)]
    if kv is not None:
        argv += ["--kv-transfer-config", json.dumps(kv, separators=(",", ":"))]
    env = dict(c.env(), VLLM_CPU_OMP_THREADS_BIND=bind, **(extra_env or {}))
    return ProcSpec(name, argv, env, f"http://{HOST}:{port}/health", f"cores {bind}")


def _proxy(c: Common, port: int, mode: str, **targets: Sequence[int]) -> ProcSpec:
    argv = [c.python, str(PROXY), "--host", HOST, "--port", str(port), "--mode", mode]
    for flag, ports in targets.items():
        for p in ports:
            argv += [f"--{flag}", f"{HOST}:{p}"]
    return ProcSpec("proxy", argv, {"PYTHONUNBUFFERED": "1"}, f"http://{HOST}:{port}/health")


def plan_system(name: str, c: Common, ports: Sequence[int], scratch_dir: Path | None = None) -> SystemPlan:
    """The processes of one system (pure). ``ports``: enough free ports (see ``ports_needed``)."""
    desc = DESCRIPTIONS.get(name, name)
    if name in PDSERVE_SYSTEMS:
        sched, base = ports[0], ports[1]
        run_dir = scratch_dir or Path(tempfile.gettempdir()) / f"pdserve-bench-{sched}"
        argv = [c.python, "-m", "pdserve", "up", "--model", c.model, "--served-model-name", c.served_name,
                "--max-model-len", str(c.max_model_len), "--prefill", "1", "--decode", "1",
                "--port", str(sched), "--base-port", str(base), "--run-dir", str(run_dir),
                "--cores", c.both,  # the recipes' cores on any host (pdserve up would take them all)
                "--timeout", "1800", "--drain-seconds", "5", "--enforce-eager"]
        binding = f"prefill core {c.cores[0]}, decode core {c.cores[1]} (ranktable), scheduler unbound"
        if name == "pdserve-shared":
            argv += ["--cpu-bind", f"prefill={c.both}", "--cpu-bind", f"decode={c.both}"]
            binding = f"prefill cores {c.both}, decode cores {c.both}, scheduler unbound"
        argv += c.vllm_args
        proc = ProcSpec("up", argv, c.env(), f"http://{HOST}:{sched}/health", binding)
        return SystemPlan(name, f"http://{HOST}:{sched}", [proc], desc, [run_dir])
    if name == "vllm-example":
        proxy, pp, dp = ports[:3]
        store = scratch_dir or Path("/dev/shm") / f"pdserve-bench-example-{proxy}"
        kv = {"kv_connector": "ExampleConnector", "kv_connector_extra_config": {"shared_storage_path": str(store)}}
        procs = [_vllm(c, "prefill", pp, str(c.cores[0]), dict(kv, kv_role="kv_producer")),
                 _vllm(c, "decode", dp, str(c.cores[1]), dict(kv, kv_role="kv_consumer")),
                 _proxy(c, proxy, "pd", prefill=[pp], decode=[dp])]
        return SystemPlan(name, f"http://{HOST}:{proxy}", procs, desc, [store])
    if name == "vllm-nixl":
        proxy, pp, dp, ps, ds = ports[:5]
        kv = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}
        procs = [_vllm(c, "prefill", pp, str(c.cores[0]), kv, {"VLLM_NIXL_SIDE_CHANNEL_HOST": HOST,
                                                    "VLLM_NIXL_SIDE_CHANNEL_PORT": str(ps)}),
                 _vllm(c, "decode", dp, str(c.cores[1]), kv, {"VLLM_NIXL_SIDE_CHANNEL_HOST": HOST,
                                                   "VLLM_NIXL_SIDE_CHANNEL_PORT": str(ds)}),
                 _proxy(c, proxy, "pd", prefill=[pp], decode=[dp])]
        return SystemPlan(name, f"http://{HOST}:{proxy}", procs, desc)
    if name == "colocated":
        port = ports[0]
        return SystemPlan(name, f"http://{HOST}:{port}", [_vllm(c, "server", port, c.both)], desc)
    if name == "colocated-rr":
        proxy, a, b = ports[:3]
        procs = [_vllm(c, "server0", a, str(c.cores[0])), _vllm(c, "server1", b, str(c.cores[1])),
                 _proxy(c, proxy, "rr", backend=[a, b])]
        return SystemPlan(name, f"http://{HOST}:{proxy}", procs, desc)
    raise ValueError(f"unknown system {name!r}: choose from {', '.join(SYSTEMS)}")


def ports_needed(name: str) -> int:
    return {"pdserve": 2, "pdserve-shared": 2, "vllm-example": 3, "vllm-nixl": 5, "colocated": 1,
            "colocated-rr": 3}[name]


def free_ports(name: str, start: int = 21000, stop: int = 29000) -> list[int]:
    """Free loopback ports for a system; pdserve's base port also needs base, base+1 and +10000."""
    import random

    rng = random.Random(os.getpid() ^ int(time.time()))
    n = ports_needed(name)
    for _ in range(2000):
        cands = [rng.randrange(start, stop) for _ in range(n)]
        if name in PDSERVE_SYSTEMS:
            sched, base = cands
            need = [sched, base, base + 1, base + 10000, base + 10001]
        else:
            need = cands
        if len(set(need)) == len(need) and not any(port_in_use(p, HOST) for p in need):
            return cands
    raise RuntimeError("no free ports on 127.0.0.1")


def nixl_problem() -> str | None:
    """None when vLLM's NixlConnector can import its NIXL wrapper, else why not (and the fix)."""
    try:
        import nixl  # noqa: F401
        from nixl._api import nixl_agent  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means the recipe cannot run
        return f"NIXL is not importable ({type(exc).__name__}: {exc}); {NIXL_HINT}"
    return None


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
            return r.status == 200
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


class StartError(RuntimeError):
    pass


class RunningSystem:
    """The live processes of one plan; ``stop()`` leaves nothing behind (also on errors)."""

    def __init__(self, plan: SystemPlan, log_dir: Path, say: Callable[[str], None] = print) -> None:
        self.plan = plan
        self.log_dir = log_dir
        self.say = say
        self.procs: list = []
        self._sinks: list = []

    def start(self, timeout: float = 900.0) -> float:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for d in self.plan.scratch:
            shutil.rmtree(d, ignore_errors=True)
        t0 = time.monotonic()
        for spec in self.plan.procs:
            sink = open(self.log_dir / f"{self.plan.name}-{spec.name}.log", "w", buffering=1)  # noqa: SIM115
            self._sinks.append(sink)
            env = dict(os.environ, **spec.env)
            self.procs.append(ManagedProcess(f"{self.plan.name}/{spec.name}", spec.argv, env, out=sink,
                                             prefix="", ring=60).start())
        pending = {spec.name: spec.health_url for spec in self.plan.procs}
        last = t0
        while pending:
            for p in self.procs:
                if p.poll() is not None:
                    p.join_tee(2.0)
                    tail = "\n".join("    | " + line for line in p.tail(25))
                    raise StartError(f"{p.name} exited with {p.poll()} during start-up; log "
                                     f"{self.log_dir}/{self.plan.name}-*.log:\n{tail}")
                p.remember_descendants()
            for n, url in list(pending.items()):
                if http_ok(url):
                    del pending[n]
            if time.monotonic() - t0 > timeout:
                raise StartError(f"{self.plan.name}: {', '.join(pending)} not healthy after {timeout:g}s "
                                 f"(logs in {self.log_dir})")
            if pending and time.monotonic() - last > 30:
                last = time.monotonic()
                self.say(f"  ... waiting for {', '.join(pending)} ({time.monotonic() - t0:.0f}s)")
            time.sleep(1.0)
        for p in self.procs:
            p.remember_descendants()
        return time.monotonic() - t0

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def pids(self) -> dict[str, int]:
        """Every live process of the system (descendants included) by pid -> short command line."""
        import psutil

        out = {}
        for p in self.procs:
            try:
                root = psutil.Process(p.pid)
                for q in [root, *root.children(recursive=True)]:
                    out[q.pid] = " ".join(q.cmdline()[:6])[:160] or q.name()
            except psutil.Error:
                continue
        return out

    def stop(self, deadline: float = 60.0) -> None:
        for p in reversed(self.procs):
            p.remember_descendants()
            p.signal_group(signal.SIGTERM)
        threads = [threading.Thread(target=p.stop, args=(deadline,), daemon=True) for p in self.procs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(deadline + 30.0)
        self.procs.clear()
        for s in self._sinks:
            try:
                s.close()
            except OSError:
                pass
        self._sinks.clear()
        for d in self.plan.scratch:
            shutil.rmtree(d, ignore_errors=True)
