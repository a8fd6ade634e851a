"""Which role this process plays, decided from the two ranktables every daemon gets.

Every daemon reads ``GLOBAL_RANK_TABLE_FILE_PATH`` (the whole deployment) and
``RANK_TABLE_FILE_PATH`` (its own local ranktable). The local one is matched against the global
one: no devices + the scheduler's host -> scheduler; host + device ids of a group "1" entry ->
that prefill instance; of a group "2" entry -> that decode instance.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pdserve.errors import ConfigError, plural
from pdserve.ranktable.io import load_global, load_local, read_json
from pdserve.ranktable.schema import GROUP_SCHEDULER, GlobalRanktable, LocalRanktable
from pdserve.ranktable.topology import InstanceRef, instances

ENV_GLOBAL = "GLOBAL_RANK_TABLE_FILE_PATH"
ENV_LOCAL = "RANK_TABLE_FILE_PATH"


@dataclass(frozen=True)
class Role:
    kind: Literal["scheduler", "prefill", "decode"]
    instance: InstanceRef | None  # None for the scheduler
    server_ip: str

    def describe(self) -> str:
        return self.instance.describe() if self.instance else f"scheduler on {self.server_ip}"


def _devices(ids: tuple[int, ...] | list[str]) -> str:
    return ",".join(map(str, ids)) or "none"


def match_role(
    global_rt: GlobalRanktable,
    local_rt: LocalRanktable,
    global_source: str = "global ranktable",
    local_source: str = "local ranktable",
) -> Role:
    """Match a (checked) local ranktable against a (checked) global one; exactly one must match."""
    if len(local_rt.server_list) != 1:
        raise ConfigError(local_source, "server_list", f"{plural(len(local_rt.server_list), 'server')}",
                          "a local ranktable holds exactly one server entry")
    me = local_rt.server_list[0]
    mine = f"server_ip {me.server_ip} server_id {me.server_id}"
    candidates: list[str] = []  # what was compared, for the error message
    found: list[Role] = []
    if me.device is None:
        group0 = next((g.server_list for g in global_rt.server_group_list if g.group_id == GROUP_SCHEDULER), [])
        for i, s in enumerate(group0):
            candidates.append(f"scheduler server_group_list[0].server_list[{i}] "
                              f"(server_ip {s.server_ip} server_id {s.server_id})")
            if (s.server_ip, s.server_id) == (me.server_ip, me.server_id):
                found.append(Role("scheduler", None, s.server_ip))
        what = f"{mine}, no devices (a scheduler)"
    else:
        ids = tuple(int(d.device_id) if d.device_id.isascii() and d.device_id.isdigit() else -1 for d in me.device)
        for inst in instances(global_rt):
            candidates.append(f"{inst.name} (server_ip {inst.server_ip} server_id {inst.server_id} "
                              f"devices {_devices(inst.device_ids)})")
            if (inst.server_ip, inst.server_id, inst.device_ids) == (me.server_ip, me.server_id, ids):
                found.append(Role(inst.role, inst, inst.server_ip))
        what = f"{mine}, devices {_devices([d.device_id for d in me.device])}"
    compared = "; ".join(candidates) or "nothing (the global ranktable has no entries to compare)"
    if not found:
        raise ConfigError(local_source, "server_list[0]",
                          f"{what} matches no entry of {global_source}; compared with: {compared}",
                          "use the local ranktable written by the same `gen` run as this global ranktable "
                          "(or the merged one), and check RANK_TABLE_FILE_PATH / GLOBAL_RANK_TABLE_FILE_PATH")
    if len(found) > 1:
        raise ConfigError(local_source, "server_list[0]",
                          f"{what} matches {plural(len(found), 'entry', 'entries')} of {global_source}: "
                          + "; ".join(r.describe() for r in found),
                          "make each instance unique in the global ranktable (one device, one instance; "
                          "one scheduler)")
    return found[0]


def resolve_role(global_path: str | os.PathLike[str], local_path: str | os.PathLike[str]) -> Role:
    """Load and check both files, then decide the role (raises ConfigError/ConfigErrors)."""
    global_rt = load_global(global_path)
    local_rt = load_local(local_path)
    return match_role(global_rt, local_rt, str(global_path), str(local_path))


def resolve_role_from_env(environ: Mapping[str, str] = os.environ) -> Role:
    """The role of this daemon from GLOBAL_RANK_TABLE_FILE_PATH and RANK_TABLE_FILE_PATH."""
    paths = {}
    for var, what in ((ENV_GLOBAL, "global_ranktable_merge.json (or global_ranktable_<ip>.json)"),
                      (ENV_LOCAL, "this instance's local_ranktable_<ip>_<devices>.json "
                                  "(or local_ranktable_<ip>_host.json for the scheduler)")):
        value = environ.get(var, "").strip()
        if not value:
            raise ConfigError("environment", var, "not set",
                              f"export {var}=/path/to/{what} (files from `pdserve ranktable gen`)")
        if not Path(value).is_file():
            found = "is a directory, not a file" if Path(value).is_dir() else "file not found"
            raise ConfigError("environment", var, f"{value}: {found}",
                              f"export {var}=/path/to/{what} (files from `pdserve ranktable gen`)")
        paths[var] = value
    _check_not_swapped(paths[ENV_GLOBAL], paths[ENV_LOCAL])
    return resolve_role(paths[ENV_GLOBAL], paths[ENV_LOCAL])


def _kind(path: str) -> str | None:
    """"global" or "local" by the file's top-level keys; None when it is neither (or unreadable:
    the full check reports that, with the field)."""
    try:
        data = read_json(path)
    except ConfigError:
        return None
    if not isinstance(data, dict):
        return None
    if "server_group_list" in data:
        return "global"
    return "local" if "server_list" in data else None


def _check_not_swapped(global_path: str, local_path: str) -> None:
    """Swapped variables would otherwise give a list of schema errors that tell the operator to
    edit two correct files."""
    g, loc = _kind(global_path), _kind(local_path)
    if g == "local" or loc == "global":
        var, path, kind = (ENV_GLOBAL, global_path, "local") if g == "local" else (ENV_LOCAL, local_path, "global")
        hint = " (the two variables look swapped)" if (g, loc) == ("local", "global") else ""
        raise ConfigError("environment", var, f"{path} is a {kind} ranktable{hint}",
                          f"{ENV_GLOBAL} takes the global ranktable (with server_group_list), "
                          f"{ENV_LOCAL} this daemon's local one (one server_list)")
