"""configs/ holds exactly what the tool generates, and every example validates."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pdserve.ranktable import resolve_role, validate

pytestmark = pytest.mark.unit

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NODE_PORTS = {"1p1d-tp2": "8001,8002", "2p2d-tp2": "8001,8002,8003,8004",
              "two-host": "8001,8002,8001,8002", "local-cpu": "8001,8002"}


def _generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("configs_generate", CONFIGS / "generate.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_regenerated_configs_are_identical(tmp_path: Path) -> None:
    written = _generator().build_examples(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in written)
    committed = sorted(p.relative_to(CONFIGS) for p in CONFIGS.rglob("*.json"))
    assert generated == committed
    for rel in committed:
        assert (tmp_path / rel).read_text() == (CONFIGS / rel).read_text(), rel


@pytest.mark.parametrize("name", sorted(NODE_PORTS))
def test_each_example_validates_with_its_node_ports(name: str) -> None:
    directory = CONFIGS / name
    merged = directory / "global_ranktable_merge.json"
    global_path = merged if merged.exists() else next(directory.glob("global_ranktable_*.json"))
    report = validate(global_path, node_ports=NODE_PORTS[name])
    assert report.warnings == []
    assert NODE_PORTS[name] in (directory / "README.md").read_text()
    # every local file of the example resolves to a role, each instance exactly once
    roles = [resolve_role(global_path, p) for p in sorted(directory.rglob("local_ranktable_*.json"))]
    assert sorted(r.kind for r in roles).count("scheduler") == 1
    assert sorted(r.instance.global_index for r in roles if r.instance) == list(range(len(report.instances)))
