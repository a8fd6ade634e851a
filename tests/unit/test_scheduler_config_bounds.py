"""Numeric scheduler settings out of range are one ConfigError at start-up, named by the source the
value came from (flag, PDSERVE_* variable or deployment-file key), never a 500/504 on every
request, a hang or a bind traceback later; and ``--help`` shows the defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.errors import ConfigError
from pdserve.scheduler.config import (
    OPTIONS,
    SchedulerConfig,
    build_parser,
    config_from_argv,
)

pytestmark = pytest.mark.unit

URLS = ["--prefill-url", "127.0.0.1:9101", "--decode-url", "127.0.0.1:9102"]

TIMEOUTS = ["--queue-timeout", "--connect-timeout", "--prefill-timeout", "--first-token-timeout", "--idle-timeout",
            "--decode-timeout", "--health-interval", "--health-timeout", "--startup-timeout",
            "--chars-per-token-bound"]


@pytest.mark.parametrize("flag", TIMEOUTS)
@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_timeouts_and_bound_must_be_finite_and_above_zero(flag: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_argv([*URLS, flag, value], {})
    msg = str(info.value)
    assert msg.startswith(f"flags: {flag}: ") and value in msg
    assert f"fix: {flag} " in msg


@pytest.mark.parametrize("flag", TIMEOUTS)
def test_small_positive_timeouts_are_accepted(flag: str) -> None:
    config_from_argv([*URLS, flag, "0.5"], {})


@pytest.mark.parametrize("port", ["0", "70000", "-1"])
def test_listen_port_must_be_1_to_65535(port: str) -> None:
    with pytest.raises(ConfigError, match=rf"--port: {port} is outside 1\.\.65535"):
        config_from_argv([*URLS, "--port", port], {})
    assert config_from_argv([*URLS, "--port", "65535"], {}).port == 65535


@pytest.mark.parametrize(("flag", "value", "found"), [
    ("--max-inflight", "-1", "is negative"),
    ("--max-inflight-per-instance", "-1", "is negative"),
    ("--max-queue", "-1", "is negative"),
    ("--retries", "-1", "is negative"),
    ("--decode-only-below", "-1", "is negative"),
    ("--prefix-chars", "-1", "is negative"),
    ("--drain-seconds", "-1", "is negative"),
    ("--drain-seconds", "nan", "not a finite number"),
    ("--affinity-load-factor", "0.5", "is below 1"),
    ("--affinity-load-factor", "nan", "not a finite number"),
    ("--affinity-chunk-chars", "8", "is below 16"),
    ("--max-body-bytes", "10", "is below 1024"),
    ("--max-model-len", "0", "is below 1"),
])
def test_other_bounds(flag: str, value: str, found: str) -> None:
    with pytest.raises(ConfigError, match=found) as info:
        config_from_argv([*URLS, flag, value], {})
    assert str(info.value).startswith(f"flags: {flag}: {value}")


def test_zero_stays_allowed_where_it_means_off_or_now() -> None:
    cfg = config_from_argv([*URLS, "--max-inflight", "0", "--max-queue", "0", "--retries", "0",
                            "--drain-seconds", "0", "--decode-only-below", "0"], {})
    assert cfg.max_inflight == 0 and cfg.drain_seconds == 0


def test_env_value_is_named_by_its_variable() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_argv(URLS, {"PDSERVE_SCHEDULER_PORT": "99999"})
    assert str(info.value) == ("environment: PDSERVE_SCHEDULER_PORT: 99999 is outside 1..65535\n"
                               "  fix: export PDSERVE_SCHEDULER_PORT=8000 (a port from 1 to 65535)")
    with pytest.raises(ConfigError, match="environment: PDSERVE_STARTUP_TIMEOUT: 0 is not above 0"):
        config_from_argv(URLS, {"PDSERVE_STARTUP_TIMEOUT": "0"})
    with pytest.raises(ConfigError, match="environment: PDSERVE_DRAIN_SECONDS: nan is not a finite number"):
        config_from_argv(URLS, {"PDSERVE_DRAIN_SECONDS": "nan"})


def test_file_value_is_named_by_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text("idle_timeout: -1\n")
    with pytest.raises(ConfigError) as info:
        config_from_argv([*URLS, "--deploy-config", str(path)], {})
    assert str(info.value) == (f"{path}: idle_timeout: -1 is negative\n"
                               "  fix: write it as idle_timeout: 120 (a number of seconds above 0)")
    # a flag overriding the bad file value wins, and is what gets checked
    assert config_from_argv([*URLS, "--deploy-config", str(path), "--idle-timeout", "5"], {}).idle_timeout == 5


@pytest.mark.parametrize("flag", ["--prefill-url", "--decode-url"])
def test_instance_url_port_range(flag: str) -> None:
    argv = {"--prefill-url": ["127.0.0.1:9101"], "--decode-url": ["127.0.0.1:9102"]}
    argv[flag] = ["127.0.0.1:70000"]
    with pytest.raises(ConfigError, match=r"port 70000 is outside 1\.\.65535"):
        config_from_argv(["--prefill-url", *argv["--prefill-url"], "--decode-url", *argv["--decode-url"]], {})


def test_cli_prints_one_message_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    from pdserve.cli import main

    assert main(["scheduler", *URLS, "--chars-per-token-bound", "0"]) == 2
    err = capsys.readouterr().err
    assert "--chars-per-token-bound: 0 is not above 0" in err and "Traceback" not in err


def test_help_shows_defaults_and_groups() -> None:
    text = build_parser().format_help()
    flat = " ".join(text.split())
    d = SchedulerConfig(instances=[])
    for flag, value in (("--chars-per-token-bound", d.chars_per_token_bound), ("--connect-timeout", d.connect_timeout),
                        ("--prefill-timeout", d.prefill_timeout), ("--first-token-timeout", d.first_token_timeout),
                        ("--idle-timeout", d.idle_timeout), ("--decode-timeout", d.decode_timeout),
                        ("--health-interval", d.health_interval), ("--health-timeout", d.health_timeout),
                        ("--startup-timeout", d.startup_timeout), ("--retries", d.retries)):
        opt = next(o for o in OPTIONS if flag in o.flags)
        assert f"(default {value:g})" in opt.help, flag
    assert "(default 16)" in flat and "(default 600)" in flat
    groups = {o.dest: o.group for o in OPTIONS}
    assert groups["drain_seconds"] == "shutdown"
    assert groups["no_access_log"] != "timeouts (seconds)" and groups["retries"] != "timeouts (seconds)"
    access = text[text.index("access control:"):]
    access = access[:access.index("\n\n")]
    assert "--drain-seconds" not in access
