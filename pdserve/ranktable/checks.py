"""The rules between ranktable fields, each reported as its own ConfigError.

All rules run in one pass and return every problem (``validate`` shows them all at once).
A *locator* maps a (group, server) position to the file and JSON path it came from, so the
errors of a merged ranktable still point at the input file the operator has to edit.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from pdserve.errors import ConfigError, plural
from pdserve.ranktable.schema import GROUP_ROLES, GlobalRanktable, LocalRanktable, Server

# (group index, server index) -> (file, JSON path of that server entry)
Locator = Callable[[int, int], tuple[str, str]]

EXPECTED_GROUPS = ("0", "1", "2")
GEN_HINT = "regenerate with `pdserve ranktable gen` (or fix it by hand)"


def default_locator(source: str) -> Locator:
    return lambda g, s: (source, f"server_group_list[{g}].server_list[{s}]")


def is_uint(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def ipv4_problem(text: str) -> str | None:
    """Why ``text`` cannot be a server_ip, or None. IPv4 only: the AscendCloud format assumes it,
    and the KV side channel's ``server_ip:port`` address is built without IPv6 brackets."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return f"{text!r} is not an IP address"
    return None if addr.version == 4 else f"{text!r} is an IPv6 address; server_ip must be IPv4"


def _check_server_ids(server: Server, src: str, path: str) -> list[ConfigError]:
    errors = []
    if not server.server_id.strip():
        errors.append(ConfigError(src, f"{path}.server_id", "empty string",
                                  "set it to the host's address (the same as server_ip)"))
    problem = ipv4_problem(server.server_ip)
    if problem:
        errors.append(ConfigError(src, f"{path}.server_ip", problem,
                                  "write the host's IPv4 address, e.g. \"10.0.0.18\" (127.0.0.1 for one host)"))
    return errors


def check_server_devices(server: Server, src: str, path: str) -> list[ConfigError]:
    """device_id/rank_id are non-negative integers, rank_id k at position k, ips valid."""
    errors: list[ConfigError] = []
    if server.device is None:
        return errors
    if not server.device:
        errors.append(ConfigError(src, f"{path}.device", "empty device list",
                                  "list the instance's devices (only the scheduler has none, and then "
                                  "the \"device\" key is left out)"))
    seen: dict[str, int] = {}
    for k, dev in enumerate(server.device):
        dpath = f"{path}.device[{k}]"
        if not is_uint(dev.device_id):
            errors.append(ConfigError(src, f"{dpath}.device_id", f"{dev.device_id!r}",
                                      "write the device index as a non-negative integer string, e.g. \"4\""))
        elif dev.device_id in seen:
            errors.append(ConfigError(src, f"{dpath}.device_id",
                                      f"device \"{dev.device_id}\" listed twice in one instance "
                                      f"(also at device[{seen[dev.device_id]}])",
                                      "list each device of the instance once"))
        else:
            seen[dev.device_id] = k
        if not _is_ip(dev.device_ip):
            errors.append(ConfigError(src, f"{dpath}.device_ip", f"{dev.device_ip!r} is not an IP address",
                                      "write the device NIC address (`hccn_tool -i <id> -ip -g`), or the "
                                      "host address on hosts without hccn_tool"))
        if dev.rank_id != str(k):
            errors.append(ConfigError(src, f"{dpath}.rank_id", f"rank_id {dev.rank_id!r} at position {k}",
                                      f"number rank_id from 0 inside each instance in device order: "
                                      f"write \"{k}\""))
    return errors


