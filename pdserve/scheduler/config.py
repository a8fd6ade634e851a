"""Scheduler settings from environment variables and flags.

The scheduler is started with the same command line and environment as the closed
AscendCloud-LLM tooling (``GLOBAL_RANK_TABLE_FILE_PATH``, ``RANK_TABLE_FILE_PATH``,
``NODE_PORTS``, ``USE_OPENAI`` and vLLM's ``--host/--port/--served-model-name``), so vLLM flags it
does not use are accepted and ignored (logged at debug level): one command line serves all roles.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pdserve.errors import ConfigError

log = logging.getLogger("pdserve.scheduler")

ENV_GLOBAL = "GLOBAL_RANK_TABLE_FILE_PATH"
ENV_LOCAL = "RANK_TABLE_FILE_PATH"
ENV_NODE_PORTS = "NODE_PORTS"
ENV_USE_OPENAI = "USE_OPENAI"

POLICIES = ("prefix-affinity", "least-load", "round-robin", "power-of-two")


@dataclass(frozen=True)
class InstanceSpec:
    """Where one prefill/decode instance listens and who it must say it is."""

    role: str  # "prefill" | "decode"
    index: int  # inside its role group
    global_index: int  # NODE_PORTS order
    host: str
    port: int
    device_ids: tuple[int, ...] = ()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def name(self) -> str:
        return f"{self.role}[{self.index}]@{self.host}:{self.port}"


@dataclass
class SchedulerConfig:
    instances: list[InstanceSpec]
    host: str = "0.0.0.0"
    port: int = 8000
    served_model_names: list[str] = field(default_factory=list)
    use_openai: bool = True
    ranktable_digest: str | None = None  # expected in every identity answer (None: not checked)
    identity_check: bool = True
    prefill_policy: str = "prefix-affinity"
    decode_policy: str = "least-load"
    prefix_chars: int = 2048  # prefix-affinity hashes this many leading characters
    affinity_load_factor: float = 1.5  # bounded-load consistent hashing factor
    max_inflight: int = 0  # global bound on requests in flight (0: unbounded)
    max_inflight_per_instance: int = 0  # 0: unbounded
    max_queue: int = 1024  # requests allowed to wait for a slot; beyond: 429
    queue_timeout: float = 30.0  # seconds a request may wait for a slot; then 429
    max_body_bytes: int = 32 * 1024 * 1024
    max_model_len: int | None = None
    chars_per_token_bound: float = 16.0  # max chars one token covers, for the prompt-length estimate
    connect_timeout: float = 5.0
    prefill_timeout: float = 600.0
    first_token_timeout: float = 600.0
    idle_timeout: float = 120.0  # longest gap between two stream chunks
    decode_timeout: float = 3600.0  # whole non-streaming decode answer
    health_interval: float = 5.0
    health_timeout: float = 3.0
    startup_timeout: float = 1800.0
    startup_poll_interval: float = 2.0
    retries: int = 1  # extra attempts on another instance (prefill and decode)
    per_host_connections: int = 0  # aiohttp connector limit per instance (0: unlimited)
    access_log: bool = True

    @property
    def prefill(self) -> list[InstanceSpec]:
        return [i for i in self.instances if i.role == "prefill"]

    @property
    def decode(self) -> list[InstanceSpec]:
        return [i for i in self.instances if i.role == "decode"]


def _env_bool(value: str | None, default: bool, name: str) -> bool:
    if value is None or value.strip() == "":
        return default
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfigError("environment", name, f"{value!r} is not a boolean", f"export {name}=1 or {name}=0")


def _env_float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError("environment", name, f"{raw!r} is not a number", f"export {name}=<seconds>") from None


def build_parser(parser: argparse.ArgumentParser | None = None,
                 environ: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    """Add the scheduler's flags; defaults can come from PDSERVE_* environment variables."""
    p = parser or argparse.ArgumentParser(prog="pdserve scheduler", allow_abbrev=False)
    d = SchedulerConfig(instances=[])
    ev = environ.get
    g = p.add_argument_group("scheduler (vLLM-compatible)")
    g.add_argument("--host", default=ev("PDSERVE_SCHEDULER_HOST", d.host), help="listen address (default 0.0.0.0)")
    g.add_argument("--port", type=int, default=int(ev("PDSERVE_SCHEDULER_PORT", d.port)), help="listen port (default 8000)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use; default: what the instances report, else --model")
    g.add_argument("--model", default=None, help="vLLM's --model; its name is the served name if none is given")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length; prompts that cannot fit get 400 here (default: asked from the instances)")
    g = p.add_argument_group("instances")
    g.add_argument("--prefill-url", action="append", default=[], metavar="HOST:PORT",
                   help="a prefill instance, instead of the ranktable + NODE_PORTS (repeatable)")
    g.add_argument("--decode-url", action="append", default=[], metavar="HOST:PORT",
                   help="a decode instance, instead of the ranktable + NODE_PORTS (repeatable)")
    g.add_argument("--no-identity-check", action="store_true",
                   default=_env_bool(ev("PDSERVE_NO_IDENTITY_CHECK"), False, "PDSERVE_NO_IDENTITY_CHECK"),
                   help="do not check GET /pdserve/v1/identity (instances that are stock vLLM servers)")
    g = p.add_argument_group("routing")
    g.add_argument("--prefill-policy", choices=POLICIES, default=ev("PDSERVE_PREFILL_POLICY", d.prefill_policy))
    g.add_argument("--decode-policy", choices=POLICIES, default=ev("PDSERVE_DECODE_POLICY", d.decode_policy))
    g.add_argument("--prefix-chars", type=int, default=d.prefix_chars,
                   help="prefix-affinity hashes this many leading prompt characters (default 2048)")
    g.add_argument("--affinity-load-factor", type=float, default=d.affinity_load_factor,
                   help="prefix-affinity leaves its instance when it has more than this factor of the mean load")
    g = p.add_argument_group("overload and limits")
    g.add_argument("--max-inflight", type=int, default=int(ev("PDSERVE_MAX_INFLIGHT", d.max_inflight)),
                   help="requests in flight at once (0: unbounded)")
    g.add_argument("--max-inflight-per-instance", type=int, default=d.max_inflight_per_instance,
                   help="requests in flight per instance (0: unbounded)")
    g.add_argument("--max-queue", type=int, default=d.max_queue, help="requests waiting for a slot; beyond: 429")
    g.add_argument("--queue-timeout", type=float, default=d.queue_timeout, help="seconds a request waits; then 429")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="larger request bodies get 413")
    g.add_argument("--chars-per-token-bound", type=float, default=d.chars_per_token_bound,
                   help="upper bound of characters per token for the prompt-length estimate")
    g = p.add_argument_group("timeouts (seconds)")
    g.add_argument("--connect-timeout", type=float, default=d.connect_timeout)
    g.add_argument("--prefill-timeout", type=float, default=d.prefill_timeout)
    g.add_argument("--first-token-timeout", type=float, default=d.first_token_timeout)
    g.add_argument("--idle-timeout", type=float, default=d.idle_timeout, help="longest gap between stream chunks")
    g.add_argument("--decode-timeout", type=float, default=d.decode_timeout, help="whole non-streaming decode")
    g.add_argument("--health-interval", type=float, default=d.health_interval)
    g.add_argument("--health-timeout", type=float, default=d.health_timeout)
    g.add_argument("--startup-timeout", type=float,
                   default=_env_float(environ, "PDSERVE_STARTUP_TIMEOUT", d.startup_timeout),
                   help="how long to wait for the instances to become healthy at start-up")
    g.add_argument("--retries", type=int, default=d.retries, help="extra attempts on another instance (default 1)")
    g.add_argument("--no-access-log", action="store_true", help="no structured access-log line per request")
    return p


