"""vLLM's known shutdown noise, left out of a stopping daemon's log.

On every stop, vLLM 0.32 (CPU) prints ~60 lines that report nothing wrong: nanobind's leak report
for triton's bindings, ``resource_tracker`` warnings about its own shared memory, and, when its
output handler sees the engine core exit first, an ``EngineDeadError`` traceback. Operators read
them as a crash. Once the daemon has asked the server to stop, those lines (and only those) are
counted instead of printed; a traceback is held until its last line shows what it is, and printed
in full unless it is that ``EngineDeadError``. Nothing is hidden before the stop, and the
daemon's failure report (the last lines of the log) still has every line.
"""

from __future__ import annotations

import re

SHOW_ENV = "PDSERVE_SHOW_SHUTDOWN_NOISE"

_NOISE = re.compile(
    r"nanobind: |^ - leaked |^ - \.\.\. skipped remainder|^See https://nanobind\.readthedocs\.io"
    r"|resource_tracker: There appear to be \d+ leaked|^\s+warnings\.warn\('resource_tracker: ")
_HANDLER_FAILED = "AsyncLLM output_handler failed"  # the log record that carries the EngineDeadError
_TRACEBACK = "Traceback (most recent call last):"
_ENGINE_DEAD = "EngineDeadError"
_MAX_HELD = 400  # a traceback longer than this is printed as it comes
# vLLM prefixes every line of a multi-line log record: "(APIServer pid=7) ERROR 11-25 03:00:53 [f.py:9] "
_VLLM_PREFIX = re.compile(r"^(\(\w+ pid=\d+\) )?(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ \S+ \[[^\]]*\] ")


class ShutdownNoise:
    """A line filter for the log tee: ``lines(line)`` returns the lines to print now."""

    def __init__(self) -> None:
        self.stopping = False
        self.hidden = 0
        self.kinds: dict[str, None] = {}  # what was left out, in order of first appearance
        self._held: list[str] = []  # a traceback seen while stopping, until its last line

    def lines(self, line: str) -> list[str]:
        if not self.stopping:
            return [line]
        if self._held:
            self._held.append(line)
            if _ends_traceback(line):
                held, self._held = self._held, []
                if _ENGINE_DEAD in line:
                    self.hidden += len(held)
                    self.kinds["an EngineDeadError traceback after the engine stopped"] = None
                    return []
                return held
            if len(self._held) > _MAX_HELD:
                held, self._held = self._held, []
                return held
            return []
        if _VLLM_PREFIX.sub("", line).startswith(_TRACEBACK):
            self._held = [line]
            return []
        if _HANDLER_FAILED in line:  # held like a traceback: its own traceback follows
            self._held = [line]
            return []
        if _NOISE.search(line):
            self.hidden += 1
            self.kinds["resource_tracker warnings" if "resource_tracker" in line else "nanobind leak reports"] = None
            return []
        return [line]

    def flush(self) -> list[str]:
        """What is still held when the output ends (a traceback that never finished)."""
        held, self._held = self._held, []
        return held

    def summary(self, name: str) -> str | None:
        if not self.hidden:
            return None
        return (f"pdserve serve: {name}: left out {self.hidden} lines of vLLM's usual shutdown noise "
                f"({', '.join(self.kinds)}); {SHOW_ENV}=1 shows them")


def _ends_traceback(line: str) -> bool:
    """The exception line that closes a traceback: ``pkg.module.SomeError: message`` at column 0
    (frames and source lines are indented; vLLM's log prefix may precede it)."""
    return bool(re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", _VLLM_PREFIX.sub("", line)))
