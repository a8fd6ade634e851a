"""The scheduler's own address is checked before it waits for the instances."""

from __future__ import annotations

import socket

import pytest

from pdserve.errors import ConfigError
from pdserve.scheduler.config import InstanceSpec, SchedulerConfig
from pdserve.scheduler.listen import check_listen_address

pytestmark = pytest.mark.unit


def _cfg(port: int, host: str = "127.0.0.1", inst_port: int = 1) -> SchedulerConfig:
    return SchedulerConfig(instances=[InstanceSpec("prefill", 0, 0, "127.0.0.1", inst_port),
                                      InstanceSpec("decode", 0, 1, "127.0.0.1", inst_port + 1)],
                           host=host, port=port)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_free_port_passes() -> None:
    check_listen_address(_cfg(_free_port()))


def test_a_taken_port_is_one_message() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError) as err:
            check_listen_address(_cfg(port))
    text = str(err.value)
    assert f"cannot listen on 127.0.0.1:{port}" in text and "--port" in text and "in use" in text


def test_an_address_this_host_lacks() -> None:
    with pytest.raises(ConfigError, match="cannot listen on 192.0.2.1"):
        check_listen_address(_cfg(_free_port(), host="192.0.2.1"))


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_the_scheduler_port_is_an_instance_port(host: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_listen_address(_cfg(8002, host=host, inst_port=8001))
    text = str(err.value)
    assert text.startswith("NODE_PORTS: entry 2:") and "decode instance 0" in text and "--port" in text


def test_the_same_port_on_another_host_is_fine() -> None:
    cfg = SchedulerConfig(instances=[InstanceSpec("prefill", 0, 0, "192.0.2.10", 8000),
                                     InstanceSpec("decode", 0, 1, "192.0.2.11", 8000)],
                          host="0.0.0.0", port=_free_port())
    check_listen_address(cfg)  # nothing raised: those instances are on other machines
