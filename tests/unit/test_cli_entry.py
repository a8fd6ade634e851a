"""The command-line entry points: `pdserve ... | head` ends quietly, and
`scripts/start_servers.sh --help` prints its usage instead of a bash error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
GLOBAL = Path(__file__).parent / "golden" / "design_example.json"
START = ROOT / "scripts" / "start_servers.sh"


def _closed_stdout(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pdserve ARGV`` with a stdout whose reader is already gone (`| head` done)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "pdserve", *argv], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120, cwd=ROOT)
    finally:
        os.close(write_end)


def test_broken_pipe_is_quiet() -> None:
    proc = _closed_stdout("ranktable", "show", "--global", str(GLOBAL), "--node-ports", "8001,8002", "--json")
    assert proc.stderr == "", proc.stderr
    assert proc.returncode == 141  # 128 + SIGPIPE, as `cat` killed by SIGPIPE


def test_errors_still_reach_stderr_with_stdout_gone() -> None:
    proc = _closed_stdout("ranktable", "show", "--global", str(GLOBAL), "--node-ports", "8001")
    assert proc.returncode == 2 and "1 port ('8001') for 2 instances" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_start_servers_help(flag: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("GLOBAL_RANK_TABLE_FILE_PATH", "RANK_TABLE_FILE_PATH")}
    proc = subprocess.run(["bash", str(START), flag], capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0 and proc.stderr == ""
    for word in ("usage:", "GLOBAL_RANK_TABLE_FILE_PATH", "RANK_TABLE_FILE_PATH", "NODE_PORTS", "USE_OPENAI",
                 "PDSERVE_BIN", "pdserve serve --help", "--model"):
        assert word in proc.stdout


def test_start_servers_missing_ranktable_is_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("GLOBAL_RANK_TABLE_FILE_PATH", "RANK_TABLE_FILE_PATH")}
    proc = subprocess.run(["bash", str(START), "--model", "/m"], capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("start_servers.sh: GLOBAL_RANK_TABLE_FILE_PATH is not set: export "
                           "GLOBAL_RANK_TABLE_FILE_PATH=/path/to/global_ranktable_merge.json (see --help)\n")


def test_start_servers_wrong_pdserve_bin_is_one_line(tmp_path) -> None:
    env = dict(os.environ, GLOBAL_RANK_TABLE_FILE_PATH="/g.json", RANK_TABLE_FILE_PATH="/l.json",
               PDSERVE_BIN=str(tmp_path / "nope" / "pdserve"))
    proc = subprocess.run(["bash", str(START), "--model", "/m"], capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 2 and "PDSERVE_BIN=" in proc.stderr and "not an executable file" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
