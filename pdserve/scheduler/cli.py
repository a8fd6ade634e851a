"""``pdserve scheduler``: the api-server (服务入口) in front of the prefill and decode instances.

Takes the AscendCloud-LLM command line as is: vLLM flags it does not need are accepted and
ignored, so the same start script line serves every role.
"""

from __future__ import annotations

import argparse
import os

from pdserve.scheduler.config import build_parser, config_from_args


def _run(args: argparse.Namespace) -> int:
    from pdserve.scheduler.serve import run_scheduler

    cfg = config_from_args(args, os.environ, getattr(args, "extra", ()) or ())
    return run_scheduler(cfg)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "scheduler",
        allow_abbrev=False,  # a vLLM flag must never be taken for an abbreviation of ours
        help="run the scheduler (OpenAI API in front of prefill/decode instances)",
        description="Serve the OpenAI API (USE_OPENAI=1, default) or vLLM's /generate (USE_OPENAI=0) in front "
                    "of the prefill and decode instances of GLOBAL_RANK_TABLE_FILE_PATH, instance i at "
                    "server_ip:NODE_PORTS[i]. Unknown (vLLM) flags are ignored.",
    )
    build_parser(p)
    p.set_defaults(func=_run, accepts_extra=True)
