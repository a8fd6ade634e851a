"""JSON on the hot path: pydantic-core's Rust parser/serializer, with the stdlib as the fallback.

Every request is parsed once (the client body) and serialised up to twice (the prefill body, the
kv_transfer_params spliced into the decode body), and the prefill and decode answers are parsed.
``pydantic_core.from_json``/``to_json`` do this 3-5x faster than the ``json`` module and are
already installed (pydantic is a core dependency), so no new dependency is needed. The output is
the same compact, UTF-8 (not \\u-escaped) JSON pydantic's ``model_dump_json`` gives, which is what
vLLM emits. The stdlib takes over for the inputs pydantic-core refuses and ``json`` accepts (a
lone UTF-16 surrogate escape such as ``"\\ud800"``, a UTF-8 BOM), so behaviour does not change.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic_core import from_json, to_json


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes, key order kept."""
    try:
        return to_json(obj)
    except Exception:  # lone surrogates (valid in a Python str, not in UTF-8): escape them
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode()


def loads(data: bytes | str) -> Any:
    """Parse JSON; raises ValueError (or RecursionError) like :func:`json.loads`."""
    try:
        return from_json(data)
    except ValueError:
        return json.loads(data)