def _parse_url(text: str, flag: str) -> tuple[str, int]:
    t = text.strip()
    for prefix in ("http://", "https://"):
        if t.startswith(prefix):
            t = t[len(prefix):]
    t = t.rstrip("/")
    host, sep, port = t.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(flag, None, f"{text!r} is not HOST:PORT", f"{flag} 127.0.0.1:8001")
    return host.strip("[]") or "127.0.0.1", int(port)


def instances_from_ranktable(environ: Mapping[str, str]) -> tuple[list[InstanceSpec], str]:
    """Instance i of the global ranktable (prefill first, then decode) at server_ip:NODE_PORTS[i]."""
    from pdserve import ranktable  # imported here: the scheduler runs without it when URLs are given

    path = environ.get(ENV_GLOBAL, "").strip()
    if not path:
        raise ConfigError("environment", ENV_GLOBAL, "not set",
                          f"export {ENV_GLOBAL}=/path/to/global_ranktable_merge.json "
                          "(or give --prefill-url/--decode-url)")
    rt = ranktable.load_global(path)
    text = environ.get(ENV_NODE_PORTS, "")
    if not text.strip():
        refs = ranktable.instances(rt)
        raise ConfigError("environment", ENV_NODE_PORTS, "not set",
                          f"export {ENV_NODE_PORTS}=<port of each instance, prefill first then decode: "
                          f"{', '.join(r.name for r in refs)}>")
    ports = ranktable.parse_node_ports(text, rt)
    specs = [InstanceSpec(r.role, r.index, r.global_index, r.server_ip, port, tuple(r.device_ids))
             for r, port in zip(ranktable.instances(rt), ports, strict=True)]
    local = environ.get(ENV_LOCAL, "").strip()
    if local:
        role = ranktable.resolve_role_from_env(environ)
        if role.kind != "scheduler":
            raise ConfigError("environment", ENV_LOCAL,
                              f"{local} describes {role.describe()}, not the scheduler",
                              "point RANK_TABLE_FILE_PATH at local_ranktable_<ip>_host.json")
    return specs, ranktable.digest(rt)


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ,
                     extra: Sequence[str] = ()) -> SchedulerConfig:
    """Build the config from parsed flags and the environment (NODE_PORTS, ranktables, USE_OPENAI)."""
    for arg in extra:
        log.debug("ignoring flag the scheduler does not use: %s", arg)
    digest: str | None = None
    if args.prefill_url or args.decode_url:
        if not (args.prefill_url and args.decode_url):
            raise ConfigError("flags", "--prefill-url/--decode-url", "only one role given",
                              "give at least one --prefill-url and one --decode-url")
        specs: list[InstanceSpec] = []
        for role, urls, flag in (("prefill", args.prefill_url, "--prefill-url"),
                                 ("decode", args.decode_url, "--decode-url")):
            for i, u in enumerate(urls):
                host, port = _parse_url(u, flag)
                specs.append(InstanceSpec(role, i, len(specs), host, port))
    else:
        specs, digest = instances_from_ranktable(environ)
    names = list(args.served_model_name or [])
    if not names and args.model:
        names = [args.model]
    cfg = SchedulerConfig(
        instances=specs,
        host=args.host,
        port=args.port,
        served_model_names=names,
        use_openai=_env_bool(environ.get(ENV_USE_OPENAI), True, ENV_USE_OPENAI),
        ranktable_digest=digest,
        identity_check=not args.no_identity_check,
        prefill_policy=args.prefill_policy,
        decode_policy=args.decode_policy,
        prefix_chars=args.prefix_chars,
        affinity_load_factor=args.affinity_load_factor,
        max_inflight=args.max_inflight,
        max_inflight_per_instance=args.max_inflight_per_instance,
        max_queue=args.max_queue,
        queue_timeout=args.queue_timeout,
        max_body_bytes=args.max_body_bytes,
        max_model_len=args.max_model_len,
        chars_per_token_bound=args.chars_per_token_bound,
        connect_timeout=args.connect_timeout,
        prefill_timeout=args.prefill_timeout,
        first_token_timeout=args.first_token_timeout,
        idle_timeout=args.idle_timeout,
        decode_timeout=args.decode_timeout,
        health_interval=args.health_interval,
        health_timeout=args.health_timeout,
        startup_timeout=args.startup_timeout,
        retries=args.retries,
        access_log=not args.no_access_log,
    )
    check(cfg)
    return cfg


