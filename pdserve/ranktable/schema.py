"""Pydantic models of the AscendCloud-compatible ranktable files.

The models only describe the *shape* of the files (keys, nesting, every value a JSON string);
the rules between fields (three groups, one scheduler, rank ids 0..n-1, ...) live in
:mod:`pdserve.ranktable.checks` so that all of them can be reported at once.

All values are strict strings because that is what HCCL and the AscendCloud tooling read: a
JSON number where a string is expected is an error, not silently converted.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictStr, model_serializer


class _Strict(BaseModel):
    # unknown keys are almost always typos ("devices", "rankid"); reject them with a clear error
    model_config = ConfigDict(extra="forbid", frozen=True)


class Device(_Strict):
    """One accelerator (NPU/GPU index or, on CPU hosts, a CPU core id) of an instance."""

    device_id: StrictStr
    device_ip: StrictStr
    rank_id: StrictStr


class Server(_Strict):
    """One instance: a host plus (for prefill/decode) its devices; the scheduler has none."""

    server_id: StrictStr
    server_ip: StrictStr
    device: list[Device] | None = None

    @model_serializer(mode="wrap")
    def _omit_missing_device(self, handler: Any) -> dict[str, Any]:
        # the scheduler entry has no "device" key at all in AscendCloud files; keep it that way
        data = handler(self)
        if self.device is None:
            data.pop("device", None)
        return data


class ServerGroup(_Strict):
    """Group "0" scheduler, "1" prefill instances, "2" decode instances."""

    group_id: StrictStr
    server_count: StrictStr
    server_list: list[Server]


class GlobalRanktable(_Strict):
    """The whole deployment: exactly three groups (see checks for the rules)."""

    version: StrictStr = "1.0"
    status: StrictStr = "completed"
    server_group_list: list[ServerGroup]


class LocalRanktable(_Strict):
    """The ranktable of one instance (or of the scheduler): one server, group "0"."""

    version: StrictStr = "1.0"
    status: StrictStr = "completed"
    group_id: StrictStr = "0"
    server_count: StrictStr = "1"
    server_list: list[Server]


GROUP_SCHEDULER = "0"
GROUP_PREFILL = "1"
GROUP_DECODE = "2"
GROUP_ROLES = {GROUP_SCHEDULER: "scheduler", GROUP_PREFILL: "prefill", GROUP_DECODE: "decode"}
