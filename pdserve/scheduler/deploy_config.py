"""The deployment file (``--config deploy.yaml`` / ``PDSERVE_CONFIG``): one YAML mapping whose
keys mirror the scheduler's flags (``max_inflight: 64`` for ``--max-inflight 64``; dashes or
underscores), plus three sections that have no single flag: ``defaults`` (sampling parameters),
``capture`` (data capture) and ``system_prompt``/``system_prompt_mode``.

The schema is a pydantic model generated from the flag table (:data:`config.OPTIONS`), with
unknown keys forbidden: a typo (``max_inflite``) stops start-up with a message that names the
file, the key, what was found and the fix (``did you mean max_inflight?``), rather than being
silently ignored. Precedence is flags > ``PDSERVE_*`` environment variables > this file >
built-in defaults.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model, field_validator

from pdserve.errors import ConfigError, ConfigErrors
from pdserve.scheduler.capture import CaptureSettings
from pdserve.scheduler.config import OPTIONS, Opt


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


StrList = Annotated[list[str], BeforeValidator(_as_list)]


class CaptureSection(BaseModel):
    """``capture:`` — see :mod:`pdserve.scheduler.capture`."""

    model_config = ConfigDict(extra="forbid")
    path: str
    sample_rate: float = Field(default=1.0, ge=0.0, le=1.0)
    max_bytes: int = Field(default=100 * 1024 * 1024, ge=0)
    backups: int = Field(default=5, ge=0)
    redact: StrList = Field(default_factory=list)
    redact_patterns: StrList = Field(default_factory=list)
    queue_size: int = Field(default=10000, ge=1)

    @field_validator("redact_patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"{p!r} is not a valid regular expression: {exc}") from None
        return patterns


def _field_type(o: Opt) -> Any:
    if o.choices:
        return Literal[o.choices]  # type: ignore[valid-type]
    return {"str": str, "int": int, "float": float, "bool": bool, "list": StrList}[o.kind]


_FILE_OPTS = [o for o in OPTIONS if o.in_file]
_fields: dict[str, Any] = {o.dest: (_field_type(o) | None, None) for o in _FILE_OPTS}
_fields.update(defaults=(dict[str, Any] | None, None), capture=(CaptureSection | None, None))
_DeployBase = create_model("_DeployBase", __config__=ConfigDict(extra="forbid"), **_fields)  # type: ignore[call-overload]


class DeployFile(_DeployBase):  # type: ignore[misc,valid-type]
    """A parsed deployment file; an empty one when no file is given."""

    def flag_values(self) -> dict[str, Any]:
        """dest → value of the flag-like keys the file sets."""
        return {o.dest: getattr(self, o.dest) for o in _FILE_OPTS if getattr(self, o.dest) is not None}


KNOWN_KEYS = sorted([o.dest for o in _FILE_OPTS] + ["defaults", "capture"])


def _normalise(obj: Any) -> Any:
    """``max-inflight`` → ``max_inflight`` in mapping keys (the flags' spelling is accepted too),
    except inside ``defaults`` whose keys are vLLM's sampling parameter names as they are."""
    if not isinstance(obj, dict):
        return obj
    out: dict[Any, Any] = {}
    for k, v in obj.items():
        key = k.replace("-", "_") if isinstance(k, str) else k
        out[key] = _normalise(v) if key == "capture" else v
    return out


def _example(o: Opt | None, key: str) -> str:
    if o is None:
        return f"{key}: <value>"
    sample = {"int": "8", "float": "1.5", "bool": "true", "str": "text", "list": "[a, b]"}[o.kind]
    if o.choices:
        sample = o.choices[0]
    return f"{key}: {sample}"


def _render(path: str, exc: ValidationError) -> ConfigError | ConfigErrors:
    by_dest = {o.dest: o for o in _FILE_OPTS}
    errors: list[ConfigError] = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc) or "<top level>"
        found = err.get("input")
        if err["type"] == "extra_forbidden":
            scope = KNOWN_KEYS if len(loc) == 1 else list(CaptureSection.model_fields)
            close = difflib.get_close_matches(loc[-1], scope, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            errors.append(ConfigError(path, key, "unknown key",
                                      f"{hint}remove it, or use one of: {', '.join(scope)}"))
            continue
        msg = err.get("msg", "invalid value")
        if loc and loc[0] == "capture":
            if err["type"] == "missing":
                fix = "give the file to write, e.g. capture: {path: /var/log/pdserve/capture.jsonl, sample_rate: 0.1}"
            else:
                fix = f"correct {key} ({msg}); e.g. sample_rate: 0.1, max_bytes: 104857600, backups: 5"
        else:
            o = by_dest.get(loc[0]) if loc else None
            fix = f"write it as {_example(o, loc[0] if loc else key)}" if o else f"correct {key} ({msg})"
        errors.append(ConfigError(path, key, f"{found!r}: {msg}", fix))
    return errors[0] if len(errors) == 1 else ConfigErrors(errors)


def parse_deploy_text(text: str, path: str = "<deploy config>") -> DeployFile:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(path, None, f"not valid YAML: {where}{problem}",
                          "fix the YAML syntax (keys as `name: value`, lists as `[a, b]`)") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, None, f"the file holds a {type(data).__name__}, not a mapping of keys",
                          "write one `key: value` per line, e.g. `max_inflight: 64`")
    try:
        deploy = DeployFile.model_validate(_normalise(data))
    except ValidationError as exc:
        raise _render(path, exc) from None
    if deploy.defaults:
        from pdserve.scheduler.features import check_defaults

        check_defaults(deploy.defaults, path)
    return deploy


def load_deploy_file(path: str) -> DeployFile:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError("--config", None, f"cannot read {path}: {exc.strerror or exc}",
                          "pass the path of an existing YAML file (or unset PDSERVE_CONFIG)") from None
    return parse_deploy_text(text, path)


def capture_settings(values: dict[str, Any], source: str) -> CaptureSettings:
    """Validated capture settings from the merged file section and --capture-* flags."""
    try:
        sec = CaptureSection.model_validate(values)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        key = "capture." + ".".join(str(p) for p in err["loc"])
        raise ConfigError(source, key, f"{err.get('input')!r}: {err.get('msg')}",
                          "e.g. --capture-path FILE --capture-sample-rate 0.1 (rate in 0..1)") from None
    return CaptureSettings(path=sec.path, sample_rate=sec.sample_rate, max_bytes=sec.max_bytes,
                           backups=sec.backups, redact=tuple(sec.redact), redact_patterns=tuple(sec.redact_patterns),
                           queue_size=sec.queue_size)