def config_from_argv(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> SchedulerConfig:
    """For ``pdserve serve``: the role daemon's whole command line (vLLM flags included)."""
    args, extra = build_parser(environ=environ).parse_known_args(list(argv))
    return config_from_args(args, environ, extra)


def check(cfg: SchedulerConfig) -> None:
    if not cfg.prefill or not cfg.decode:
        raise ConfigError("ranktable", None, "the scheduler needs at least one prefill and one decode instance",
                          "add instances to server_group_list groups 1 and 2")
    for flag, value in (("--max-inflight", cfg.max_inflight), ("--max-queue", cfg.max_queue),
                        ("--max-inflight-per-instance", cfg.max_inflight_per_instance),
                        ("--retries", cfg.retries)):
        if value < 0:
            raise ConfigError("flags", flag, f"{value} is negative", f"{flag} 0 (or a positive number)")
    if cfg.max_body_bytes < 1024:
        raise ConfigError("flags", "--max-body-bytes", f"{cfg.max_body_bytes} is too small", "use at least 1024")
    seen: dict[tuple[str, int], InstanceSpec] = {}
    for spec in cfg.instances:
        key = (spec.host, spec.port)
        if key in seen:
            raise ConfigError(ENV_NODE_PORTS, None,
                              f"{spec.name} and {seen[key].name} use the same address {spec.host}:{spec.port}",
                              "give every instance its own port")
        seen[key] = spec
