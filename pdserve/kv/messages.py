"""Side-channel wire format: one msgpack header frame, then raw payload frames.

Kept tiny and explicit (like SGLang's disaggregation ``conn`` state machine): every message has
an ``op``; pulls carry a transfer id so a late reply to an abandoned pull is recognised and
dropped instead of being mistaken for the answer to the next one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import msgpack

OP_PULL = "pull"  # decode → prefill: send me these blocks of this request
OP_DONE = "done"  # decode → prefill: I have them (or gave up); free the lease
OP_RELEASE = "release"  # decode → prefill: I will not pull (prefix hit / aborted); free the lease
OP_REPLY = "reply"  # prefill → decode: answer to a pull (payload frames follow for tcp)


class ProtocolError(RuntimeError):
    """A malformed or unexpected side-channel message."""


@dataclass
class PullRequest:
    xfer_id: str
    req_id: str  # the prefill instance's request id (remote_request_id)
    block_ids: list[int]  # prefill-side block ids to send, in order
    transport: str
    layout: str  # fingerprint of the decode side's KV layout, must equal the prefill side's
    tp_rank: int = 0
    peer: str = ""  # decode engine id, for logs and torch_dist pairing
    op: str = OP_PULL
    hints: dict[str, Any] = field(default_factory=dict)  # transport-specific (shm: "cma")


@dataclass
class PullReply:
    xfer_id: str
    ok: bool
    error: str = ""
    nbytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # transport-specific (shm name, tag...)
    op: str = OP_REPLY


@dataclass
class Done:
    xfer_id: str
    req_id: str
    ok: bool = True
    op: str = OP_DONE


@dataclass
class Release:
    req_id: str
    reason: str = ""
    op: str = OP_RELEASE


_TYPES: dict[str, type] = {OP_PULL: PullRequest, OP_REPLY: PullReply, OP_DONE: Done, OP_RELEASE: Release}
_FIELDS: dict[type, frozenset[str]] = {cls: frozenset(f.name for f in fields(cls))
                                       for cls in _TYPES.values()}


def encode(msg: PullRequest | PullReply | Done | Release) -> bytes:
    # vars(), not dataclasses.asdict: no deep copy (asdict cost ~30 us a message, per pull x3)
    raw = vars(msg)
    if "hints" in raw and not raw["hints"]:  # omitted when empty: older peers do not know it
        raw = {k: v for k, v in raw.items() if k != "hints"}
    return msgpack.packb(raw, use_bin_type=True)


def decode(data: bytes | memoryview) -> PullRequest | PullReply | Done | Release:
    try:
        raw = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable side-channel header: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("op") not in _TYPES:
        raise ProtocolError(f"unknown side-channel message: {str(raw)[:200]}")
    cls = _TYPES[raw["op"]]
    # fields this version does not know are ignored (a newer peer's additions, e.g. pull hints):
    # mixed versions keep working, the newer side just does not get what it asked for
    known = _FIELDS[cls]
    try:
        msg = cls(**{k: v for k, v in raw.items() if k in known})
    except TypeError as exc:
        raise ProtocolError(f"bad {raw['op']} message: {exc}") from exc
    for f in fields(cls):  # a peer must not crash the server thread with a wrongly typed field
        value, check = getattr(msg, f.name), _CHECKS.get(str(f.type))
        if check is not None and not check(value):
            raise ProtocolError(f"bad {raw['op']} message: field {f.name} = {str(value)[:80]!r}")
    return msg


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_CHECKS = {
    "str": lambda v: isinstance(v, str),
    "int": _is_int,
    "bool": lambda v: isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "list[int]": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
    "dict[str, Any]": lambda v: isinstance(v, dict),
}
