"""``pdserve ranktable gen|merge|validate|show``.

Flags of ``gen``/``merge`` are those of AscendCloud's ``pd_ranktable_tools.py`` (plus
``--server-ip``/``--device-ip`` for hosts without ``hccn_tool``); the parsing helpers here are
shared with the drop-in ``scripts/pd_ranktable_tools.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from pdserve.errors import ConfigError, ConfigErrors, plural
from pdserve.ranktable.gen import generate
from pdserve.ranktable.merge import merge
from pdserve.ranktable.node_ports import ENV_NODE_PORTS
from pdserve.ranktable.roles import ENV_GLOBAL, ENV_LOCAL
from pdserve.ranktable.table import format_table
from pdserve.ranktable.validate import Report, validate

SERVER_LIST_HELP = ("devices of each {role} instance: commas between the devices of one instance, "
                    "spaces between instances, e.g. `0,1 2,3` = two instances of TP 2")
DEVICE_IP_HELP = ("device NIC address overrides, ID=IP, several separated by spaces or commas, e.g. "
                  "`--device-ip 4=10.0.1.22 5=10.0.1.23` or `--device-ip 4=10.0.1.22,5=10.0.1.23`. "
                  "Devices without an override ask `hccn_tool -i ID -ip -g`; without hccn_tool on PATH "
                  "they get the host address (a notice says so)")
SERVER_IP_HELP = ("this host's address for server_id/server_ip and the file names "
                  "(default: the primary non-loopback IPv4, else 127.0.0.1)")
ROLES_TEXT = ("roles: prefill (全量) instances are group \"1\", decode (增量) instances group \"2\", "
              "the scheduler (服务入口, api-server) group \"0\"")


def parse_server_list(tokens: list[str] | None, flag: str) -> list[list[int]]:
    """``['4,5', '6,7']`` -> ``[[4, 5], [6, 7]]`` (a quoted ``"4,5 6,7"`` works too)."""
    out: list[list[int]] = []
    errors: list[ConfigError] = []
    for token in (t for raw in tokens or [] for t in raw.split()):
        devs: list[int] = []
        for part in token.split(","):
            if not (part.isascii() and part.isdigit()):
                errors.append(ConfigError(flag, f"instance {len(out)} ({token!r})",
                                          f"{part!r} is not a device id",
                                          "write non-negative integers, commas inside an instance, spaces "
                                          "between instances, e.g. 0,1 2,3"))
                continue
            devs.append(int(part))
        out.append(devs)
    if errors:
        raise ConfigErrors(errors)
    return out


def parse_device_ips(tokens: list[str] | None) -> dict[int, str]:
    """``['4=10.0.1.22', '5=10.0.1.23,6=10.0.1.24']`` -> ``{4: '10.0.1.22', ...}``."""
    out: dict[int, str] = {}
    errors: list[ConfigError] = []
    for item in (p for raw in tokens or [] for p in re.split(r"[,\s]+", raw) if p):
        dev, sep, ip = item.partition("=")
        if not sep or not (dev.isascii() and dev.isdigit()) or not ip:
            errors.append(ConfigError("--device-ip", item, "not of the form ID=IP",
                                      "write e.g. --device-ip 4=10.0.1.22 5=10.0.1.23"))
        elif int(dev) in out and out[int(dev)] != ip:
            errors.append(ConfigError("--device-ip", item, f"device {dev} already set to {out[int(dev)]}",
                                      "give one address per device"))
        else:
            out[int(dev)] = ip
    if errors:
        raise ConfigErrors(errors)
    return out


class _Once(argparse.Action):
    """A list flag given twice would silently keep only the last list: refuse it instead."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        if getattr(namespace, self.dest):
            parser.error(f"{option_string} given twice: list every instance after one "
                         f"{option_string} (spaces between instances, commas between devices)")
        setattr(namespace, self.dest, values)


