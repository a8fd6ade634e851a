"""Reading and writing ranktable files, with errors an operator can act on.

JSON syntax errors carry line/column; pydantic errors are turned into :class:`ConfigError`
with the JSON path of the field (``server_group_list[1].server_list[0].device[1].rank_id``),
what was found and how to fix it -- a raw pydantic dump is never shown.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from pdserve.errors import ConfigError, ConfigErrors
from pdserve.ranktable.schema import GlobalRanktable, LocalRanktable

M = TypeVar("M", bound=BaseModel)

_JSON_TYPE = {str: "string", int: "number", float: "number", bool: "boolean", list: "array",
              dict: "object", type(None): "null"}


def json_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """``('server_group_list', 1, 'group_id')`` -> ``server_group_list[1].group_id``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<top level>"


def describe(value: Any) -> str:
    """A short, JSON-flavoured description of a found value, e.g. ``number 4``."""
    kind = _JSON_TYPE.get(type(value), type(value).__name__)
    text = json.dumps(value, ensure_ascii=False) if kind not in ("object", "array") else kind
    if len(text) > 60:
        text = text[:57] + "..."
    return text if kind in ("object", "array") else f"{kind} {text}"


def _fields_of(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Known keys of the object at ``loc`` (used to suggest a fix for an unknown key)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if hasattr(current, "model_fields") else None
        if field is None:
            return []
        ann = field.annotation
        # unwrap list[X] | None down to the model class X
        for _ in range(3):
            args = getattr(ann, "__args__", None)
            if not args:
                break
            ann = next((a for a in args if a is not type(None)), ann)
        current = ann
    return list(getattr(current, "model_fields", {}))


def pydantic_errors(exc: ValidationError, source: str, model: type[BaseModel]) -> ConfigErrors:
    """Translate each pydantic error into a ConfigError naming file, JSON path, found and fix."""
    errors: list[ConfigError] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = json_path(loc)
        kind = err["type"]
        value = err.get("input")
        key = loc[-1] if loc else ""
        if kind == "string_type":
            example = json.dumps(str(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else '"4"'
            errors.append(ConfigError(source, path, f"{describe(value)}, expected a string",
                                      f"write it as a string, e.g. {example} (all ranktable values are strings)"))
        elif kind == "missing":
            errors.append(ConfigError(source, path, f"missing key {key!r}",
                                      f"add \"{key}\" to this object (see DESIGN.md, 'Files and their formats')"))
        elif kind == "extra_forbidden":
            known = ", ".join(_fields_of(model, loc)) or "see DESIGN.md"
            errors.append(ConfigError(source, path, f"unknown key {key!r}",
                                      f"remove it or fix its spelling (known keys here: {known})"))
        elif kind in ("list_type",):
            errors.append(ConfigError(source, path, f"{describe(value)}, expected an array",
                                      "write it as a JSON array [...]"))
        elif kind in ("model_type", "dict_type", "model_attributes_type"):
            errors.append(ConfigError(source, path, f"{describe(value)}, expected an object",
                                      "write it as a JSON object {...}"))
        else:  # not expected with these models, but never show a raw dump
            errors.append(ConfigError(source, path, f"{describe(value)}: {err['msg']}",
                                      "correct this value (see DESIGN.md, 'Files and their formats')"))
    return ConfigErrors(errors)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file; a missing file or bad syntax is a ConfigError with line/column."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, None, "file not found",
                          "check the path (generate it with `pdserve ranktable gen`)") from None
    except IsADirectoryError:
        raise ConfigError(source, None, "is a directory, not a file",
                          "give the path of the JSON file itself") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, None, f"cannot read: {exc}", "check the file and its permissions") from None
    if not text.strip():
        raise ConfigError(source, None, "file is empty", "regenerate it with `pdserve ranktable gen`")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(source, f"line {exc.lineno} column {exc.colno}", f"invalid JSON: {exc.msg}",
                          "fix the JSON syntax there (a truncated copy? regenerate the file)") from None


def parse_model(data: Any, model: type[M], source: str) -> M:
    """Validate already-parsed JSON against a schema model, converting the errors."""
    if not isinstance(data, dict):
        raise ConfigError(source, "<top level>", f"{describe(data)}, expected an object",
                          "the file must hold one JSON object {...}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise pydantic_errors(exc, source, model) from None


def read_global(path: str | os.PathLike[str]) -> GlobalRanktable:
    """Schema-only load (no cross-field rules); see :func:`load_global` for the full check."""
    return parse_model(read_json(path), GlobalRanktable, str(path))


def read_local(path: str | os.PathLike[str]) -> LocalRanktable:
    return parse_model(read_json(path), LocalRanktable, str(path))


def to_dict(rt: BaseModel) -> dict[str, Any]:
    return rt.model_dump(mode="json")


def dumps(rt: BaseModel) -> str:
    """The on-disk form: 4-space indented JSON, key order of the models, trailing newline."""
    return json.dumps(to_dict(rt), indent=4, ensure_ascii=False) + "\n"


def write(rt: BaseModel, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(rt), encoding="utf-8")
    os.replace(tmp, path)  # never leave a half-written ranktable behind
    return path


def digest(rt: GlobalRanktable) -> str:
    """Short fingerprint of a global ranktable (same content -> same digest on every host)."""
    canonical = json.dumps(to_dict(rt), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def load_global(path: str | os.PathLike[str]) -> GlobalRanktable:
    """Load and fully validate a global ranktable (raises ConfigError / ConfigErrors)."""
    from pdserve.ranktable.checks import check_global

    rt = read_global(path)
    errors, _warnings = check_global(rt, str(path))
    if errors:
        raise ConfigErrors(errors)
    return rt


def load_local(path: str | os.PathLike[str]) -> LocalRanktable:
    """Load and validate a local ranktable (one server, group "0")."""
    from pdserve.ranktable.checks import check_local

    rt = read_local(path)
    errors = check_local(rt, str(path))
    if errors:
        raise ConfigErrors(errors)
    return rt
