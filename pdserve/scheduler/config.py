"""Scheduler settings: flags > environment variables > deployment file > built-in defaults.

The scheduler is started with the same command line and environment as the closed
AscendCloud-LLM tooling (``GLOBAL_RANK_TABLE_FILE_PATH``, ``RANK_TABLE_FILE_PATH``,
``NODE_PORTS``, ``USE_OPENAI`` and vLLM's ``--host/--port/--served-model-name``), so vLLM flags it
does not use are accepted and ignored (logged at debug level): one command line serves all roles.

Every flag is declared once in :data:`OPTIONS`; the argparse flags, the ``PDSERVE_*`` environment
variables and the keys of the YAML deployment file (``--config deploy.yaml``, see
:mod:`pdserve.scheduler.deploy_config`) are all derived from that table, so they cannot drift
apart. The parser records only what was given (every default is ``None``); :func:`resolve` then
layers the sources, which is how "flags override the file" is known without guessing.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pdserve.errors import ConfigError, ShortErrorParser
from pdserve.env import parse_bool
from pdserve.scheduler.adapters import Adapter
from pdserve.scheduler.capture import CaptureSettings

log = logging.getLogger("pdserve.scheduler")

ENV_GLOBAL = "GLOBAL_RANK_TABLE_FILE_PATH"
ENV_LOCAL = "RANK_TABLE_FILE_PATH"
ENV_NODE_PORTS = "NODE_PORTS"
ENV_USE_OPENAI = "USE_OPENAI"
ENV_CONFIG = "PDSERVE_CONFIG"
ENV_API_KEYS = "PDSERVE_API_KEYS"
ENV_API_KEY_FILE = "PDSERVE_API_KEY_FILE"

POLICIES = ("prefix-affinity", "least-load", "round-robin", "power-of-two")
SYSTEM_PROMPT_MODES = ("if-missing", "prepend", "replace")
# sampling defaults with their own flag (--default-<name>); any other one via --default KEY=JSON
DEFAULT_FLAGS: dict[str, type] = {
    "temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float,
    "presence_penalty": float, "frequency_penalty": float, "max_tokens": int, "seed": int,
}


@dataclass(frozen=True)
class InstanceSpec:
    """Where one prefill/decode instance listens and who it must say it is."""

    role: str  # "prefill" | "decode"
    index: int  # inside its role group
    global_index: int  # NODE_PORTS order
    host: str
    port: int
    device_ids: tuple[int, ...] = ()

    @cached_property  # read on every request: computed once (works on a frozen dataclass)
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @cached_property
    def name(self) -> str:
        return f"{self.role}[{self.index}]@{self.host}:{self.port}"


@dataclass
class SchedulerConfig:
    instances: list[InstanceSpec]
    host: str = "0.0.0.0"
    port: int = 8000
    served_model_names: list[str] = field(default_factory=list)  # what clients may call the model
    upstream_model: str | None = None  # the instances' own served name (learned at start-up)
    model_root: str | None = None  # the model path the instances loaded (their /v1/models "root")
    model_owned_by: str | None = None  # their /v1/models "owned_by" ("vllm")
    lora_adapters: list[Adapter] = field(default_factory=list)  # on every instance at start-up
    chat_default_is_context: bool = False  # every instance's chat default max_tokens is the rest of the context
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
    retries: int = 1  # extra attempts (prefill and decode): another instance, else the same healthy one
    per_host_connections: int = 0  # aiohttp connector limit per instance (0: unlimited)
    access_log: bool = True
    # access control and shutdown
    api_keys: list[str] = field(default_factory=list, repr=False)  # never printed
    protect_metrics: bool = False
    runtime_lora_updating: bool = False  # serve /v1/load_lora_adapter and /v1/unload_lora_adapter
    instance_updates: bool = False  # serve POST/DELETE /pdserve/v1/instances (add/remove instances)
    instance_api_key: str | None = field(default=None, repr=False)
    drain_seconds: float = 30.0
    # serving features
    defaults: dict[str, Any] = field(default_factory=dict)  # sampling parameters applied when missing
    system_prompt: str | None = None
    system_prompt_mode: str = "if-missing"
    capture: CaptureSettings | None = None
    decode_only_below: int = 0  # prompts estimated below this many tokens skip the prefill instance
    decode_only_uncached_below: int = 0  # ... or whose part not cached on a decode instance is below it
    decode_only_when_queued: int = 0  # ... or when every prefill instance has this many prompt tokens queued
    decode_affinity: bool = True  # prefer the decode instance that holds the conversation's history
    prefill_first_token: bool = True  # stream the prefill's token at once; decode continues after it
    decode_only_fallback: bool = True  # no prefill instance answers: a decode instance computes the prompt
    affinity_chunk_chars: int = 256  # granularity of the decode-side prefix tracker
    config_file: str | None = None

    @property
    def prefill(self) -> list[InstanceSpec]:
        return [i for i in self.instances if i.role == "prefill"]

    @property
    def decode(self) -> list[InstanceSpec]:
        return [i for i in self.instances if i.role == "decode"]


# -- the option table ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Opt:
    """One scheduler setting: its flag(s), type, environment variable and deployment-file key (= dest)."""

    dest: str
    flags: tuple[str, ...]
    kind: str  # "str" | "int" | "float" | "bool" (a store_true flag) | "list" (repeatable / nargs=+)
    group: str
    help: str = ""
    env: str | None = None
    choices: tuple[str, ...] | None = None
    nargs: str | None = None  # "+" for --served-model-name
    metavar: str | None = None
    in_file: bool = True  # may appear in the deployment file


_D = SchedulerConfig(instances=[])
OPTIONS: tuple[Opt, ...] = (
    Opt("config", ("--config", "--deploy-config"), "str", "scheduler (vLLM-compatible)", env=ENV_CONFIG,
        metavar="DEPLOY.yaml", in_file=False,
        help="deployment file (YAML) whose keys mirror these flags; flags and PDSERVE_* variables override it"),
    Opt("host", ("--host",), "str", "scheduler (vLLM-compatible)", env="PDSERVE_SCHEDULER_HOST",
        help=f"listen address (default {_D.host})"),
    Opt("port", ("--port",), "int", "scheduler (vLLM-compatible)", env="PDSERVE_SCHEDULER_PORT",
        help=f"listen port (default {_D.port})"),
    Opt("served_model_name", ("--served-model-name",), "list", "scheduler (vLLM-compatible)", nargs="+",
        help="name(s) clients use for the model (aliases; /v1/models lists all); requests are forwarded "
             "with the instances' own name. Default: what the instances report, else --model"),
    Opt("model", ("--model",), "str", "scheduler (vLLM-compatible)",
        help="vLLM's --model; its name is the served name if none is given"),
    Opt("max_model_len", ("--max-model-len",), "int", "scheduler (vLLM-compatible)",
        help="context length; prompts that cannot fit get 400 here (default: asked from the instances)"),
    Opt("prefill_url", ("--prefill-url",), "list", "instances", metavar="HOST:PORT",
        help="a prefill instance, instead of the ranktable + NODE_PORTS (repeatable)"),
    Opt("decode_url", ("--decode-url",), "list", "instances", metavar="HOST:PORT",
        help="a decode instance, instead of the ranktable + NODE_PORTS (repeatable)"),
    Opt("no_identity_check", ("--no-identity-check",), "bool", "instances", env="PDSERVE_NO_IDENTITY_CHECK",
        help="do not check GET /pdserve/v1/identity (instances that are stock vLLM servers)"),
    Opt("instance_api_key", ("--instance-api-key",), "str", "access control", env="PDSERVE_INSTANCE_API_KEY",
        metavar="KEY", help="sent to the instances as 'Authorization: Bearer KEY' (their vLLM --api-key); "
                            "the client's own Authorization header is never forwarded"),
    Opt("api_key", ("--api-key",), "list", "access control", metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' (or 'x-api-key: KEY') on every path but /health (and "
             f"/metrics, unless --protect-metrics) "
             f"(repeatable; also {ENV_API_KEYS}=k1,k2 and {ENV_API_KEY_FILE}=FILE, one key a line)"),
    Opt("api_key_file", ("--api-key-file",), "str", "access control", env=ENV_API_KEY_FILE, metavar="FILE",
        help="file with one API key per line (blank lines and # comments ignored)"),
    Opt("protect_metrics", ("--protect-metrics",), "bool", "access control", env="PDSERVE_PROTECT_METRICS",
        help="require an API key for /metrics too (/health always stays open)"),
    Opt("runtime_lora_updating", ("--allow-runtime-lora-updating",), "bool", "access control",
        env="VLLM_ALLOW_RUNTIME_LORA_UPDATING",
        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter, sent on to every instance (which "
             "need VLLM_ALLOW_RUNTIME_LORA_UPDATING=True too); off by default, as in vLLM"),
    Opt("instance_updates", ("--allow-instance-updates",), "bool", "access control",
        env="PDSERVE_ALLOW_INSTANCE_UPDATES",
        help="serve POST and DELETE /pdserve/v1/instances: add and remove instances while running (off by "
             "default: whoever may call them decides where prompts go; set API keys too)"),
    Opt("drain_seconds", ("--drain-seconds",), "float", "shutdown", env="PDSERVE_DRAIN_SECONDS",
        help=f"on SIGTERM/SIGINT, refuse new requests (503) and let in-flight ones finish for up to this "
             f"long, then exit 0 (default {_D.drain_seconds:g})"),
    Opt("prefill_policy", ("--prefill-policy",), "str", "routing", env="PDSERVE_PREFILL_POLICY", choices=POLICIES,
        help=f"default {_D.prefill_policy}"),
    Opt("decode_policy", ("--decode-policy",), "str", "routing", env="PDSERVE_DECODE_POLICY", choices=POLICIES,
        help=f"default {_D.decode_policy}"),
    Opt("prefix_chars", ("--prefix-chars",), "int", "routing",
        help=f"prefix-affinity hashes this many leading prompt characters (default {_D.prefix_chars})"),
    Opt("affinity_load_factor", ("--affinity-load-factor",), "float", "routing",
        help="affinity (prefill prefix, decode conversation) leaves its instance when it has more than this "
             f"factor of the mean load (default {_D.affinity_load_factor:g})"),
    Opt("no_decode_affinity", ("--no-decode-affinity",), "bool", "routing",
        help="do not prefer the decode instance that already holds a conversation's earlier turns"),
    Opt("no_prefill_first_token", ("--no-prefill-first-token",), "bool", "routing",
        env="PDSERVE_NO_PREFILL_FIRST_TOKEN",
        help="do not use the prefill instance's token: streams do not get it at once, and every answer "
             "comes from the decode instance, which computes the first token again after the KV hand-over "
             "(vLLM's own proxies do this)"),
    Opt("affinity_chunk_chars", ("--affinity-chunk-chars",), "int", "routing",
        help=f"granularity of the decode-side prefix tracker, in characters (default {_D.affinity_chunk_chars})"),
    Opt("decode_only_below", ("--decode-only-below",), "int", "cache-aware disaggregation", metavar="TOKENS",
        help="prompts of fewer tokens (conservative estimate) are served by a decode instance alone, without "
             "a remote prefill (0: off)"),
    Opt("decode_only_uncached_below", ("--decode-only-uncached-below",), "int", "cache-aware disaggregation",
        metavar="TOKENS", help="serve a request on a decode instance alone when the part of its prompt that "
                               "instance has not cached is below this many tokens (0: off)"),
    Opt("decode_only_when_queued", ("--decode-only-when-queued",), "int", "cache-aware disaggregation",
        env="PDSERVE_DECODE_ONLY_WHEN_QUEUED", metavar="TOKENS", help="load-aware: serve a request on a decode instance alone when every prefill instance "
                               "has at least this many prompt tokens queued or running and the decode instance's "
                               "own pending prompt work plus this prompt is no more (0: off)"),
    Opt("no_decode_only_fallback", ("--no-decode-only-fallback",), "bool", "cache-aware disaggregation",
        env="PDSERVE_NO_DECODE_ONLY_FALLBACK",
        help="when no prefill instance is healthy or the prefill fails after its retries, answer with the "
             "error instead of letting a decode instance compute the prompt itself"),
    Opt("max_inflight", ("--max-inflight",), "int", "overload and limits", env="PDSERVE_MAX_INFLIGHT",
        help="requests in flight at once (0: unbounded)"),
    Opt("max_inflight_per_instance", ("--max-inflight-per-instance",), "int", "overload and limits",
        help="requests in flight per instance (0: unbounded)"),
    Opt("max_queue", ("--max-queue",), "int", "overload and limits",
        help=f"requests waiting for a slot; beyond: 429 (default {_D.max_queue})"),
    Opt("queue_timeout", ("--queue-timeout",), "float", "overload and limits",
        help=f"seconds a request waits; then 429 (default {_D.queue_timeout:g})"),
    Opt("max_body_bytes", ("--max-body-bytes",), "int", "overload and limits",
        help="larger request bodies get 413 (default 32 MiB)"),
    Opt("chars_per_token_bound", ("--chars-per-token-bound",), "float", "overload and limits",
        help="upper bound of characters per token for the prompt-length estimate of text prompts "
             f"(default {_D.chars_per_token_bound:g})"),
    Opt("connect_timeout", ("--connect-timeout",), "float", "timeouts (seconds)",
        help=f"connecting to an instance (default {_D.connect_timeout:g})"),
    Opt("prefill_timeout", ("--prefill-timeout",), "float", "timeouts (seconds)",
        help=f"the whole prefill request (default {_D.prefill_timeout:g})"),
    Opt("first_token_timeout", ("--first-token-timeout",), "float", "timeouts (seconds)",
        help=f"streams: until the decode instance's first chunk (default {_D.first_token_timeout:g})"),
    Opt("idle_timeout", ("--idle-timeout",), "float", "timeouts (seconds)",
        help=f"longest gap between stream chunks, from an instance or to a client that stopped reading "
             f"(default {_D.idle_timeout:g})"),
    Opt("decode_timeout", ("--decode-timeout",), "float", "timeouts (seconds)",
        help=f"a whole non-streaming decode answer (default {_D.decode_timeout:g})"),
    Opt("health_interval", ("--health-interval",), "float", "timeouts (seconds)",
        help=f"between two health checks of each instance (default {_D.health_interval:g})"),
    Opt("health_timeout", ("--health-timeout",), "float", "timeouts (seconds)",
        help=f"one health or identity check (default {_D.health_timeout:g})"),
    Opt("startup_timeout", ("--startup-timeout",), "float", "timeouts (seconds)", env="PDSERVE_STARTUP_TIMEOUT",
        help=f"how long to wait for the instances to become healthy at start-up (default {_D.startup_timeout:g})"),
    Opt("retries", ("--retries",), "int", "other",
        help="extra attempts after a 5xx or dropped connection: on another instance, or on the same "
             f"one when it is the only healthy one (default {_D.retries})"),
    Opt("no_access_log", ("--no-access-log",), "bool", "other",
        help="no structured access-log line per request"),
    Opt("system_prompt", ("--system-prompt",), "str", "serving features", metavar="TEXT",
        help="system prompt added to chat requests (see --system-prompt-mode)"),
    Opt("system_prompt_mode", ("--system-prompt-mode",), "str", "serving features", choices=SYSTEM_PROMPT_MODES,
        help="if-missing (default): only when the request has no system message; prepend: before existing "
             "ones; replace: instead of them"),
    Opt("default", ("--default",), "list", "serving features", metavar="KEY=JSON", in_file=False,
        help="default sampling parameter applied when a request leaves it out (repeatable), e.g. "
             "--default stop='[\"###\"]'"),
    Opt("capture_path", ("--capture-path",), "str", "data capture", metavar="FILE.jsonl", in_file=False,
        help="write each request and its answer as JSON lines to this (rotating) file; off by default"),
    Opt("capture_sample_rate", ("--capture-sample-rate",), "float", "data capture", in_file=False,
        help="fraction of requests captured, 0..1 (default 1)"),
    Opt("capture_max_bytes", ("--capture-max-bytes",), "int", "data capture", in_file=False,
        help="rotate the capture file at this size (default 100 MiB)"),
    Opt("capture_backups", ("--capture-backups",), "int", "data capture", in_file=False,
        help="rotated files kept (FILE.1 .. FILE.N, default 5)"),
    Opt("capture_redact", ("--capture-redact",), "list", "data capture", metavar="FIELD", in_file=False,
        help="replace this field's value with [REDACTED] wherever it occurs (repeatable), e.g. messages"),
    Opt("capture_redact_pattern", ("--capture-redact-pattern",), "list", "data capture", metavar="REGEX",
        in_file=False, help="replace matches of this regex in captured strings with [REDACTED] (repeatable)"),
    Opt("capture_queue_size", ("--capture-queue-size",), "int", "data capture", in_file=False,
        help="records waiting for the writer thread; beyond it records are dropped, never waited for"),
)
for _name, _t in DEFAULT_FLAGS.items():
    OPTIONS += (Opt(f"default_{_name}", (f"--default-{_name.replace('_', '-')}",), _t.__name__, "serving features",
                    in_file=False, help=f"default {_name} when a request leaves it out"),)
OPTION_BY_DEST = {o.dest: o for o in OPTIONS}
_CAPTURE_FLAGS = {"capture_path": "path", "capture_sample_rate": "sample_rate", "capture_max_bytes": "max_bytes",
                  "capture_backups": "backups", "capture_redact": "redact",
                  "capture_redact_pattern": "redact_patterns", "capture_queue_size": "queue_size"}


def build_parser(parser: argparse.ArgumentParser | None = None,
                 environ: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    """Add the scheduler's flags. Every default is None ("not given"); :func:`resolve` layers in
    the environment, the deployment file and the built-in defaults. ``environ`` is unused and kept
    for callers of the old signature."""
    p = parser or ShortErrorParser(prog="pdserve scheduler", allow_abbrev=False)
    groups: dict[str, Any] = {}
    for o in OPTIONS:
        g = groups.get(o.group) or groups.setdefault(o.group, p.add_argument_group(o.group))
        help_ = o.help + (f" [env {o.env}]" if o.env else "")
        if o.kind == "bool":
            g.add_argument(*o.flags, dest=o.dest, action="store_true", default=None, help=help_)
        elif o.kind == "list":
            if o.nargs:
                g.add_argument(*o.flags, dest=o.dest, nargs=o.nargs, default=None, metavar=o.metavar, help=help_)
            else:
                g.add_argument(*o.flags, dest=o.dest, action="append", default=None, metavar=o.metavar, help=help_)
        else:
            conv = {"int": int, "float": float, "str": str}[o.kind]
            g.add_argument(*o.flags, dest=o.dest, type=conv, default=None, choices=o.choices,
                           metavar=o.metavar, help=help_)
    return p


def _from_env(o: Opt, raw: str) -> Any:
    name = o.env or ""
    if o.kind == "bool":
        return parse_bool(raw, False, name)
    if o.kind in ("int", "float"):
        try:
            return int(raw) if o.kind == "int" else float(raw)
        except ValueError:
            raise ConfigError("environment", name, f"{raw!r} is not a{'n integer' if o.kind == 'int' else ' number'}",
                              f"export {name}=<{'integer' if o.kind == 'int' else 'number'}>") from None
    if o.choices and raw not in o.choices:
        raise ConfigError("environment", name, f"{raw!r} is not one of {', '.join(o.choices)}",
                          f"export {name}={o.choices[0]}")
    return raw


def resolve(args: argparse.Namespace, environ: Mapping[str, str], file_values: Mapping[str, Any]) -> dict[str, Any]:
    """dest → value: the flag if given, else the environment variable, else the deployment file;
    None where none of them sets it (the built-in default applies)."""
    return resolve_with_origins(args, environ, file_values)[0]


def resolve_with_origins(args: argparse.Namespace, environ: Mapping[str, str],
                         file_values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """:func:`resolve`, plus dest → where its value came from ("flag", "env" or "file"; missing:
    the built-in default), so a bad value is reported under the name the operator wrote."""
    out: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for o in OPTIONS:
        value = getattr(args, o.dest, None)
        origin = "flag"
        if value is None and o.env:
            raw = environ.get(o.env)
            if raw is not None and raw.strip() != "":
                value, origin = _from_env(o, raw.strip()), "env"
        if value is None:
            value, origin = file_values.get(o.dest), "file"
        out[o.dest] = value
        if value is not None:
            origins[o.dest] = origin
    return out, origins


def parse_host_port(text: str, flag: str) -> tuple[str, int]:
    t = text.strip()
    for prefix in ("http://", "https://"):
        if t.startswith(prefix):
            t = t[len(prefix):]
    t = t.rstrip("/")
    host, sep, port = t.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        raise ConfigError(flag, None, f"{text!r} is not HOST:PORT", f"{flag} 127.0.0.1:8001")
    if not 1 <= int(port) <= 65535:
        raise ConfigError(flag, None, f"{text!r}: port {int(port)} is outside 1..65535",
                          f"{flag} 127.0.0.1:8001 (a port from 1 to 65535)")
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


def _api_keys(v: dict[str, Any], environ: Mapping[str, str]) -> list[str]:
    """Every key from --api-key / the file's api_key, PDSERVE_API_KEYS and the key file (union: a
    new key can be added through one source while the old one is still accepted from another)."""
    from pdserve.scheduler.auth import read_key_file

    keys = list(v.get("api_key") or [])
    keys += [k.strip() for k in environ.get(ENV_API_KEYS, "").split(",") if k.strip()]
    if v.get("api_key_file"):
        keys += read_key_file(v["api_key_file"])
    return list(dict.fromkeys(k for k in keys if k))


def _defaults(v: dict[str, Any], file_defaults: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(file_defaults)
    for item in v.get("default") or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("flags", "--default", f"{item!r} is not KEY=VALUE", "--default seed=42")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw  # a bare string: --default stop=###
    for name in DEFAULT_FLAGS:
        value = v.get(f"default_{name}")
        if value is not None:
            out[name] = value
    return out


def _capture(v: dict[str, Any], file_capture: Mapping[str, Any] | None) -> CaptureSettings | None:
    merged: dict[str, Any] = dict(file_capture or {})
    for dest, key in _CAPTURE_FLAGS.items():
        if v.get(dest) is not None:
            merged[key] = v[dest]
    if not merged.get("path"):
        if merged:
            raise ConfigError("flags", "--capture-path", "capture settings given without a file to write to",
                              "add --capture-path /var/log/pdserve/capture.jsonl (or capture: {path: ...})")
        return None
    from pdserve.scheduler.deploy_config import capture_settings

    return capture_settings(merged, "flags")


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ,
                     extra: Sequence[str] = ()) -> SchedulerConfig:
    """Build the config from parsed flags, the environment (NODE_PORTS, ranktables, USE_OPENAI,
    PDSERVE_*) and the deployment file (``--config`` / ``PDSERVE_CONFIG``)."""
    from pdserve.scheduler.deploy_config import DeployFile, load_deploy_file

    for arg in extra:
        log.debug("ignoring flag the scheduler does not use: %s", arg)
    config_path = getattr(args, "config", None) or (environ.get(ENV_CONFIG) or "").strip() or None
    deploy = load_deploy_file(config_path) if config_path else DeployFile()
    v, origins = resolve_with_origins(args, environ, deploy.flag_values())
    digest: str | None = None
    if v["prefill_url"] or v["decode_url"]:
        if not (v["prefill_url"] and v["decode_url"]):
            raise ConfigError("flags", "--prefill-url/--decode-url", "only one role given",
                              "give at least one --prefill-url and one --decode-url")
        specs: list[InstanceSpec] = []
        for role, urls, flag in (("prefill", v["prefill_url"], "--prefill-url"),
                                 ("decode", v["decode_url"], "--decode-url")):
            for i, u in enumerate(urls):
                host, port = parse_host_port(u, flag)
                specs.append(InstanceSpec(role, i, len(specs), host, port))
    else:
        specs, digest = instances_from_ranktable(environ)
    names = list(v["served_model_name"] or [])
    if not names and v["model"]:
        names = [v["model"]]

    def pick(dest: str, default: Any) -> Any:
        return default if v[dest] is None else v[dest]

    d = SchedulerConfig(instances=[])
    cfg = SchedulerConfig(
        instances=specs,
        host=pick("host", d.host),
        port=pick("port", d.port),
        served_model_names=names,
        use_openai=parse_bool(environ.get(ENV_USE_OPENAI), True, ENV_USE_OPENAI),
        ranktable_digest=digest,
        identity_check=not v["no_identity_check"],
        prefill_policy=pick("prefill_policy", d.prefill_policy),
        decode_policy=pick("decode_policy", d.decode_policy),
        prefix_chars=pick("prefix_chars", d.prefix_chars),
        affinity_load_factor=pick("affinity_load_factor", d.affinity_load_factor),
        max_inflight=pick("max_inflight", d.max_inflight),
        max_inflight_per_instance=pick("max_inflight_per_instance", d.max_inflight_per_instance),
        max_queue=pick("max_queue", d.max_queue),
        queue_timeout=pick("queue_timeout", d.queue_timeout),
        max_body_bytes=pick("max_body_bytes", d.max_body_bytes),
        max_model_len=v["max_model_len"],
        chars_per_token_bound=pick("chars_per_token_bound", d.chars_per_token_bound),
        connect_timeout=pick("connect_timeout", d.connect_timeout),
        prefill_timeout=pick("prefill_timeout", d.prefill_timeout),
        first_token_timeout=pick("first_token_timeout", d.first_token_timeout),
        idle_timeout=pick("idle_timeout", d.idle_timeout),
        decode_timeout=pick("decode_timeout", d.decode_timeout),
        health_interval=pick("health_interval", d.health_interval),
        health_timeout=pick("health_timeout", d.health_timeout),
        startup_timeout=pick("startup_timeout", d.startup_timeout),
        retries=pick("retries", d.retries),
        access_log=not v["no_access_log"],
        api_keys=_api_keys(v, environ),
        protect_metrics=bool(v["protect_metrics"]),
        runtime_lora_updating=bool(v["runtime_lora_updating"]),
        instance_updates=bool(v["instance_updates"]),
        instance_api_key=v["instance_api_key"] or None,
        drain_seconds=pick("drain_seconds", d.drain_seconds),
        defaults=_defaults(v, deploy.defaults or {}),
        system_prompt=v["system_prompt"],
        system_prompt_mode=pick("system_prompt_mode", d.system_prompt_mode),
        capture=_capture(v, deploy.capture.model_dump(exclude_unset=True) if deploy.capture else None),
        decode_only_below=pick("decode_only_below", d.decode_only_below),
        decode_only_uncached_below=pick("decode_only_uncached_below", d.decode_only_uncached_below),
        decode_only_when_queued=pick("decode_only_when_queued", d.decode_only_when_queued),
        decode_affinity=not v["no_decode_affinity"],
        prefill_first_token=not v["no_prefill_first_token"],
        decode_only_fallback=not v["no_decode_only_fallback"],
        affinity_chunk_chars=pick("affinity_chunk_chars", d.affinity_chunk_chars),
        config_file=config_path,
    )
    check(cfg, origins)
    return cfg


def config_from_argv(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> SchedulerConfig:
    """For ``pdserve serve``: the role daemon's whole command line (vLLM flags included).

    vLLM has a ``--config`` flag of its own (a YAML file of vLLM arguments) and this command line
    also reaches the instances, so here only ``--deploy-config`` / ``PDSERVE_CONFIG`` name the
    scheduler's deployment file; a ``--config`` is left to vLLM.
    """
    argv = list(argv)
    parser = build_parser(environ=environ)
    args, extra = parser.parse_known_args(argv)
    if args.config is not None and not any(a == "--deploy-config" or a.startswith("--deploy-config=")
                                           for a in argv):
        extra = [*extra, "--config", args.config]
        args.config = None
    return config_from_args(args, environ, extra)


# dest → (the smallest value allowed, whether that value itself is allowed, an example for the fix).
# Every number must also be finite: nan slips through every comparison and inf overflows aiohttp's
# timeout arithmetic.
_BOUNDS: dict[str, tuple[int, bool, str]] = {
    "port": (1, True, "8000 (a port from 1 to 65535)"),
    "max_model_len": (1, True, "4096 (or leave it out to ask the instances)"),
    "max_inflight": (0, True, "0 (unbounded) or a positive number"),
    "max_inflight_per_instance": (0, True, "0 (unbounded) or a positive number"),
    "max_queue": (0, True, "0 (or a positive number)"),
    "retries": (0, True, "0 (or a positive number)"),
    "decode_only_below": (0, True, "0 (off) or a positive number"),
    "decode_only_uncached_below": (0, True, "0 (off) or a positive number"),
    "decode_only_when_queued": (0, True, "0 (off) or a positive number"),
    "prefix_chars": (0, True, f"{_D.prefix_chars} (the default)"),
    "affinity_load_factor": (1, True, f"{_D.affinity_load_factor:g} (at least 1: an instance's fair share)"),
    "affinity_chunk_chars": (16, True, f"{_D.affinity_chunk_chars} (at least 16)"),
    "max_body_bytes": (1024, True, "33554432 (at least 1024)"),
    "drain_seconds": (0, True, f"{_D.drain_seconds:g} (0: exit at once)"),
    "queue_timeout": (0, False, f"{_D.queue_timeout:g} (a number of seconds above 0)"),
    "chars_per_token_bound": (0, False, f"{_D.chars_per_token_bound:g} (a number above 0)"),
    "connect_timeout": (0, False, f"{_D.connect_timeout:g} (a number of seconds above 0)"),
    "prefill_timeout": (0, False, f"{_D.prefill_timeout:g} (a number of seconds above 0)"),
    "first_token_timeout": (0, False, f"{_D.first_token_timeout:g} (a number of seconds above 0)"),
    "idle_timeout": (0, False, f"{_D.idle_timeout:g} (a number of seconds above 0)"),
    "decode_timeout": (0, False, f"{_D.decode_timeout:g} (a number of seconds above 0)"),
    "health_interval": (0, False, f"{_D.health_interval:g} (a number of seconds above 0)"),
    "health_timeout": (0, False, f"{_D.health_timeout:g} (a number of seconds above 0)"),
    "startup_timeout": (0, False, f"{_D.startup_timeout:g} (a number of seconds above 0)"),
}
_UPPER: dict[str, int] = {"port": 65535}


def _bad_value(dest: str, found: str, example: str, origins: Mapping[str, str], config_file: str | None) -> ConfigError:
    """The error for a bad value, under the name the operator used: the flag, the environment
    variable or the deployment file's key."""
    o = OPTION_BY_DEST[dest]
    origin = origins.get(dest, "flag")
    if origin == "env" and o.env:
        return ConfigError("environment", o.env, found, f"export {o.env}={example}")
    if origin == "file":
        return ConfigError(config_file or "<deploy config>", dest, found, f"write it as {dest}: {example}")
    return ConfigError("flags", o.flags[0], found, f"{o.flags[0]} {example}")


