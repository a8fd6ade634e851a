"""``merge``: join several hosts' global ranktables into ``global_ranktable_merge.json``.

Each group's server_list is the concatenation of that group in the input files, in the order
the files are given (so instance order, and therefore NODE_PORTS order, is under the operator's
control); server_count is recomputed. The result must be a complete deployment: exactly one
scheduler, at least one prefill and one decode instance. Errors point at the input file and
entry that has to change.
"""

from __future__ import annotations

import os
from pathlib import Path

from pdserve.errors import ConfigError, ConfigErrors
from pdserve.ranktable.checks import check_global
from pdserve.ranktable.notice import Notify, stderr_notice
from pdserve.ranktable.io import ensure_dir, read_global, write
from pdserve.ranktable.schema import GlobalRanktable, Server, ServerGroup

MERGED_NAME = "global_ranktable_merge.json"


def merge_ranktables(
    inputs: list[tuple[str, GlobalRanktable]], out_name: str = MERGED_NAME
) -> tuple[GlobalRanktable, list[str]]:
    """Merge already-loaded ranktables; returns (merged, warnings) or raises ConfigErrors."""
    errors: list[ConfigError] = []
    for source, rt in inputs:  # each input on its own: one host's part of a deployment
        errs, _ = check_global(rt, source, complete=False)
        errors += errs
    if errors:
        raise ConfigErrors(errors)

    lists: list[list[Server]] = [[], [], []]
    origin: list[list[tuple[str, int]]] = [[], [], []]  # merged position -> (file, index there)
    for source, rt in inputs:
        for gi in range(3):
            for si, server in enumerate(rt.server_group_list[gi].server_list):
                lists[gi].append(server)
                origin[gi].append((source, si))

    def locate(gi: int, si: int) -> tuple[str, str]:
        src, orig = origin[gi][si]
        return src, f"server_group_list[{gi}].server_list[{orig}]"

    first = inputs[0][1]
    merged = GlobalRanktable(
        version=first.version,
        status=first.status,
        server_group_list=[ServerGroup(group_id=str(gi), server_count=str(len(lists[gi])), server_list=lists[gi])
                           for gi in range(3)],
    )
    label = f"{out_name} (merged from {', '.join(s for s, _ in inputs)})"
    errs, warnings = check_global(merged, label, complete=True, locate=locate)
    if errs:
        raise ConfigErrors(errs)
    return merged, warnings


def merge(paths: list[Path], save_dir: Path, *, notify: Notify | None = None) -> Path:
    """Merge the files at ``paths`` (in that order) into save_dir/global_ranktable_merge.json."""
    notify = notify or stderr_notice
    if not paths:
        raise ConfigError("--global-ranktable-list", None, "no files given",
                          "list the hosts' global_ranktable_<ip>.json files, the scheduler host's first")
    seen: dict[str, str] = {}
    errors: list[ConfigError] = []
    for p in paths:
        key = os.path.realpath(p)
        if key in seen:
            errors.append(ConfigError("--global-ranktable-list", str(p), f"same file as {seen[key]}",
                                      "give each host's global ranktable once"))
        seen.setdefault(key, str(p))
    inputs: list[tuple[str, GlobalRanktable]] = []
    for p in paths:
        try:
            inputs.append((str(p), read_global(p)))
        except ConfigErrors as exc:
            errors += exc.errors
        except ConfigError as exc:
            errors.append(exc)
    if errors:
        raise ConfigErrors(errors)
    merged, warnings = merge_ranktables(inputs)
    for w in warnings:
        notify(w)
    return write(merged, ensure_dir(Path(save_dir)) / MERGED_NAME)
