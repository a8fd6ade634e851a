"""``gen``: write one host's global ranktable and the local ranktable of each of its instances.

Same files and names as AscendCloud's ``pd_ranktable_tools.py --mode gen``:
``global_ranktable_<ip>.json``, ``local_ranktable_<ip>_<devices>.json`` per instance and, with
``--api-server``, ``local_ranktable_<ip>_host.json``. Without ``--api-server`` group "0" is left
empty (server_count "0") so that ``merge`` with the scheduler host's file yields one scheduler.
"""

from __future__ import annotations

import ipaddress
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pdserve.errors import ConfigError, ConfigErrors, plural
from pdserve.ranktable import devices as devmod
from pdserve.ranktable.checks import check_global, ipv4_problem
from pdserve.ranktable.io import ensure_dir, write
from pdserve.ranktable.notice import Notify, stderr_notice
from pdserve.ranktable.schema import Device, GlobalRanktable, LocalRanktable, Server, ServerGroup

def devices_suffix(device_ids: list[int], dashed: bool = False) -> str:
    """``[4, 5]`` -> ``45`` (AscendCloud's names); dashed -> ``4-5``.

    ``gen`` uses the dashed form for every instance of a host as soon as one of its device ids
    is >= 10: otherwise devices 1,2 and device 12 would both be ``_12``.
    """
    return ("-" if dashed else "").join(map(str, device_ids))


def _check_request(prefill: list[list[int]], decode: list[list[int]], api_server: bool,
                   device_ips: dict[int, str]) -> None:
    errors: list[ConfigError] = []
    if not prefill and not decode and not api_server:
        errors.append(ConfigError("gen", None, "nothing to generate",
                                  "give --prefill-server-list and/or --decode-server-list (e.g. 4,5), "
                                  "and/or --api-server"))
    owner: dict[int, str] = {}
    for flag, insts in (("--prefill-server-list", prefill), ("--decode-server-list", decode)):
        tp = len(insts[0]) if insts else 0
        for i, devs in enumerate(insts):
            where = f"instance {i} ({','.join(map(str, devs))})"
            if not devs:
                errors.append(ConfigError(flag, where, "no devices", "give device ids separated by commas, e.g. 4,5"))
            if len(devs) != tp:
                errors.append(ConfigError(flag, where, f"{plural(len(devs), 'device')} but instance 0 has {tp}",
                                          "give every instance of a role the same number of devices (equal TP)"))
            for d in devs:
                if d < 0:
                    errors.append(ConfigError(flag, where, f"device id {d}", "device ids are 0 or more"))
                elif d in owner:
                    errors.append(ConfigError(flag, where, f"device {d} already used by {owner[d]}",
                                              "give each instance its own devices"))
                else:
                    owner[d] = f"{flag} {where}"
    for d, ip in device_ips.items():
        if d not in owner:
            errors.append(ConfigError("--device-ip", f"{d}={ip}", f"device {d} is in no instance",
                                      "drop it, or add the device to --prefill-server-list/--decode-server-list"))
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            errors.append(ConfigError("--device-ip", f"{d}={ip}", f"{ip!r} is not an IP address",
                                      "write ID=IP, e.g. --device-ip 4=10.0.1.22"))
    if errors:
        raise ConfigErrors(errors)


def _hccn_or_error(device_id: int) -> str | ConfigError:
    try:
        return devmod.hccn_device_ip(device_id)
    except ConfigError as exc:
        return exc


def _device_addresses(ids: list[int], host: str, overrides: dict[int, str], notify: Notify) -> dict[int, str]:
    """overrides, then hccn_tool, then the host address (announced once)."""
    out = {d: overrides[d] for d in ids if d in overrides}
    missing = [d for d in ids if d not in out]
    if not missing:
        return out
    if devmod.have_hccn_tool():
        # one hccn_tool call per device, side by side: a 16-NPU host answers in one call's time
        with ThreadPoolExecutor(max_workers=min(16, len(missing))) as pool:
            results = list(pool.map(_hccn_or_error, missing))
        errors = [r for r in results if isinstance(r, ConfigError)]
        if errors:
            raise ConfigErrors(errors)
        out.update({d: r for d, r in zip(missing, results) if isinstance(r, str)})
    else:
        notify(f"hccn_tool not found on PATH; device_ip of device(s) {','.join(map(str, missing))} "
               f"is the host address {host} (set them with --device-ip ID=IP)")
        out.update({d: host for d in missing})
    return out


def build(prefill: list[list[int]], decode: list[list[int]], api_server: bool, host: str,
          addrs: dict[int, str]) -> tuple[GlobalRanktable, list[Server], Server | None]:
    """The global ranktable of one host plus its instance servers and scheduler server."""

    def server(devs: list[int]) -> Server:
        return Server(server_id=host, server_ip=host, device=[
            Device(device_id=str(d), device_ip=addrs[d], rank_id=str(r)) for r, d in enumerate(devs)])

    sched = Server(server_id=host, server_ip=host) if api_server else None
    p_servers = [server(devs) for devs in prefill]
    d_servers = [server(devs) for devs in decode]
    groups = [
        ServerGroup(group_id=gid, server_count=str(len(lst)), server_list=lst)
        for gid, lst in (("0", [sched] if sched else []), ("1", p_servers), ("2", d_servers))
    ]
    return GlobalRanktable(server_group_list=groups), p_servers + d_servers, sched


def generate(
    prefill: list[list[int]],
    decode: list[list[int]],
    api_server: bool,
    save_dir: Path,
    server_ip: str | None = None,
    device_ips: dict[int, str] | None = None,
    *,
    notify: Notify | None = None,
    dir_flag: str = "--save-dir",
) -> list[Path]:
    """Write this host's ranktables into save_dir; returns the paths (global first).

    ``dir_flag`` is the flag named when save_dir cannot be used (``pdserve up`` has --run-dir)."""
    notify = notify or stderr_notice
    overrides = dict(device_ips or {})
    _check_request(prefill, decode, api_server, overrides)
    host = server_ip or devmod.host_address()
    problem = ipv4_problem(host)
    if problem:
        raise ConfigError("--server-ip", None, problem,
                          "give this host's IPv4 address, e.g. --server-ip 10.0.0.18 (127.0.0.1 for one host)")
    ids = [d for devs in prefill + decode for d in devs]
    addrs = _device_addresses(ids, host, overrides, notify)
    rt, servers, sched = build(prefill, decode, api_server, host, addrs)
    errors, warnings = check_global(rt, f"global_ranktable_{host}.json", complete=False)
    if errors:  # should not happen: the request was checked above; keep the safety net
        raise ConfigErrors(errors)
    for w in warnings:
        notify(w)

    save_dir = ensure_dir(Path(save_dir), dir_flag)
    paths = [write(rt, save_dir / f"global_ranktable_{host}.json")]
    dashed = any(d >= 10 for d in ids)
    for srv in servers:
        suffix = devices_suffix([int(d.device_id) for d in srv.device or []], dashed)
        local = LocalRanktable(server_list=[srv])
        paths.append(write(local, save_dir / f"local_ranktable_{host}_{suffix}.json"))
    if sched is not None:
        paths.append(write(LocalRanktable(server_list=[sched]), save_dir / f"local_ranktable_{host}_host.json"))
    for stale in sorted(set(save_dir.glob(f"local_ranktable_{host}_*.json")) - set(paths)):
        notify(f"{stale} is not part of this set (left from an earlier gen?): delete it; a daemon given "
               "it would take a role this global ranktable does not have")
    return paths
