"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def no_hccn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No hccn_tool on PATH (device IPs fall back to the host address) and no deployment
    variables from the developer's shell."""
    for var in ("GLOBAL_RANK_TABLE_FILE_PATH", "RANK_TABLE_FILE_PATH", "NODE_PORTS"):
        monkeypatch.delenv(var, raising=False)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