def add_gen_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill-server-list", nargs="+", metavar="IDS", default=[], action=_Once,
                   help=SERVER_LIST_HELP.format(role="prefill (全量)"))
    p.add_argument("--decode-server-list", nargs="+", metavar="IDS", default=[], action=_Once,
                   help=SERVER_LIST_HELP.format(role="decode (增量)"))
    p.add_argument("--api-server", action="store_true",
                   help="this host runs the scheduler (服务入口): write local_ranktable_<ip>_host.json and put "
                        "the host into group \"0\"; without it group \"0\" stays empty (server_count \"0\") and "
                        "the file must be merged with the scheduler host's one")
    p.add_argument("--server-ip", metavar="IP", help=SERVER_IP_HELP)
    p.add_argument("--device-ip", nargs="+", metavar="ID=IP", default=[], help=DEVICE_IP_HELP)


def print_errors(errors: ConfigErrors, what: str) -> int:
    for err in errors.errors:
        print(f"error: {err.render()}", file=sys.stderr)
    n = len(errors.errors)
    print(f"pdserve: {what}: {plural(n, 'error')}", file=sys.stderr)
    return errors.exit_code


def _reports_all(what: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Print a ConfigErrors as one 'error:' block per problem plus a count (no traceback)."""

    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(fn)
        def run(args: argparse.Namespace) -> int:
            try:
                return fn(args)
            except ConfigErrors as exc:
                return print_errors(exc, what)

        return run

    return wrap


def generate_from_args(args: argparse.Namespace) -> list[Path]:
    """Run ``gen`` from the parsed flags of ``add_gen_flags`` (plus ``--save-dir``)."""
    return generate(
        parse_server_list(args.prefill_server_list, "--prefill-server-list"),
        parse_server_list(args.decode_server_list, "--decode-server-list"),
        args.api_server,
        Path(args.save_dir),
        server_ip=args.server_ip,
        device_ips=parse_device_ips(args.device_ip),
    )


@_reports_all("ranktable gen")
def cmd_gen(args: argparse.Namespace) -> int:
    for p in generate_from_args(args):
        print(f"wrote {p}")
    return 0


@_reports_all("ranktable merge")
def cmd_merge(args: argparse.Namespace) -> int:
    out = merge([Path(p) for p in args.global_ranktable_list], Path(args.save_dir))
    print(f"wrote {out}")
    return 0


def _inputs(args: argparse.Namespace) -> tuple[str, str | None, str | None, str]:
    """--global/--local/--node-ports, else GLOBAL_RANK_TABLE_FILE_PATH/RANK_TABLE_FILE_PATH/NODE_PORTS."""
    global_path = args.global_path or os.environ.get(ENV_GLOBAL, "").strip()
    if not global_path:
        raise ConfigError("ranktable " + args.ranktable_command, "--global", "no global ranktable given",
                          f"pass --global PATH or export {ENV_GLOBAL}=PATH")
    local_path = args.local_path or os.environ.get(ENV_LOCAL, "").strip() or None
    if args.node_ports is not None:
        return global_path, local_path, args.node_ports, "--node-ports"
    env_ports = os.environ.get(ENV_NODE_PORTS)
    return global_path, local_path, (env_ports if env_ports and env_ports.strip() else None), ENV_NODE_PORTS


def _report(args: argparse.Namespace) -> Report:
    global_path, local_path, ports, ports_source = _inputs(args)
    return validate(global_path, local_path, ports, partial=args.partial, node_ports_source=ports_source)


def _print_report(report: Report) -> None:
    print(f"global ranktable: {report.global_path} (digest {report.digest})")
    if report.local_path:
        print(f"local ranktable:  {report.local_path} -> {report.role.describe() if report.role else '-'}")
    print(format_table(report.ranktable, report.ports, report.role))
    for w in report.warnings:
        print(f"warning: {w}")


@_reports_all("ranktable validate")
def cmd_validate(args: argparse.Namespace) -> int:
    report = _report(args)
    _print_report(report)
    checked = ["global ranktable"] + (["local ranktable"] if report.local_path else []) + (
        ["NODE_PORTS"] if report.ports is not None else [])
    warned = f", {plural(len(report.warnings), 'warning')}" if report.warnings else ""
    print(f"ok: {', '.join(checked)} valid ({plural(len(report.instances), 'instance')}{warned})")
    return 0


@_reports_all("ranktable show")
def cmd_show(args: argparse.Namespace) -> int:
    report = _report(args)
    if args.json:
        data = {
            "global": report.global_path,
            "digest": report.digest,
            "scheduler": [s.server_ip for s in report.ranktable.server_group_list[0].server_list],
            "instances": [{
                "global_index": i.global_index, "role": i.role, "index": i.index, "server_ip": i.server_ip,
                "server_id": i.server_id, "device_ids": list(i.device_ids), "device_ips": list(i.device_ips),
                "rank_ids": list(i.rank_ids),
                "port": report.ports[i.global_index] if report.ports else None,
            } for i in report.instances],
            "local": ({"path": report.local_path, "role": report.role.kind,
                       "global_index": report.role.instance.global_index if report.role.instance else None}
                      if report.role else None),
            "warnings": report.warnings,
        }
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        _print_report(report)
    return 0


def _add_check_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--global", dest="global_path", metavar="PATH",
                   help=f"global ranktable (default: env {ENV_GLOBAL})")
    p.add_argument("--local", dest="local_path", metavar="PATH",
                   help=f"also check this local ranktable matches exactly one entry (default: env {ENV_LOCAL})")
    p.add_argument("--node-ports", metavar="PORTS",
                   help=f"instance ports, prefill first then decode, e.g. 8001,8002 (default: env {ENV_NODE_PORTS})")
    p.add_argument("--partial", action="store_true",
                   help="accept one host's part of a deployment (no scheduler / empty group) before merging")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    fmt = argparse.RawDescriptionHelpFormatter
    rt = subparsers.add_parser(
        "ranktable", help="generate, merge, validate and show ranktables",
        description="Ranktables describe a PD deployment (AscendCloud-LLM compatible files).\n" + ROLES_TEXT + ".",
        formatter_class=fmt)
    sub = rt.add_subparsers(dest="ranktable_command", metavar="SUBCOMMAND")
    rt.set_defaults(func=lambda _args: (rt.print_help(), 2)[1])

    gen = sub.add_parser(
        "gen", help="write this host's global and local ranktables", formatter_class=fmt,
        description="Write global_ranktable_<ip>.json, one local_ranktable_<ip>_<devices>.json per instance "
                    "and, with --api-server, local_ranktable_<ip>_host.json.\n<devices> joins the instance's "
                    "device ids (_45 for 4,5); when any device id of the host is >= 10 they are joined with "
                    "'-' (_10-11, _2-3) so names stay unambiguous.\n" + ROLES_TEXT + ".",
        epilog="example: pdserve ranktable gen --prefill-server-list 4,5 --decode-server-list 6,7 "
               "--api-server --save-dir ./save_dir")
    add_gen_flags(gen)
    gen.add_argument("--save-dir", default=".", metavar="DIR", help="output directory (default: .)")
    gen.set_defaults(func=cmd_gen)

    mer = sub.add_parser(
        "merge", help="merge several hosts' global ranktables", formatter_class=fmt,
        description="Concatenate the groups of the given global ranktables, in the given order, into "
                    "global_ranktable_merge.json; exactly one scheduler must exist across them.",
        epilog="example: pdserve ranktable merge --global-ranktable-list global_ranktable_10.0.0.18.json "
               "global_ranktable_10.0.0.19.json --save-dir .")
    mer.add_argument("--global-ranktable-list", nargs="+", required=True, metavar="FILE",
                     help="global ranktables to merge, in instance order")
    mer.add_argument("--save-dir", default=".", metavar="DIR", help="output directory (default: .)")
    mer.set_defaults(func=cmd_merge)

    val = sub.add_parser("validate", help="check a global ranktable (+ local, NODE_PORTS); report all errors",
                         description="Run every check and report all problems at once; exit code 2 on errors. "
                                     "Unknown keys and numbers written without quotes are reported together "
                                     "with the rule errors; a file whose structure is broken (a missing key, "
                                     "an object where an array belongs) gets only its structure errors until "
                                     "they are fixed, because the rules need that structure.")
    _add_check_flags(val)
    val.set_defaults(func=cmd_validate)

    show = sub.add_parser("show", help="print the instances of a global ranktable as a table",
                          description="Validate, then print instance, role, host, devices, rank ids and ports.")
    _add_check_flags(show)
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.set_defaults(func=cmd_show)
