"""``pdserve serve [vLLM flags...]``: the role daemon behind ``scripts/start_servers.sh``.

One command line for every host, as with AscendCloud's ``PD_separate``: the ranktables in
``GLOBAL_RANK_TABLE_FILE_PATH`` / ``RANK_TABLE_FILE_PATH`` say whether this process is the
scheduler (run in-process) or a prefill/decode instance (vLLM's OpenAI server as a supervised
child with the KV connector, the identity middleware and its devices). Flags the daemon does not
own are vLLM's and pass through unchanged.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Mapping

from pdserve import ranktable
from pdserve.env import env_bool
from pdserve.errors import ConfigError
from pdserve.model.local import check_local_model
from pdserve.platform import detect_platform
from pdserve.worker import command as cmd
from pdserve.worker.shutdown_noise import SHOW_ENV as SHOW_SHUTDOWN_NOISE_ENV

log = logging.getLogger("pdserve.worker")

ENV_DRAIN = "PDSERVE_DRAIN_SECONDS"
ENV_LOG_PREFIX = "PDSERVE_LOG_PREFIX"


DEFAULT_DRAIN_SECONDS = 30.0


ENV_LOAD_FAILURE_POLICY = "PDSERVE_KV_LOAD_FAILURE_POLICY"
LOAD_FAILURE_POLICIES = ("fail", "recompute")


def drain_seconds(flag: float | None, environ: Mapping[str, str]) -> float:
    """--drain-seconds, else PDSERVE_DRAIN_SECONDS, else 30; a bad value is a ConfigError (it used
    to fall back to 30 without a word, or to hand a negative or nan deadline to the supervisor)."""
    if flag is not None:
        value, source, name, fix = flag, "flags", "--drain-seconds", "--drain-seconds 30"
    else:
        raw = environ.get(ENV_DRAIN, "").strip()
        if not raw:
            return DEFAULT_DRAIN_SECONDS
        source, name, fix = "environment", ENV_DRAIN, f"export {ENV_DRAIN}=30"
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(source, name, f"{raw!r} is not a number", f"{fix} (seconds)") from None
    if not math.isfinite(value):
        raise ConfigError(source, name, f"{value} is not a finite number", f"{fix} (seconds, 0 or more)")
    if value < 0:
        raise ConfigError(source, name, f"{value:g} is negative", f"{fix} (seconds, 0 or more)")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "serve",
        allow_abbrev=False,  # a vLLM flag must never be taken for an abbreviation of ours
        help="role daemon: run this host's role (scheduler, prefill or decode) from the ranktables",
        description="Read GLOBAL_RANK_TABLE_FILE_PATH and RANK_TABLE_FILE_PATH, decide the role and run it: the "
                    "scheduler (NODE_PORTS, USE_OPENAI) or a vLLM OpenAI server for the prefill/decode "
                    "instance, with pdserve's KV connector, the identity middleware and the instance's devices. "
                    "All other flags are vLLM's (--model, --port, --max-model-len, ...) and pass through.",
        epilog="example: GLOBAL_RANK_TABLE_FILE_PATH=global_ranktable_merge.json "
               "RANK_TABLE_FILE_PATH=local_ranktable_10.0.0.18_45.json pdserve serve --model /models/qwen "
               "--port 8001 --max-model-len 4096")
    g = p.add_argument_group("KV transfer (prefill/decode instances)")
    g.add_argument("--kv-connector", default=os.environ.get(cmd.ENV_KV_CONNECTOR, cmd.DEFAULT_CONNECTOR),
                   metavar="NAME",
                   help=f"vLLM KV connector (default {cmd.DEFAULT_CONNECTOR}, env {cmd.ENV_KV_CONNECTOR}); another "
                        "vLLM connector such as NixlConnector to front stock setups; 'none' starts the instance "
                        "without a connector (debugging: decode recomputes the prompt)")
    g.add_argument("--kv-connector-module-path", default=None, metavar="MODULE",
                   help="module of a third-party connector class (pdserve's own is found automatically)")
    g.add_argument("--kv-port", type=int, default=None, metavar="PORT",
                   help=f"KV side-channel base port; TP rank r uses PORT+r (default env {cmd.ENV_KV_PORT}, else "
                        f"--port + {cmd.SIDE_PORT_OFFSET} + (TP - 1) x the instance's place in the global "
                        "ranktable, so TP instances on consecutive ports do not overlap)")
    g.add_argument("--kv-transport", choices=cmd.TRANSPORTS, default=None,
                   help=f"pdserve connector transport (default env {cmd.ENV_KV_TRANSPORT}, else auto: shm on one "
                        "host, tcp across hosts)")
    g.add_argument("--kv-lease-seconds", type=float, default=30.0, metavar="S",
                   help="prefill-side KV blocks not fetched within S seconds are freed (default 30)")
    g.add_argument("--kv-load-failure-policy", choices=LOAD_FAILURE_POLICIES,
                   default=os.environ.get(ENV_LOAD_FAILURE_POLICY, "fail"),
                   help="decode side: a KV pull that fails or times out fails the request (default) or "
                        "recomputes the prompt locally (env PDSERVE_KV_LOAD_FAILURE_POLICY)")
    g = p.add_argument_group("daemon")
    g.add_argument("--drain-seconds", type=float, default=None, metavar="S",
                   help=f"on SIGTERM/SIGINT, give the server S seconds to finish before SIGKILL "
                        f"(default 30, env {ENV_DRAIN})")
    g.add_argument("--dry-run", action="store_true",
                   help="print the role, the command line and the environment it would set, then exit")
    p.set_defaults(func=run, accepts_extra=True)


def run(args: argparse.Namespace) -> int:
    extra = list(getattr(args, "extra", []) or [])
    drain = drain_seconds(args.drain_seconds, os.environ)
    env_bool(os.environ, SHOW_SHUTDOWN_NOISE_ENV, False)  # a bad value is an error now, not at the stop
    if args.kv_load_failure_policy not in LOAD_FAILURE_POLICIES:  # argparse checks a flag, not its env default
        raise ConfigError("environment", ENV_LOAD_FAILURE_POLICY, f"{args.kv_load_failure_policy!r} is not a policy",
                          f"export {ENV_LOAD_FAILURE_POLICY}=fail or {ENV_LOAD_FAILURE_POLICY}=recompute")
    role = ranktable.resolve_role_from_env(os.environ)
    if role.kind == "scheduler":
        if "--drain-seconds" not in extra:  # the daemon's flag is the scheduler's drain too
            extra = [*extra, "--drain-seconds", str(drain)]
        return _run_scheduler(extra, args.dry_run)
    global_path = os.environ[ranktable.roles.ENV_GLOBAL]
    rt = ranktable.load_global(global_path)
    ctx = cmd.InstanceContext(role=role, ranktable=rt, digest=ranktable.digest(rt),
                              local_source=cmd.local_source(os.environ), platform=detect_platform())
    opts = cmd.ServeOptions(vllm_args=extra, kv_connector=args.kv_connector,
                            kv_connector_module_path=args.kv_connector_module_path, kv_port=args.kv_port,
                            kv_transport=args.kv_transport, kv_lease_seconds=args.kv_lease_seconds,
                            kv_load_failure_policy=args.kv_load_failure_policy)
    argv, env = cmd.build_instance_command(ctx, opts, os.environ)
    model = cmd.flag_value(extra, "--model")
    if model and model.startswith(("/", ".", "~")):  # a path: it must be a model folder (a hub id
        check_local_model(model)                     # is left to vLLM and its local HF cache)
    inst = role.instance
    assert inst is not None
    name = f"{inst.role}{inst.index}"
    print(f"pdserve serve: {role.describe()} (platform {ctx.platform}, ranktable digest {ctx.digest})",
          file=sys.stderr, flush=True)
    wrong_host = cmd.host_error(argv, ctx.local_source)
    if args.dry_run:
        if wrong_host is not None:  # a preview may be made on another machine: say so, go on
            print(f"pdserve serve: warning: on this host the server would not start: {wrong_host}",
                  file=sys.stderr)
        print(cmd.shell_line(argv, env, os.environ))
        return 0
    if wrong_host is not None:
        raise wrong_host
    from pdserve.worker.daemon import supervise

    prefix = os.environ.get(ENV_LOG_PREFIX)
    return supervise(name, argv, env, drain, prefix=f"[{name}] " if prefix is None else prefix,
                     health_url=_health_url(argv))


def _health_url(argv: list[str]) -> str | None:
    """The server's own /health, from the --host/--port the command line gives it."""
    port = cmd.flag_value(argv, "--port")
    if not port:
        return None
    host = cmd.flag_value(argv, "--host") or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/health"


def _run_scheduler(extra: list[str], dry_run: bool) -> int:
    """The scheduler runs in this process: it reads NODE_PORTS/USE_OPENAI itself."""
    from pdserve.scheduler import config_from_argv, run_scheduler

    cfg = config_from_argv(extra, os.environ)
    print(f"pdserve serve: scheduler on {cfg.host}:{cfg.port} for {len(cfg.instances)} instances "
          f"({'OpenAI API' if cfg.use_openai else '/generate'})", file=sys.stderr, flush=True)
    if dry_run:
        from pdserve.scheduler.listen import check_listen_address

        check_listen_address(cfg)  # a port clash fails here as it would at the real start
        for spec in cfg.instances:
            print(f"pdserve serve: {spec.name} -> {spec.url}", file=sys.stderr)
        # the same scheduler as a plain command (it reads NODE_PORTS and the ranktables from the environment)
        print(cmd.shell_line([sys.executable, "-m", "pdserve", "scheduler", *extra], os.environ, os.environ))
        return 0
    return run_scheduler(cfg)
