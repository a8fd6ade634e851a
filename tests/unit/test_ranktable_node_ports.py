"""NODE_PORTS: one port per instance, prefill first then decode."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.errors import ConfigErrors
from pdserve.ranktable import load_global, parse_node_ports

pytestmark = pytest.mark.unit

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RT_2P2D = load_global(CONFIGS / "2p2d-tp2" / "global_ranktable_10.0.0.18.json")
RT_TWO_HOST = load_global(CONFIGS / "two-host" / "global_ranktable_merge.json")


@pytest.mark.parametrize("text", ["8001,8002,8003,8004", "8001 8002 8003 8004", " 8001, 8002,\t8003 ,8004\n",
                                  "8001,8002 8003,8004"])
def test_separators(text: str) -> None:
    assert parse_node_ports(text, RT_2P2D) == [8001, 8002, 8003, 8004]


def test_count_mismatch_lists_expected_instances() -> None:
    with pytest.raises(ConfigErrors) as exc:
        parse_node_ports("8001,8002", RT_2P2D)
    (err,) = exc.value.errors
    assert err.source == "NODE_PORTS" and "2 ports" in err.found and "4 instances" in err.found
    assert "0: prefill[0] on 10.0.0.18 devices 0,1; 1: prefill[1]" in err.fix
    assert "3: decode[1] on 10.0.0.18 devices 6,7" in err.fix


def test_empty() -> None:
    with pytest.raises(ConfigErrors, match="0 ports"):
        parse_node_ports("", RT_2P2D)


def test_duplicate_on_one_host() -> None:
    with pytest.raises(ConfigErrors) as exc:
        parse_node_ports("8001,8002,8001,8004", RT_2P2D, source="--node-ports")
    (err,) = exc.value.errors
    assert err.source == "--node-ports" and err.field == "entry 2 (8001)"
    assert "prefill[0] and decode[0]" in err.found and "own port" in err.fix


def test_same_port_on_different_hosts_is_fine() -> None:
    assert parse_node_ports("8001,8002,8001,8002", RT_TWO_HOST) == [8001, 8002, 8001, 8002]


def test_non_integer_and_out_of_range_reported_together() -> None:
    with pytest.raises(ConfigErrors) as exc:
        parse_node_ports("8001,abc,0,65536", RT_2P2D)
    assert [(e.field, e.found) for e in exc.value.errors] == [
        ("entry 1 ('abc')", "not an integer"),
        ("entry 2 ('0')", "port 0 is out of range"),
        ("entry 3 ('65536')", "port 65536 is out of range"),
    ]
    assert "integers" in exc.value.errors[0].fix and "65535" in exc.value.errors[1].fix


def test_negative_port() -> None:
    with pytest.raises(ConfigErrors, match="not an integer"):
        parse_node_ports("-1,8002,8003,8004", RT_2P2D)


def test_an_empty_entry_is_named_and_a_trailing_comma_is_fine() -> None:
    with pytest.raises(ConfigErrors) as exc:
        parse_node_ports("8001,8002,,8004", RT_2P2D)
    assert [(e.field, e.found) for e in exc.value.errors][0] == ("entry 2", "is empty (two commas in a row?)")
    assert parse_node_ports("8001,8002,8003,8004,", RT_2P2D) == [8001, 8002, 8003, 8004]
