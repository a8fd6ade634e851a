"""Reading and writing ranktable files, with errors an operator can act on.

JSON syntax errors carry line/column; pydantic errors are turned into :class:`ConfigError`
with the JSON path of the field (``server_group_list[1].server_list[0].device[1].rank_id``),
what was found and how to fix it -- a raw pydantic dump is never shown.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from pdserve.errors import ConfigError, ConfigErrors
from pdserve.ranktable.schema import GlobalRanktable, LocalRanktable

M = TypeVar("M", bound=BaseModel)

# where the file format is described for the user (README.md is the user's manual)
FORMAT_DOC = "see README.md, section 'Ranktables'"

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
                                      f"add \"{key}\" to this object ({FORMAT_DOC})"))
        elif kind == "extra_forbidden":
            known = ", ".join(_fields_of(model, loc))
            errors.append(ConfigError(source, path, f"unknown key {key!r}",
                                      f"remove it or fix its spelling ({'known keys here: ' + known if known else FORMAT_DOC})"))
        elif kind in ("list_type",):
            errors.append(ConfigError(source, path, f"{describe(value)}, expected an array",
                                      "write it as a JSON array [...]"))
        elif kind in ("model_type", "dict_type", "model_attributes_type"):
            errors.append(ConfigError(source, path, f"{describe(value)}, expected an object",
                                      "write it as a JSON object {...}"))
        else:  # not expected with these models, but never show a raw dump
            errors.append(ConfigError(source, path, f"{describe(value)}: {err['msg']}",
                                      f"correct this value ({FORMAT_DOC})"))
    return ConfigErrors(errors)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file; a missing file or bad syntax is a ConfigError with line/column."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a BOM from a Windows editor is harmless
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
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise ConfigError(source, None, f"key {exc.args[0]!r} appears twice in one object (JSON would keep "
                          "only the last one, silently)", "remove one of them") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(source, f"line {exc.lineno} column {exc.colno}", f"invalid JSON: {exc.msg}",
                          "fix the JSON syntax there (a truncated copy? regenerate the file)") from None


def _check_object(data: Any, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(source, "<top level>", f"{describe(data)}, expected an object",
                          "the file must hold one JSON object {...}")


def parse_model(data: Any, model: type[M], source: str) -> M:
    """Validate already-parsed JSON against a schema model, converting the errors."""
    _check_object(data, source)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise pydantic_errors(exc, source, model) from None


def _repairable(err: Any) -> bool:
    """An unknown key, or a JSON number where a string belongs: the rest of the file can still be read."""
    value = err.get("input")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return bool(err["loc"]) and (err["type"] == "extra_forbidden" or err["type"] == "string_type" and number)


def _repaired(data: Any, exc: ValidationError) -> Any | None:
    """A copy of ``data`` without its unknown keys and with numbers written as strings, or None
    when the file has other shape errors (then the rules between fields cannot be checked)."""
    if not all(_repairable(err) for err in exc.errors()):
        return None
    fixed = copy.deepcopy(data)
    for err in exc.errors():
        *parents, last = err["loc"]
        holder = functools.reduce(lambda obj, part: obj[part], parents, fixed)
        if err["type"] == "extra_forbidden":
            del holder[last]
        else:
            holder[last] = str(err["input"])
    return fixed


def parse_model_all(data: Any, model: type[M], source: str) -> tuple[M | None, list[ConfigError]]:
    """Like :func:`parse_model` but returns the schema errors instead of raising, together with a
    model when the only problems are unknown keys or numbers for strings, so that ``validate`` can
    still run the rules between fields and report every problem of the file at once."""
    _check_object(data, source)
    try:
        return model.model_validate(data), []
    except ValidationError as exc:
        errors = pydantic_errors(exc, source, model).errors
        fixed = _repaired(data, exc)
        if fixed is None:
            return None, errors
        try:
            return model.model_validate(fixed), errors
        except ValidationError:
            return None, errors


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


def ensure_dir(folder: Path, flag: str = "--save-dir") -> Path:
    """Create the output folder up front, so a bad ``--save-dir`` is one message, not a traceback."""
    folder = Path(folder)
    example = f"{flag} ./save_dir" if flag == "--save-dir" else f"{flag} /tmp/pdserve-run"
    if folder.exists() and not folder.is_dir():
        raise ConfigError(flag, str(folder), "is an existing file, not a directory",
                          f"give a directory (it is created if missing), e.g. {example}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(flag, str(folder), f"cannot create this directory ({exc.strerror or exc})",
                          f"give a directory you can write to (it is created if missing), e.g. {example}") from None
    return folder


def write(rt: BaseModel, path: Path) -> Path:
    """Write atomically; an unwritable folder or full disk is a ConfigError naming the file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(dumps(rt), encoding="utf-8")
        os.replace(tmp, path)  # never leave a half-written ranktable behind
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(str(path), None, f"cannot write the file ({exc.strerror or exc})",
                          "write to a directory you can write to that has free space "
                          "(--save-dir / --run-dir)") from None
    return path


def digest(rt: GlobalRanktable) -> str:
    """Short fingerprint of a global ranktable (same content -> same digest on every host)."""
    canonical = json.dumps(to_dict(rt), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def read_global_all(path: str | os.PathLike[str]) -> tuple[GlobalRanktable | None, list[ConfigError]]:
    """Schema check of a global ranktable that returns its errors (see :func:`parse_model_all`)."""
    return parse_model_all(read_json(path), GlobalRanktable, str(path))


def read_local_all(path: str | os.PathLike[str]) -> tuple[LocalRanktable | None, list[ConfigError]]:
    return parse_model_all(read_json(path), LocalRanktable, str(path))


def load_global(path: str | os.PathLike[str]) -> GlobalRanktable:
    """Load and fully validate a global ranktable (raises ConfigError / ConfigErrors)."""
    from pdserve.ranktable.checks import check_global

    rt, errors = read_global_all(path)
    if rt is not None:
        errors += check_global(rt, str(path))[0]
    if errors or rt is None:
        raise ConfigErrors(errors)
    return rt


def load_local(path: str | os.PathLike[str]) -> LocalRanktable:
    """Load and validate a local ranktable (one server, group "0")."""
    from pdserve.ranktable.checks import check_local

    rt, errors = read_local_all(path)
    if rt is not None:
        errors += check_local(rt, str(path))
    if errors or rt is None:
        raise ConfigErrors(errors)
    return rt