def check_global(
    rt: GlobalRanktable,
    source: str,
    *,
    complete: bool = True,
    locate: Locator | None = None,
) -> tuple[list[ConfigError], list[str]]:
    """All rules of a global ranktable. Returns (errors, warnings).

    ``complete=False`` accepts one host's part of a deployment (what ``gen`` writes on a host
    without ``--api-server`` or without prefill/decode instances): no scheduler or an empty
    group is then fine, because ``merge`` will bring them in.
    """
    loc = locate or default_locator(source)
    errors: list[ConfigError] = []
    warnings: list[str] = []

    if rt.status != "completed":
        errors.append(ConfigError(source, "status", f"{rt.status!r}", "write \"completed\""))

    groups = rt.server_group_list
    ids = [g.group_id for g in groups]
    if len(groups) != 3:
        errors.append(ConfigError(source, "server_group_list", f"{plural(len(groups), 'group')} (group_ids {ids})",
                                  "use exactly three groups: \"0\" scheduler, \"1\" prefill, \"2\" decode"))
    for gi, group in enumerate(groups[:3]):
        if group.group_id != EXPECTED_GROUPS[gi]:
            errors.append(ConfigError(source, f"server_group_list[{gi}].group_id", f"{group.group_id!r}",
                                      f"write \"{EXPECTED_GROUPS[gi]}\" (the groups are \"0\" scheduler, "
                                      "\"1\" prefill, \"2\" decode, in this order)"))
        n = len(group.server_list)
        if group.server_count != str(n):
            errors.append(ConfigError(source, f"server_group_list[{gi}].server_count",
                                      f"{group.server_count!r} but server_list has {plural(n, 'entry', 'entries')}",
                                      f"write \"{n}\" (server_count must equal the length of server_list)"))
    if len(groups) < 1:
        return errors, warnings

    # group 0: the scheduler (service entry, api-server); exactly one, without devices
    sched = groups[0].server_list
    if complete and not sched:
        errors.append(ConfigError(source, "server_group_list[0].server_list", "no scheduler (empty list)",
                                  "run `pdserve ranktable gen ... --api-server` on the scheduler host and "
                                  "merge that host's global ranktable with this one (`validate --partial` "
                                  "accepts one host's file before the merge)"))
    for si in range(1, len(sched)):  # name the extra entries where they are, e.g. in a merge input
        src, path = loc(0, si)
        first = ": ".join(loc(0, 0))
        errors.append(ConfigError(src, path, f"a second scheduler (server_ip {sched[si].server_ip}); "
                                             f"the first is {first} (server_ip {sched[0].server_ip})",
                                  "keep exactly one scheduler: pass --api-server to `gen` on one host only "
                                  "(or delete this entry and fix server_count)"))
    for si, server in enumerate(sched):
        src, path = loc(0, si)
        errors += _check_server_ids(server, src, path)
        if server.device is not None:
            errors.append(ConfigError(src, f"{path}.device", f"scheduler entry has {plural(len(server.device), 'device')}",
                                      "remove the \"device\" key: the scheduler (group \"0\") runs on CPU "
                                      "and has no devices"))

    # groups 1 and 2: one server entry per instance
    used: dict[tuple[str, str], tuple[str, str, int]] = {}  # (server_id, device_id) -> first use
    tp_by_group: dict[str, int] = {}
    for gi in (1, 2):
        if gi >= len(groups):
            break
        role = GROUP_ROLES[EXPECTED_GROUPS[gi]]
        servers = groups[gi].server_list
        if complete and not servers:
            errors.append(ConfigError(source, f"server_group_list[{gi}].server_list",
                                      f"no {role} instance (empty list)",
                                      f"add one: `pdserve ranktable gen --{role}-server-list 0,1 ...` on a host, "
                                      "then merge the hosts' global ranktables (`validate --partial` accepts "
                                      "one host's file before the merge)"))
        first_tp: tuple[int, str, str] | None = None
        for si, server in enumerate(servers):
            src, path = loc(gi, si)
            errors += _check_server_ids(server, src, path)
            if server.device is None:
                errors.append(ConfigError(src, f"{path}.device", f"{role} instance has no \"device\" key",
                                          f"list the devices of this {role} instance ({GEN_HINT})"))
                continue
            errors += check_server_devices(server, src, path)
            for k, dev in enumerate(server.device):
                key = (server.server_id, dev.device_id)
                first = used.setdefault(key, (src, path, k))
                if first[:2] != (src, path):
                    fix = "give each instance its own devices (one device, one instance)"
                    if first[0] != src:  # merged files: two hosts that say they are the same host
                        fix = (f"two files name host {server.server_id}: if they come from different hosts, "
                               "regenerate each on its host (or with --server-ip set to its own address)")
                    errors.append(ConfigError(src, f"{path}.device[{k}].device_id",
                                              f"device \"{dev.device_id}\" of host {server.server_id} "
                                              f"is already used by {first[0]}: {first[1]}.device[{first[2]}]", fix))
            tp = len(server.device)
            if not tp:
                continue
            if first_tp is None:
                first_tp = (tp, src, path)
            elif tp != first_tp[0]:
                errors.append(ConfigError(src, f"{path}.device",
                                          f"{plural(tp, 'device')}, but the first {role} instance "
                                          f"({first_tp[1]}: {first_tp[2]}) has {first_tp[0]}",
                                          f"give every {role} instance the same number of devices (equal TP)"))
        if first_tp is not None:
            tp_by_group[role] = first_tp[0]
    if len(tp_by_group) == 2 and tp_by_group["prefill"] != tp_by_group["decode"]:
        warnings.append(f"{source}: prefill TP is {tp_by_group['prefill']} but decode TP is "
                        f"{tp_by_group['decode']}; the pdserve KV connector pairs ranks by tp_rank and "
                        "needs equal TP")
    return errors, warnings


def check_local(rt: LocalRanktable, source: str) -> list[ConfigError]:
    """Shape rules of a local ranktable: group "0", one server, sane devices."""
    errors: list[ConfigError] = []
    if rt.status != "completed":
        errors.append(ConfigError(source, "status", f"{rt.status!r}", "write \"completed\""))
    if rt.group_id != "0":
        errors.append(ConfigError(source, "group_id", f"{rt.group_id!r}",
                                  "write \"0\" (a local ranktable always uses group \"0\")"))
    n = len(rt.server_list)
    if n != 1:
        errors.append(ConfigError(source, "server_list", f"{plural(n, 'server')}",
                                  "a local ranktable describes exactly one instance: keep one server entry "
                                  "(use the local_ranktable_<ip>_<devices>.json written by `gen`)"))
    if rt.server_count != str(n):
        errors.append(ConfigError(source, "server_count", f"{rt.server_count!r} but server_list has {plural(n, 'entry', 'entries')}",
                                  f"write \"{n}\""))
    for si, server in enumerate(rt.server_list):
        path = f"server_list[{si}]"
        errors += _check_server_ids(server, source, path)
        errors += check_server_devices(server, source, path)
    return errors
