"""``validate``: every check on a global ranktable, optionally with a local one and NODE_PORTS.

All problems of all inputs are collected and raised together as one ConfigErrors, so an
operator fixes everything in one round; warnings (e.g. P and D TP differ) are returned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pdserve.errors import ConfigError, ConfigErrors
from pdserve.ranktable.checks import check_global, check_local
from pdserve.ranktable.io import digest, read_global_all, read_local_all
from pdserve.ranktable.node_ports import ENV_NODE_PORTS, parse_node_ports, split_ports
from pdserve.ranktable.roles import Role, match_role
from pdserve.ranktable.schema import GlobalRanktable, LocalRanktable
from pdserve.ranktable.topology import InstanceRef, instances


@dataclass
class Report:
    """What a successful validation found (shown by ``show``/``validate``)."""

    global_path: str
    ranktable: GlobalRanktable
    instances: list[InstanceRef]
    digest: str
    warnings: list[str] = field(default_factory=list)
    ports: list[int] | None = None
    local_path: str | None = None
    role: Role | None = None  # what the local ranktable matched


def _collect(errors: list[ConfigError], fn, *args):  # type: ignore[no-untyped-def]
    try:
        return fn(*args)
    except ConfigErrors as exc:
        errors.extend(exc.errors)
    except ConfigError as exc:
        errors.append(exc)
    return None


def validate(
    global_path: str | os.PathLike[str],
    local_path: str | os.PathLike[str] | None = None,
    node_ports: str | None = None,
    *,
    partial: bool = False,
    node_ports_source: str = ENV_NODE_PORTS,
) -> Report:
    """Check everything; raise ConfigErrors listing all problems, else return the Report.

    ``partial=True`` accepts one host's part of a deployment (no scheduler or empty group),
    i.e. a file that still has to be merged.
    """
    errors: list[ConfigError] = []
    warnings: list[str] = []
    # a file with only unknown keys / numbers for strings is still read, so its rule errors show too
    rt, schema_errs = _collect(errors, read_global_all, global_path) or (None, [])
    errors += schema_errs
    global_ok = False
    if rt is not None:
        errs, warnings = check_global(rt, str(global_path), complete=not partial)
        errors += errs
        global_ok = not errs and not schema_errs

    local_rt: LocalRanktable | None = None
    if local_path is not None:
        local_rt, schema_errs = _collect(errors, read_local_all, local_path) or (None, [])
        errors += schema_errs
        if local_rt is not None:
            errs = check_local(local_rt, str(local_path))
            errors += errs
            if errs or schema_errs:
                local_rt = None

    ports: list[int] | None = None
    if node_ports is not None:
        if rt is not None and global_ok:
            ports = _collect(errors, parse_node_ports, node_ports, rt, node_ports_source)
        else:  # the count cannot be checked without a valid ranktable; still check the entries
            errors += split_ports(node_ports, node_ports_source)[1]

    role: Role | None = None
    if rt is not None and global_ok and local_rt is not None:
        role = _collect(errors, match_role, rt, local_rt, str(global_path), str(local_path))

    if errors:
        raise ConfigErrors(errors)
    assert rt is not None
    return Report(
        global_path=str(global_path),
        ranktable=rt,
        instances=instances(rt),
        digest=digest(rt),
        warnings=warnings,
        ports=ports,
        local_path=str(local_path) if local_path is not None else None,
        role=role,
    )
