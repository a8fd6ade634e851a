"""Run a planned cluster: ranktables, role daemons, health wait, optional question, clean stop.

The instances and the scheduler are started exactly as an operator would: ``pdserve serve`` with
GLOBAL_RANK_TABLE_FILE_PATH / RANK_TABLE_FILE_PATH (and NODE_PORTS for the scheduler), so ``up``
exercises the production path. Every daemon runs in its own process group and is stopped with its
whole group and every descendant seen, so Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pdserve import ranktable
from pdserve.errors import ConfigError, PdserveError
from pdserve.net import bind_failure
from pdserve.ranktable.io import ensure_dir
from pdserve.up.plan import ClusterPlan, ranktable_paths
from pdserve.worker.command import shell_line
from pdserve.worker.daemon import http_get_ok
from pdserve.worker.process import ManagedProcess


class UpError(PdserveError):
    """The cluster did not come up (a daemon died, timeout); the message carries the log tail."""

    exit_code = 1


UP_DECODE_ONLY_WHEN_QUEUED = 1024  # the scheduler's --decode-only-when-queued under `pdserve up`
COMMANDS_FILE = "commands.sh"  # in the run folder: every daemon's command line, for a re-run by hand
SCHEDULER = "scheduler"  # the scheduler daemon's name (the instances are named after their role and index)


@dataclass
class UpSettings:
    model: str
    served_name: str
    run_dir: Path
    max_model_len: int | None = None
    timeout: float = 300.0
    drain_seconds: float = 30.0
    kv_connector: str | None = None
    vllm_args: Sequence[str] = ()
    scheduler_args: Sequence[str] = ()
    quiet: bool = False
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    return bind_failure(host, port) is not None


def check_ports_free(plan: ClusterPlan) -> None:
    busy = [p for p in plan.ports() if port_in_use(p, plan.host)]
    if busy:
        raise ConfigError("flags", "--port/--base-port", f"port(s) {', '.join(map(str, busy))} on {plan.host} "
                          "are already in use (another pdserve up?)",
                          "stop what listens there, or pass another --port / --base-port")


def write_ranktables(plan: ClusterPlan, run_dir: Path) -> tuple[Path, dict[str, Path], Path]:
    prefill = [list(i.devices) for i in plan.prefill]
    decode = [list(i.devices) for i in plan.decode]
    paths = ranktable.generate(prefill, decode, True, run_dir, server_ip=plan.host, notify=lambda _m: None,
                               dir_flag="--run-dir")
    return ranktable_paths(paths, plan)


def daemon_commands(plan: ClusterPlan, s: UpSettings, global_path: Path, locals_: dict[str, Path],
                    host_path: Path, python: str = sys.executable) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, argv, env) of every daemon: instances first, the scheduler last (pure)."""
    common = ["--model", s.model, "--served-model-name", s.served_name]
    if s.max_model_len:
        common += ["--max-model-len", str(s.max_model_len)]
    base_env = dict(s.env)
    base_env.update({"GLOBAL_RANK_TABLE_FILE_PATH": str(global_path), "PDSERVE_PLATFORM": plan.platform,
                     "PDSERVE_LOG_PREFIX": "", "PYTHONUNBUFFERED": "1"})
    base_env.pop("PDSERVE_CPU_BIND", None)
    if plan.platform == "cpu":
        base_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    out: list[tuple[str, list[str], dict[str, str]]] = []
    for inst in plan.instances:
        argv = [python, "-m", "pdserve", "serve", *common, "--host", plan.host, "--port", str(inst.port),
                "--kv-port", str(inst.side_port), "--drain-seconds", str(s.drain_seconds)]
        if s.kv_connector:
            argv += ["--kv-connector", s.kv_connector]
        if plan.tp > 1:
            argv += ["--tensor-parallel-size", str(plan.tp)]
        argv += list(s.vllm_args)
        env = dict(base_env, RANK_TABLE_FILE_PATH=str(locals_[inst.name]))
        if inst.cpu_bind:
            env["PDSERVE_CPU_BIND"] = inst.cpu_bind
        out.append((inst.name, argv, env))
    sched_argv = [python, "-m", "pdserve", "serve", *common, "--host", plan.host, "--port", str(plan.scheduler_port),
                  "--drain-seconds", str(s.drain_seconds), *s.scheduler_args]
    sched_env = dict(base_env, RANK_TABLE_FILE_PATH=str(host_path), NODE_PORTS=plan.node_ports)
    sched_env.setdefault("USE_OPENAI", "1")
    # one host, instances side by side: when prefill falls behind, let decode compute prompts
    sched_env.setdefault("PDSERVE_DECODE_ONLY_WHEN_QUEUED", str(UP_DECODE_ONLY_WHEN_QUEUED))
    out.append((SCHEDULER, sched_argv, sched_env))
    return out


def write_commands(path: Path, commands: list[tuple[str, list[str], dict[str, str]]],
                   base: Mapping[str, str]) -> None:
    """The daemons' command lines next to the ranktables, so a failure can be re-run by hand."""
    lines = ["#!/bin/sh", "# the daemons of this `pdserve up` (environment: what up adds to its own)"]
    lines += [f"# {name}\n{shell_line(argv, env, base)}" for name, argv, env in commands]
    with contextlib.suppress(OSError):  # a convenience: never the reason up fails
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def curl_line(plan: ClusterPlan, model: str, question: str = "What is the capital of France?") -> str:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 64}
    return (f"curl http://{plan.host}:{plan.scheduler_port}/v1/chat/completions "
            f"-H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))}")


