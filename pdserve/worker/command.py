"""The vLLM command line and environment of one prefill/decode instance -- a pure function.

Everything the daemon adds to the operator's vLLM flags is decided here, from the role the
ranktables give and the daemon's own options, without starting anything, so every rule is unit
tested: the KV connector config (checked as the connector will check it), the identity
middleware, device visibility, the TP check, the CPU eager default, the ``--host`` default and
``--enable-prompt-tokens-details``. The operator's vLLM flags pass through unchanged
and in order; pdserve only appends.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pdserve import identity as ident
from pdserve.env import env_bool
from pdserve.errors import ConfigError, plural
from pdserve.kv import tuning
from pdserve.net import bind_failure
from pdserve.kv.shared_cores import ENV as SHARED_CORES_ENV
from pdserve.platform import Platform, core_ranges, parse_core_list, usable_cores, visible_devices_env
from pdserve.ranktable.roles import ENV_LOCAL, Role
from pdserve.ranktable.schema import GlobalRanktable

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
MIDDLEWARE = "pdserve.worker.middleware.IdentityMiddleware"
DEFAULT_CONNECTOR = "PdserveConnector"
CONNECTOR_MODULE = "pdserve.kv.connector"
NO_CONNECTOR = "none"
VLLM_DEFAULT_PORT = 8000
SIDE_PORT_OFFSET = 10000

ENV_KV_PORT = "PDSERVE_KV_PORT"
ENV_KV_TRANSPORT = "PDSERVE_KV_TRANSPORT"
ENV_KV_CONNECTOR = "PDSERVE_KV_CONNECTOR"
ENV_NO_EAGER = "PDSERVE_NO_EAGER"
CPU_MAX_NUM_BATCHED_TOKENS = 512  # per-step token budget of CPU prefill instances unless the operator sets one
CPU_DECODE_MAX_NUM_BATCHED_TOKENS = 128  # ... and of CPU decode instances (prompt work in smaller slices)
ENV_CPU_BIND = "PDSERVE_CPU_BIND"  # explicit VLLM_CPU_OMP_THREADS_BIND instead of the ranktable's cores
TRANSPORTS = ("auto", "tcp", "shm", "torch_dist")
PROMPT_TOKENS_DETAILS_FLAGS = ("--enable-prompt-tokens-details", "--no-enable-prompt-tokens-details")
# stock connectors that expect one symmetric role on both sides
_KV_BOTH = {"NixlConnector", "MooncakeConnector", "MooncakeConnectorV1", "LMCacheConnectorV1"}


@dataclass(frozen=True)
class ServeOptions:
    """The daemon's own options plus the operator's vLLM flags (passed through)."""

    vllm_args: Sequence[str] = ()
    kv_connector: str = DEFAULT_CONNECTOR
    kv_connector_module_path: str | None = None
    kv_port: int | None = None
    kv_transport: str | None = None
    kv_lease_seconds: float = 30.0
    kv_load_failure_policy: str = "fail"
    python: str = field(default_factory=lambda: sys.executable)


@dataclass(frozen=True)
class InstanceContext:
    """What the ranktables say about this instance (inputs to the builder, no I/O)."""

    role: Role
    ranktable: GlobalRanktable
    digest: str
    local_source: str  # the local ranktable path, for error messages
    platform: Platform
    cpu_count: int | None = None


def flag_value(argv: Sequence[str], *names: str) -> str | None:
    """The value of the last ``--name V`` / ``--name=V`` in argv (vLLM: the last one wins)."""
    value: str | None = None
    for i, tok in enumerate(argv):
        for name in names:
            if tok == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif tok.startswith(name + "="):
                value = tok[len(name) + 1:]
    return value


HYBRID_KV_FLAGS = ("--disable-hybrid-kv-cache-manager", "--no-disable-hybrid-kv-cache-manager")


def has_flag(argv: Sequence[str], *names: str) -> bool:
    return any(tok in names or any(tok.startswith(n + "=") for n in names) for tok in argv)


def _served_names(argv: Sequence[str]) -> list[str]:
    """--served-model-name takes several values (nargs '+'); else vLLM serves the --model path."""
    for i, tok in enumerate(argv):
        if tok == "--served-model-name":
            names = []
            for nxt in argv[i + 1:]:
                if nxt.startswith("-"):
                    break
                names.append(nxt)
            return names
        if tok.startswith("--served-model-name="):
            return [tok.split("=", 1)[1]]
    model = flag_value(argv, "--model")
    return [model] if model else []


def _int_flag(argv: Sequence[str], names: tuple[str, ...], default: int) -> int:
    raw = flag_value(argv, *names)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError("vLLM flags", names[0], f"{raw!r} is not an integer",
                          f"write e.g. {names[0]} {default}") from None


def default_side_port(http_port: int, tp: int, position: int) -> int:
    """HTTP port + 10000 + position * (TP - 1): instances on consecutive HTTP ports, in global
    ranktable order, get side-channel port ranges (rank r at + r) that do not overlap."""
    return http_port + SIDE_PORT_OFFSET + position * (tp - 1)


def side_port(opts: ServeOptions, http_port: int, env: Mapping[str, str], tp: int,
              position: int = 0) -> int:
    """--kv-port, else PDSERVE_KV_PORT, else the HTTP port + 10000 + position * (TP - 1); rank r
    uses + r. ``position`` is the instance's place in the global ranktable: instances on
    consecutive HTTP ports (NODE_PORTS in ranktable order) then get side-channel port ranges
    that do not overlap (TP 2 on 8001..8004: 18001, 18003, 18005, 18007)."""
    if opts.kv_port is not None:
        port, where = opts.kv_port, "--kv-port"
    elif env.get(ENV_KV_PORT, "").strip():
        raw = env[ENV_KV_PORT].strip()
        if not (raw.isascii() and raw.isdigit()):
            raise ConfigError("environment", ENV_KV_PORT, f"{raw!r} is not a port", f"export {ENV_KV_PORT}=18000")
        port, where = int(raw), ENV_KV_PORT
    else:
        port = default_side_port(http_port, tp, position)
        where = f"--port {http_port} + {SIDE_PORT_OFFSET}" + (
            f" + {position} x (TP - 1)" if position and tp > 1 else "")
    if port <= http_port < port + tp:
        raise ConfigError("flags", "--kv-port", f"the KV side-channel ports {port}..{port + tp - 1} ({where}) "
                          f"include the HTTP --port {http_port}", "give --kv-port a range apart from --port")
    if not 1024 <= port <= 65535 - (tp - 1):
        raise ConfigError("flags", "--kv-port", f"KV side-channel port {port} ({where}) is out of range "
                          f"for TP {tp} (ranks use port..port+{tp - 1})",
                          "give --kv-port (or PDSERVE_KV_PORT) between 1024 and 65535 - TP")
    return port


def allowed_peers(rt: GlobalRanktable) -> list[str]:
    """Every host of the deployment plus loopback: who may pull KV from this instance."""
    ips = [s.server_ip for g in rt.server_group_list for s in g.server_list]
    return list(dict.fromkeys([*ips, "127.0.0.1"]))


def kv_transfer_config(ctx: InstanceContext, opts: ServeOptions, host_ip: str, port: int,
                       env: Mapping[str, str]) -> dict | None:
    """The ``--kv-transfer-config`` document (None with ``--kv-connector none``)."""
    name = opts.kv_connector
    if name.lower() == NO_CONNECTOR:
        return None
    inst = ctx.role.instance
    assert inst is not None
    cfg: dict = {
        "kv_connector": name,
        "kv_role": "kv_producer" if inst.role == "prefill" else "kv_consumer",
        "engine_id": f"{inst.role}{inst.index}-{ctx.digest}",
        # vLLM 0.32's KVTransferConfig has no kv_ip (it rejects unknown keys): the host is in the extra config
        "kv_port": port,
    }
    if name == DEFAULT_CONNECTOR:
        transport = (opts.kv_transport or env.get(ENV_KV_TRANSPORT, "").strip() or "auto").lower()
        if transport not in TRANSPORTS:
            raise ConfigError("flags", "--kv-transport", f"{transport!r} is not a transport",
                              f"use one of {', '.join(TRANSPORTS)} (or unset {ENV_KV_TRANSPORT})")
        cfg["kv_connector_module_path"] = opts.kv_connector_module_path or CONNECTOR_MODULE
        cfg["kv_connector_extra_config"] = {
            "side_channel_host": host_ip,
            "side_channel_port": port,
            "allowed_peers": allowed_peers(ctx.ranktable),
            "transport": transport,
            "lease_seconds": opts.kv_lease_seconds,
        }
        extra = _extra_config(env)
        tuning.check(env)  # the workers read these; a bad value fails here, before vLLM loads
        cfg["kv_connector_extra_config"].update(extra)
        _check_connector_settings(cfg["kv_connector_extra_config"], set(extra))
        cfg["kv_load_failure_policy"] = opts.kv_load_failure_policy  # vLLM's own switch
    else:
        if opts.kv_connector_module_path:
            cfg["kv_connector_module_path"] = opts.kv_connector_module_path
        if name in _KV_BOTH:
            cfg["kv_role"] = "kv_both"
    return cfg


ENV_KV_EXTRA = "PDSERVE_KV_EXTRA_CONFIG"


def _extra_config(env: Mapping[str, str]) -> dict:
    """PDSERVE_KV_EXTRA_CONFIG: a JSON object merged into kv_connector_extra_config (e.g. timeouts)."""
    raw = env.get(ENV_KV_EXTRA, "").strip()
    if not raw:
        return {}
    try:
        extra = json.loads(raw)
    except ValueError as exc:
        raise ConfigError("environment", ENV_KV_EXTRA, f"not valid JSON ({exc})",
                          f'export {ENV_KV_EXTRA}=\'{{"load_timeout_seconds": 10}}\'') from None
    if not isinstance(extra, dict):
        raise ConfigError("environment", ENV_KV_EXTRA, f"{raw!r} is not a JSON object",
                          f'export {ENV_KV_EXTRA}=\'{{"lease_seconds": 20}}\'')
    for key, source in _ADDRESS_KEYS.items():
        if key in extra:  # the identity and the peers' ranktable name the address the daemon derives
            raise ConfigError("environment", ENV_KV_EXTRA, f"{key!r} cannot be set here",
                              f"remove it; the side channel's address comes from {source}")
    return extra


# extra-config keys the daemon derives (other keys of PDSERVE_KV_EXTRA_CONFIG override its flags)
_ADDRESS_KEYS = {"side_channel_port": "--kv-port / PDSERVE_KV_PORT",
                 "side_channel_host": "the ranktable's server_ip"}


# extra-config keys the daemon fills from its own flags (what to name when such a value is bad)
_KEY_FLAGS = {"lease_seconds": "--kv-lease-seconds", "transport": "--kv-transport"}


def _check_connector_settings(extra: dict, from_env: set[str]) -> None:
    """Validate the connector's extra config here, as the connector will inside the engine
    (:class:`pdserve.kv.config.ConnectorSettings`): a bad value is one message naming the flag or
    PDSERVE_KV_EXTRA_CONFIG key, not a pydantic traceback from every vLLM worker after the model
    has loaded. Unknown keys from PDSERVE_KV_EXTRA_CONFIG are refused too (the connector would
    silently ignore a typo)."""
    import difflib

    from pydantic import ValidationError

    from pdserve.kv.config import ConnectorSettings

    known = list(ConnectorSettings.model_fields)
    for key in sorted(from_env):
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError("environment", ENV_KV_EXTRA, f"unknown key {key!r}",
                              f"{hint}the connector reads only: {', '.join(known)}")
    try:
        ConnectorSettings.model_validate(extra)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        top = str(err["loc"][0]) if err["loc"] else ""
        found = f"{err.get('input')!r}: {err.get('msg', 'invalid value')}"
        default = ConnectorSettings.model_fields[top].default if top in known else None
        if top in _KEY_FLAGS and top not in from_env:  # the daemon's own flag set it
            flag = _KEY_FLAGS[top]
            raise ConfigError("flags", flag, found, f"{flag} {default}" if default is not None
                              else f"correct {flag}") from None
        example = json.dumps({top: default}) if isinstance(default, (int, float, str)) \
            else '{"load_timeout_seconds": 10}'
        raise ConfigError("environment", ENV_KV_EXTRA, f"{top}={found}",
                          f"correct or remove {top!r}, e.g. export {ENV_KV_EXTRA}='{example}'") from None


def env_changes(env: Mapping[str, str], base: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """What a daemon's environment sets (new or different values) and unsets, compared with ``base``."""
    added = {k: v for k, v in env.items() if base.get(k) != v}
    removed = [k for k in base if k not in env]
    return added, removed


