#!/usr/bin/env python3
"""Drop-in for AscendCloud-LLM's ``PD_separate/pd_ranktable_tools.py``, backed by pdserve.

    python scripts/pd_ranktable_tools.py --mode gen --prefill-server-list 4,5 \
        --decode-server-list 6,7 --api-server --save-dir ./save_dir
    python scripts/pd_ranktable_tools.py --mode merge \
        --global-ranktable-list A.json B.json --save-dir ./save_dir

Same flags and files as the original, plus ``--server-ip`` and ``--device-ip ID=IP`` for hosts
without ``hccn_tool``. Runs from a source checkout without installing pdserve.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import pdserve  # noqa: F401
except ModuleNotFoundError:  # running from a checkout: use the package next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pdserve.errors import ConfigError, ConfigErrors, PdserveError  # noqa: E402
from pdserve.ranktable.cli import add_gen_flags, generate_from_args, print_errors  # noqa: E402
from pdserve.ranktable.merge import merge  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pd_ranktable_tools.py",
        description="Generate (per host) or merge (across hosts) PD ranktables; prefill = 全量, "
                    "decode = 增量, api-server = 服务入口 (the scheduler).")
    p.add_argument("--mode", choices=("gen", "merge"), required=True, help="gen: this host; merge: several hosts")
    add_gen_flags(p)
    p.add_argument("--global-ranktable-list", nargs="+", default=[], metavar="FILE",
                   help="merge: the hosts' global_ranktable_<ip>.json files, in instance order")
    p.add_argument("--save-dir", default=".", metavar="DIR", help="output directory (default: .)")
    return p


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mode == "gen":
        paths = generate_from_args(args)
    else:
        if not args.global_ranktable_list:
            raise ConfigError("--mode merge", "--global-ranktable-list", "no files given",
                              "list the hosts' global_ranktable_<ip>.json files")
        paths = [merge([Path(p) for p in args.global_ranktable_list], Path(args.save_dir))]
    for path in paths:
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except ConfigErrors as exc:
        return print_errors(exc, "pd_ranktable_tools")
    except PdserveError as exc:
        print(f"pd_ranktable_tools: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