def ask(plan: ClusterPlan, model: str, question: str, max_tokens: int = 64, timeout: float = 300.0) -> str:
    """One greedy chat completion through the scheduler; returns the answer text."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}],
                       "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://{plan.host}:{plan.scheduler_port}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback only
            data = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise UpError(f"the question failed: HTTP {exc.code}: {exc.read()[:500].decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise UpError(f"the question failed: {exc}") from None
    return str(data["choices"][0]["message"]["content"])


class Cluster:
    """The running daemons of one ``pdserve up``."""

    def __init__(self, plan: ClusterPlan, settings: UpSettings, out: IO[str] | None = None) -> None:
        self.plan = plan
        self.s = settings
        self.out = out or sys.stdout
        self.procs: list[ManagedProcess] = []
        self.stop_event = threading.Event()

    def say(self, text: str) -> None:
        try:
            print(f"[up] {text}", file=self.out, flush=True)
        except BrokenPipeError:  # `pdserve up | head` left: go on quietly, and above all still stop cleanly
            self.out = open(os.devnull, "w")  # noqa: SIM115 - lives as long as up

    def start(self) -> None:
        ensure_dir(self.s.run_dir, "--run-dir")
        check_ports_free(self.plan)
        global_path, locals_, host_path = write_ranktables(self.plan, self.s.run_dir)
        self.say(f"ranktables in {self.s.run_dir}")
        for inst in self.plan.instances:
            bind = f" (cores {inst.cpu_bind})" if inst.cpu_bind else ""
            self.say(f"{inst.name}: {self.plan.platform} device(s) {','.join(map(str, inst.devices))}{bind}, "
                     f"http://{self.plan.host}:{inst.port}, KV side channel :{inst.side_port}")
        commands = daemon_commands(self.plan, self.s, global_path, locals_, host_path)
        write_commands(self.s.run_dir / COMMANDS_FILE, commands, self.s.env)
        for name, argv, env in commands:
            sink = open(os.devnull, "w") if self.s.quiet else self.out  # noqa: SIM115 - lives as long as up
            self.procs.append(ManagedProcess(name, argv, env, out=sink, ring=60).start())

    def _urls(self) -> dict[str, str]:
        h = self.plan.host
        urls = {i.name: f"http://{h}:{i.port}/health" for i in self.plan.instances}
        urls[SCHEDULER] = f"http://{h}:{self.plan.scheduler_port}/health"
        return urls

    def dead(self) -> ManagedProcess | None:
        return next((p for p in self.procs if p.poll() is not None), None)

    def failure(self, proc: ManagedProcess) -> UpError:
        proc.join_tee(2.0)
        tail = "\n".join(f"  | {line}" for line in proc.tail(40))
        return UpError(f"{proc.name} exited with code {proc.poll()}; last log lines:\n{tail}\n"
                       f"  (ranktables and commands: {self.s.run_dir}, see {COMMANDS_FILE})")

    def wait_ready(self, progress_every: float = 10.0,
                   get_ok: Callable[[str], bool] = http_get_ok) -> float:
        """Block until every daemon answers /health 200; returns seconds waited."""
        t0 = time.monotonic()
        urls = self._urls()
        ready: set[str] = set()
        last = t0
        while len(ready) < len(urls):
            if self.stop_event.is_set():
                raise KeyboardInterrupt
            if (proc := self.dead()) is not None:
                raise self.failure(proc)
            for name, url in urls.items():
                if name not in ready and get_ok(url):
                    ready.add(name)
                    self.say(f"{name} ready ({time.monotonic() - t0:.0f}s)")
            elapsed = time.monotonic() - t0
            if elapsed > self.s.timeout:
                waiting = ", ".join(n for n in urls if n not in ready)
                raise UpError(f"not ready after {self.s.timeout:g}s (--timeout): still waiting for {waiting}; "
                              f"see the logs above (ranktables: {self.s.run_dir})")
            if time.monotonic() - last >= progress_every and len(ready) < len(urls):
                last = time.monotonic()
                state = ", ".join(f"{n} {'ready' if n in ready else 'starting'}" for n in urls)
                self.say(f"waiting {elapsed:.0f}s of {self.s.timeout:g}s: {state}")
            for p in self.procs:
                p.remember_descendants()
            self.stop_event.wait(1.0)
        return time.monotonic() - t0

    def serve_forever(self) -> None:
        """Until Ctrl-C/SIGTERM (returns) or a daemon dies (raises)."""
        n = 0
        while not self.stop_event.wait(1.0):
            if (proc := self.dead()) is not None:
                raise self.failure(proc)
            n += 1
            if n % 10 == 0:
                for p in self.procs:
                    p.remember_descendants()

    def stop(self) -> None:
        """The scheduler first, then the instances in parallel; each daemon drains, bounded.

        The scheduler's in-flight requests still need the instances, so they stop only after it.
        Each daemon gets exactly one SIGTERM: a second one tells the scheduler to stop without
        waiting for its in-flight requests."""
        if not self.procs:
            return
        self.say("stopping ...")
        for p in self.procs:
            p.remember_descendants()
        deadline = self.s.drain_seconds + 15.0  # the daemons drain, then SIGKILL their servers
        first = [p for p in self.procs if p.name == SCHEDULER]
        for group in (first, [p for p in self.procs if p not in first]):
            threads = [threading.Thread(target=p.stop, args=(deadline,), daemon=True) for p in group]
            for t in threads:
                t.start()
            for t in threads:
                t.join(deadline + 30.0)
        self.say("stopped")
        self.procs.clear()
