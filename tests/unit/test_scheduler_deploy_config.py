"""The deployment file: schema, precedence (flags > env > file > defaults) and readable errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.errors import ConfigError, ConfigErrors
from pdserve.scheduler.config import config_from_argv
from pdserve.scheduler.deploy_config import parse_deploy_text

pytestmark = pytest.mark.unit

URLS = ["--prefill-url", "127.0.0.1:9101", "--decode-url", "127.0.0.1:9102"]

FULL = """
# a deployment of the demo model
port: 9000
served_model_name: [chat-model, gpt-4o-mini]
max-inflight: 64            # dashes like the flags work too
prefill_policy: prefix-affinity
decode_only_below: 32
decode_only_uncached_below: 64
api_key: [sk-a]
defaults:
  temperature: 0.7
  top_p: 0.95
  max_tokens: 512
  stop: ["###"]
system_prompt: "You are a helpful assistant."
system_prompt_mode: prepend
capture:
  path: /tmp/pdserve-capture/capture.jsonl
  sample_rate: 0.25
  max_bytes: 1048576
  backups: 3
  redact: [messages]
  redact_patterns: ['\\b\\d{16}\\b']
  queue_size: 100
"""


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "deploy.yaml"
    p.write_text(text)
    return str(p)


def test_full_file_maps_onto_the_config(tmp_path: Path) -> None:
    cfg = config_from_argv([*URLS, "--deploy-config", write(tmp_path, FULL)], {})
    assert cfg.port == 9000 and cfg.max_inflight == 64
    assert cfg.served_model_names == ["chat-model", "gpt-4o-mini"]
    assert cfg.decode_only_below == 32 and cfg.decode_only_uncached_below == 64
    assert cfg.api_keys == ["sk-a"]
    assert cfg.defaults == {"temperature": 0.7, "top_p": 0.95, "max_tokens": 512, "stop": ["###"]}
    assert cfg.system_prompt == "You are a helpful assistant." and cfg.system_prompt_mode == "prepend"
    assert cfg.capture is not None and cfg.capture.sample_rate == 0.25 and cfg.capture.backups == 3
    assert cfg.capture.redact == ("messages",) and cfg.capture.redact_patterns == (r"\b\d{16}\b",)
    assert "sk-a" not in repr(cfg)


def test_flags_override_env_override_file(tmp_path: Path) -> None:
    path = write(tmp_path, "port: 9000\nmax_inflight: 64\nmax_queue: 7\ndefaults: {temperature: 0.7, top_k: 5}\n")
    env = {"PDSERVE_CONFIG": path, "PDSERVE_MAX_INFLIGHT": "32", "PDSERVE_SCHEDULER_PORT": "9100"}
    cfg = config_from_argv([*URLS, "--port", "9200", "--default-temperature", "0.1"], env)
    assert cfg.port == 9200  # flag over env over file
    assert cfg.max_inflight == 32  # env over file
    assert cfg.max_queue == 7  # file over built-in default
    assert cfg.defaults == {"temperature": 0.1, "top_k": 5}  # per key
    cfg = config_from_argv([*URLS, "--default", "stop=[\"x\"]", "--default", "seed=3"], {"PDSERVE_CONFIG": path})
    assert cfg.defaults == {"temperature": 0.7, "top_k": 5, "stop": ["x"], "seed": 3}


def test_serve_command_line_leaves_config_to_vllm(tmp_path: Path) -> None:
    vllm_yaml = write(tmp_path, "tensor_parallel_size: 2\n")  # vLLM's own --config file
    cfg = config_from_argv([*URLS, "--config", vllm_yaml, "--enforce-eager"], {})
    assert cfg.config_file is None


def test_api_keys_union_of_sources(tmp_path: Path) -> None:
    keyfile = tmp_path / "keys"
    keyfile.write_text("# team keys\nsk-file-1\n\nsk-file-2\n")
    env = {"PDSERVE_API_KEYS": "sk-env-1, sk-env-2", "PDSERVE_API_KEY_FILE": str(keyfile)}
    cfg = config_from_argv([*URLS, "--api-key", "sk-flag", "--api-key", "sk-env-1"], env)
    assert cfg.api_keys == ["sk-flag", "sk-env-1", "sk-env-2", "sk-file-1", "sk-file-2"]
    with pytest.raises(ConfigError, match="cannot read"):
        config_from_argv(URLS, {"PDSERVE_API_KEY_FILE": str(tmp_path / "missing")})


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    path = write(tmp_path, "max_inflite: 8\n")
    with pytest.raises(ConfigError) as exc:
        config_from_argv([*URLS, "--deploy-config", path], {})
    msg = str(exc.value)
    assert msg.startswith(f"{path}: max_inflite: unknown key") and "did you mean max_inflight?" in msg


@pytest.mark.parametrize("text, key, found, fix", [
    ("max_inflight: lots\n", "max_inflight", "'lots'", "max_inflight: 8"),
    ("decode_policy: random\n", "decode_policy", "'random'", "decode_policy: prefix-affinity"),
    ("capture: {path: /tmp/x.jsonl, sample_rate: 2}\n", "capture.sample_rate", "2", "capture"),
    ("capture: {sample_rate: 0.5}\n", "capture.path", "", "capture: {path:"),
    ("capture: {path: /tmp/x, redact_patterns: ['(']}\n", "capture.redact_patterns", "(", "correct"),
    ("capture: {path: /tmp/x, samplerate: 1}\n", "capture.samplerate", "unknown key", "did you mean sample_rate"),
    ("defaults: {temperature: -1}\n", "defaults.temperature", "-1", "temperature in [0, 2]"),
    ("defaults: {model: other}\n", "defaults.model", "not a sampling default", "remove model"),
    ("system_prompt_mode: always\n", "system_prompt_mode", "'always'", "if-missing"),
])
def test_bad_values_name_file_key_found_fix(tmp_path: Path, text: str, key: str, found: str, fix: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        config_from_argv([*URLS, "--deploy-config", path], {})
    e = exc.value
    assert e.source == path and e.field == key, str(e)
    assert found in e.found and fix in e.fix, str(e)


def test_several_bad_keys_reported_together() -> None:
    with pytest.raises(ConfigErrors) as exc:
        parse_deploy_text("port: x\nretries: y\n", "d.yaml")
    assert [e.field for e in exc.value.errors] == ["port", "retries"]


def test_yaml_syntax_and_shape_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not valid YAML: line 2"):
        parse_deploy_text("port: 1\n  bad: [\n", "d.yaml")
    with pytest.raises(ConfigError, match="not a mapping"):
        parse_deploy_text("- a\n- b\n", "d.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        config_from_argv([*URLS, "--deploy-config", str(tmp_path / "nope.yaml")], {})
    assert parse_deploy_text("", "empty.yaml").flag_values() == {}


def test_capture_flags_without_path_rejected() -> None:
    with pytest.raises(ConfigError, match="capture settings given without a file"):
        config_from_argv([*URLS, "--capture-sample-rate", "0.5"], {})
    cfg = config_from_argv([*URLS, "--capture-path", "/tmp/c.jsonl", "--capture-redact", "prompt"], {})
    assert cfg.capture is not None and cfg.capture.path == "/tmp/c.jsonl" and cfg.capture.redact == ("prompt",)


def test_env_values_checked() -> None:
    with pytest.raises(ConfigError, match="PDSERVE_DRAIN_SECONDS"):
        config_from_argv(URLS, {"PDSERVE_DRAIN_SECONDS": "soon"})
    with pytest.raises(ConfigError, match="PDSERVE_DECODE_POLICY"):
        config_from_argv(URLS, {"PDSERVE_DECODE_POLICY": "random"})
    assert config_from_argv(URLS, {"PDSERVE_DRAIN_SECONDS": "5"}).drain_seconds == 5


def test_cli_bad_file_exits_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import pdserve.cli as cli

    monkeypatch.setattr(cli, "_COMMAND_MODULES", ("pdserve.scheduler.cli",))  # others are built in parallel
    path = write(tmp_path, "max_queue: many\n")
    code = cli.main(["scheduler", *URLS, "--config", path])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{path}: max_queue:" in err and "fix:" in err


@pytest.mark.parametrize("url", ["127.0.0.1:²", "127.0.0.1", "http://127.0.0.1:80a/"])
def test_instance_url_without_a_numeric_port_is_a_config_error(url: str) -> None:
    """A port of Unicode digits ('²' passes str.isdigit) is refused like any other non-port."""
    with pytest.raises(ConfigError) as exc:
        config_from_argv(["--prefill-url", url, "--decode-url", "127.0.0.1:9102"], {})
    assert exc.value.source == "--prefill-url" and "is not HOST:PORT" in exc.value.found