def check(cfg: SchedulerConfig, origins: Mapping[str, str] | None = None) -> None:
    """Refuse settings that would only fail later (every request a 500/504, a bind traceback after
    the instances became healthy). ``origins`` (dest → "flag" | "env" | "file", from
    :func:`resolve_with_origins`) makes the message name the source the value came from."""
    if not cfg.prefill or not cfg.decode:
        raise ConfigError("ranktable", None, "the scheduler needs at least one prefill and one decode instance",
                          "add instances to server_group_list groups 1 and 2")
    for dest, (low, inclusive, example) in _BOUNDS.items():
        value = getattr(cfg, dest)
        if value is None or isinstance(value, bool):
            continue
        high = _UPPER.get(dest)
        shown = value if isinstance(value, int) else f"{value:g}"
        if not math.isfinite(value):
            found = f"{value} is not a finite number"
        elif value < low or (value == low and not inclusive):
            if low == 0:
                found = f"{shown} is negative" if value < 0 else f"{shown} is not above 0"
            else:
                found = f"{shown} is below {low}" if high is None else f"{shown} is outside {low}..{high}"
        elif high is not None and value > high:
            found = f"{shown} is outside {low}..{high}"
        else:
            continue
        raise _bad_value(dest, found, example, origins or {}, cfg.config_file)
    if cfg.defaults:
        from pdserve.scheduler.features import check_defaults

        check_defaults(cfg.defaults, cfg.config_file or "flags")
    seen: dict[tuple[str, int], InstanceSpec] = {}
    for spec in cfg.instances:
        key = (spec.host, spec.port)
        if key in seen:
            raise ConfigError(ENV_NODE_PORTS, None,
                              f"{spec.name} and {seen[key].name} use the same address {spec.host}:{spec.port}",
                              "give every instance its own port")
        seen[key] = spec
