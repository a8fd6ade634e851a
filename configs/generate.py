#!/usr/bin/env python3
"""Regenerate the example ranktables in configs/ with pdserve's own generator.

    python configs/generate.py            # rewrite configs/*/...json in place
    python configs/generate.py OUT_DIR    # write them elsewhere (the tests compare the two)

Addresses are fixed (``server_ip``/``device_ips`` given explicitly) so the output does not depend
on the machine it runs on.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import pdserve  # noqa: F401
except ModuleNotFoundError:  # running from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pdserve.ranktable.gen import generate  # noqa: E402
from pdserve.ranktable.merge import merge  # noqa: E402

HERE = Path(__file__).resolve().parent


def _quiet(_message: str) -> None:
    pass


def build_examples(out: Path) -> list[Path]:
    """Write every example under ``out``; returns the written files."""
    written: list[Path] = []

    # 1p1d-tp2: the Ascend guide's example (one host, prefill NPUs 4,5, decode NPUs 6,7)
    written += generate([[4, 5]], [[6, 7]], True, out / "1p1d-tp2", server_ip="10.0.0.18",
                        device_ips={4: "10.0.1.22", 5: "10.0.1.23", 6: "10.0.1.56", 7: "10.0.1.72"},
                        notify=_quiet)

    # 2p2d-tp2: one 8-device host, two prefill and two decode instances
    written += generate([[0, 1], [2, 3]], [[4, 5], [6, 7]], True, out / "2p2d-tp2", server_ip="10.0.0.18",
                        device_ips={d: f"10.0.1.{20 + d}" for d in range(8)}, notify=_quiet)

    # two-host: host A runs the scheduler and the prefill instances, host B the decode instances
    two = out / "two-host"
    written += generate([[0, 1], [2, 3]], [], True, two / "host-a", server_ip="10.0.0.18",
                        device_ips={d: f"10.0.1.{20 + d}" for d in range(4)}, notify=_quiet)
    written += generate([], [[0, 1], [2, 3]], False, two / "host-b", server_ip="10.0.0.19",
                        device_ips={d: f"10.0.2.{20 + d}" for d in range(4)}, notify=_quiet)
    written.append(merge([two / "host-a" / "global_ranktable_10.0.0.18.json",
                          two / "host-b" / "global_ranktable_10.0.0.19.json"], two, notify=_quiet))

    # local-cpu: this machine, loopback only; "devices" are CPU cores 0 (prefill) and 1 (decode)
    written += generate([[0]], [[1]], True, out / "local-cpu", server_ip="127.0.0.1", notify=_quiet)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    for path in build_examples(target):
        print(f"wrote {path}")