def shell_line(argv: Sequence[str], env: Mapping[str, str], base: Mapping[str, str]) -> str:
    """``[env -u VAR] VAR=value ... command``: pasted into a shell whose environment is ``base``,
    it starts the process with exactly ``env`` (the dry runs of ``serve`` and ``up``; pure)."""
    added, removed = env_changes(env, base)
    words = ["env", *(f"-u {shlex.quote(k)}" for k in removed)] if removed else []
    words += [f"{k}={shlex.quote(v)}" for k, v in added.items()]
    return " ".join([*words, shlex.join(argv)])


def build_instance_command(ctx: InstanceContext, opts: ServeOptions,
                           env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of the vLLM OpenAI server for this prefill/decode instance.

    Raises ConfigError for a TP size that disagrees with the local ranktable, a missing device,
    or a bad KV option -- before anything is started.
    """
    inst = ctx.role.instance
    if inst is None:
        raise ValueError("build_instance_command is for prefill/decode instances, not the scheduler")
    user = list(opts.vllm_args)
    devices = list(inst.device_ids)
    argv = [opts.python, "-m", VLLM_MODULE, *user]

    tp_names = ("--tensor-parallel-size", "-tp")
    if has_flag(user, *tp_names):
        tp = _int_flag(user, tp_names, len(devices))
        if tp != len(devices):
            raise ConfigError(ctx.local_source, "server_list[0].device",
                              f"--tensor-parallel-size {tp} but the local ranktable has {len(devices)} "
                              f"device(s) ({','.join(map(str, devices))}) for {inst.name}",
                              f"pass --tensor-parallel-size {len(devices)}, or regenerate the ranktables with "
                              f"{tp} device(s) per instance")
    else:
        argv += ["--tensor-parallel-size", str(len(devices))]

    host_ip = inst.server_ip
    if not has_flag(user, "--host"):
        argv += ["--host", host_ip]
    http_port = _int_flag(user, ("--port",), VLLM_DEFAULT_PORT)

    child_env = dict(env)
    kv_port: int | None = None
    if opts.kv_connector.lower() != NO_CONNECTOR:
        kv_port = side_port(opts, http_port, env, len(devices), inst.global_index)
    if has_flag(user, "--kv-transfer-config"):
        # the operator wrote the whole config: theirs wins, ours would be a second, conflicting one
        pass
    else:
        kvc = kv_transfer_config(ctx, opts, host_ip, kv_port or 0, env)
        if kvc is not None:
            argv += ["--kv-transfer-config", json.dumps(kvc, separators=(",", ":"))]
            if kvc["kv_connector"] == "NixlConnector":
                child_env.setdefault("VLLM_NIXL_SIDE_CHANNEL_HOST", host_ip)
                child_env.setdefault("VLLM_NIXL_SIDE_CHANNEL_PORT", str(kv_port))
            if kvc["kv_connector"] == DEFAULT_CONNECTOR and not has_flag(user, *HYBRID_KV_FLAGS):
                # pdserve's connector moves one KV cache group: sliding-window models then keep
                # full-size KV for every layer (one group) instead of failing at start-up
                argv.append(HYBRID_KV_FLAGS[0])

    argv += ["--middleware", MIDDLEWARE]

    if not has_flag(user, *PROMPT_TOKENS_DETAILS_FLAGS):
        # vLLM leaves usage.prompt_tokens_details (the prefix-cache hits) out unless asked; the
        # scheduler reports the prefill side's cached tokens to the client and in its metrics
        argv.append(PROMPT_TOKENS_DETAILS_FLAGS[0])

    if ctx.platform == "cpu" and not has_flag(user, "--enforce-eager", "--no-enforce-eager") \
            and not env_bool(env, ENV_NO_EAGER, False):
        argv.append("--enforce-eager")  # compiled mode gives wrong text with vllm-cpu 0.32 (DESIGN.md)

    if ctx.platform == "cpu" and not has_flag(user, "--max-num-batched-tokens"):
        # vLLM's CPU default (2048) batches up to four queued prompts into one step, so all of them
        # wait for the slowest; a one-prompt budget finishes them in arrival order (lower TTFT)
        # and bounds how long a decode step carrying prompt work can stall the running decodes
        budget = CPU_DECODE_MAX_NUM_BATCHED_TOKENS if inst.role == "decode" else CPU_MAX_NUM_BATCHED_TOKENS
        argv += ["--max-num-batched-tokens", str(budget)]

    if ctx.platform == "cpu":
        # vLLM's engine core is never bound on CPU (pdserve binds only the workers, and reserves no
        # core), so its busy wait for each step's result takes CPU from the workers
        # the connector inside vLLM reads exactly "1": a "true" or "yes" here must not turn it off
        child_env[SHARED_CORES_ENV] = "1" if env_bool(env, SHARED_CORES_ENV, True) else "0"

    explicit_bind = env.get(ENV_CPU_BIND, "").strip() if ctx.platform == "cpu" else ""
    if explicit_bind:
        check_cpu_bind(explicit_bind, len(devices))
        child_env["VLLM_CPU_OMP_THREADS_BIND"] = explicit_bind
    else:
        child_env.update(visible_devices_env(ctx.platform, devices, ctx.local_source,
                                             cpu_count=ctx.cpu_count))

    child_env.update({
        ident.ENV_ROLE: inst.role,
        ident.ENV_INDEX: str(inst.index),
        ident.ENV_GLOBAL_INDEX: str(inst.global_index),
        ident.ENV_DIGEST: ctx.digest,
        ident.ENV_SERVER_IP: inst.server_ip,
        ident.ENV_DEVICES: ",".join(map(str, devices)),
        ident.ENV_MODEL: ",".join(_served_names(user)),
        "PYTHONUNBUFFERED": "1",  # the daemon tees the child's log line by line
    })
    if chat_default_is_context(user):
        child_env[ident.ENV_CHAT_DEFAULT] = "context"
    else:
        child_env.pop(ident.ENV_CHAT_DEFAULT, None)
    if kv_port is not None and not has_flag(user, "--kv-transfer-config"):
        child_env[ident.ENV_SIDE_CHANNEL] = f"{host_ip}:{kv_port}"
    else:
        child_env.pop(ident.ENV_SIDE_CHANNEL, None)
    return argv, child_env


def check_cpu_bind(text: str, ranks: int, usable: Sequence[int] | None = None, *,
                   source: str = "environment", field: str = ENV_CPU_BIND,
                   example: str = "PDSERVE_CPU_BIND=0-3 (TP 1) or 0-1|2-3 (TP 2); or unset it to bind "
                                  "the ranktable's cores") -> None:
    """PDSERVE_CPU_BIND goes to vLLM as VLLM_CPU_OMP_THREADS_BIND: one core list per TP rank,
    separated by ``|``, each core one this process may use. vLLM's own error for a bad value
    comes late and reads as an engine failure. (``pdserve up --cpu-bind`` is checked the same way.)"""
    fix = f"one core list per TP rank, '|' between ranks, e.g. {example}"
    groups = text.split("|")
    if len(groups) != ranks:
        raise ConfigError(source, field, f"{text!r} has {plural(len(groups), 'core list')} "
                          f"for {plural(ranks, 'TP rank')}", fix)
    cores = [c for g in groups for c in parse_core_list(g, source, field)]
    allowed = usable_cores() if usable is None else list(usable)
    outside = sorted(set(cores) - set(allowed))
    if outside:
        raise ConfigError(source, field, f"core(s) {core_ranges(outside)} not usable here",
                          f"choose from the cores this process may use: {core_ranges(allowed)}")


def chat_default_is_context(user: Sequence[str]) -> bool:
    """Whether vLLM will answer a chat request without max_tokens with up to the rest of the
    context: no ``max_new_tokens`` in the local model folder's generation_config.json (vLLM turns
    it into the default max_tokens) and no flag that changes the generation config. The scheduler
    continues such requests after the prefill's token only when every instance says so."""
    gen_flag = flag_value(user, "--generation-config")
    if has_flag(user, "--override-generation-config") or gen_flag not in (None, "auto", "vllm"):
        return False
    if gen_flag == "vllm":
        return True  # vLLM's neutral defaults: no max_tokens
    model = flag_value(user, "--model")
    if not model or not Path(model).expanduser().is_dir():
        return False  # a hub id: its generation config is not known here
    path = Path(model).expanduser() / "generation_config.json"
    if not path.is_file():
        return True
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("max_new_tokens") is None


def host_error(argv: Sequence[str], role_source: str) -> ConfigError | None:
    """The server's --host must be an address of this host: the local ranktable's server_ip
    (unless --host was given). A ranktable made for another host would otherwise fail inside
    vLLM, after the model loaded."""
    host = flag_value(argv, "--host")
    if not host or host in ("0.0.0.0", "::"):
        return None
    exc = bind_failure(host)
    if exc is not None:
        return ConfigError(role_source, "server_list[0].server_ip",
                           f"{host} is not an address of this host ({exc.strerror or exc})",
                           "use the local ranktable generated for this host (`pdserve ranktable gen` on it), "
                           "or pass --host with an address it has")
    return None


def local_source(env: Mapping[str, str]) -> str:
    return env.get(ENV_LOCAL, "local ranktable") or "local ranktable"


__all__ = ["ServeOptions", "InstanceContext", "build_instance_command", "flag_value", "has_flag",
           "kv_transfer_config", "allowed_peers", "side_port"]
