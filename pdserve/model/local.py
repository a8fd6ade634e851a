"""The ``--model`` of ``pdserve up`` and ``pdserve serve``: a local model folder, never a hub id.

pdserve never downloads from a model hub. vLLM takes a ``--model`` that is not a folder for a
hub repo id and, offline or with a typo, ends in a long ``OSError: Repo id must be in the form
...`` traceback after the daemons have started; this check turns that into one message before
anything starts.
"""

from __future__ import annotations

from pathlib import Path

from pdserve.errors import ConfigError

MODEL_CONFIG = "config.json"  # what makes a folder a Hugging Face model folder vLLM can load


def _fix(flag: str) -> str:
    return (f"pass the local folder of a Hugging Face model (the one holding {MODEL_CONFIG}), e.g. "
            f"{flag} /models/qwen; pdserve never downloads from a model hub. To try pdserve, "
            "`pdserve model demo` builds the demo model and prints its folder (`pdserve up --demo` uses it)")


def check_local_model(model: str | None, flag: str = "--model", source: str = "flags") -> Path:
    """The model folder ``model`` names; a ConfigError naming ``flag`` unless it is an existing
    local folder with a config.json."""
    if not model or not model.strip():
        raise ConfigError(source, flag, "no model given", _fix(flag))
    path = Path(model).expanduser()
    if not path.exists():
        hub = "" if model.startswith(("/", ".", "~")) else " (it looks like a model hub id)"
        raise ConfigError(source, flag, f"{model!r} is not an existing folder{hub}", _fix(flag))
    if not path.is_dir():
        raise ConfigError(source, flag, f"{model!r} is a file, not a model folder", _fix(flag))
    if not (path / MODEL_CONFIG).is_file():
        raise ConfigError(source, flag, f"{model!r} has no {MODEL_CONFIG}, so it is not a model folder",
                          _fix(flag))
    return path
