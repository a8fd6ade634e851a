"""Which of vLLM's lines a stopping daemon leaves out (``ShutdownNoise``), line by line."""

from __future__ import annotations

import pytest

from pdserve.worker.shutdown_noise import ShutdownNoise

pytestmark = pytest.mark.unit

P = "(APIServer pid=7) ERROR 11-25 03:00:53 [async_llm.py:906] "  # vLLM prefixes every line of a record
HANDLER = [P + "AsyncLLM output_handler failed.", P + "Traceback (most recent call last):",
           P + '  File "/v/async_llm.py", line 860, in output_handler',
           P + "    outputs = await engine_core.get_output_async()",
           P + "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue."]


def run(lines: list[str], stopping: bool = True) -> tuple[list[str], ShutdownNoise]:
    f = ShutdownNoise()
    f.stopping = stopping
    shown = [out for line in lines for out in f.lines(line)]
    return shown + f.flush(), f


def test_the_output_handlers_engine_dead_record_is_left_out() -> None:
    shown, f = run(HANDLER)
    assert shown == [] and f.hidden == 5 and list(f.kinds) == ["an EngineDeadError traceback after the engine stopped"]


def test_nothing_is_left_out_before_the_stop() -> None:
    lines = [*HANDLER, "nanobind: leaked 4 instances!"]
    assert run(lines, stopping=False)[0] == lines


def test_the_output_handlers_record_with_another_error_is_printed_whole() -> None:
    record = [*HANDLER[:-1], P + "RuntimeError: something real"]
    assert run(record)[0] == record


def test_another_records_engine_dead_traceback_is_printed() -> None:
    q = "(APIServer pid=7) ERROR 11-25 03:00:53 [serving.py:120] "
    record = [q + "Error in chat completion stream generator.", q + "Traceback (most recent call last):",
              q + "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue."]
    assert run(record)[0] == record


def test_lines_of_other_processes_pass_while_the_record_is_held() -> None:
    root_cause = "(EngineCore pid=9) ERROR 11-25 03:00:53 [core.py:1] the real root cause"
    shown, f = run([*HANDLER[:2], root_cause, "Traceback (most recent call last):", "ValueError: x", *HANDLER[2:]])
    assert shown == [root_cause, "Traceback (most recent call last):", "ValueError: x"] and f.hidden == 5


def test_a_record_that_never_ends_is_printed_at_the_end() -> None:
    assert run(HANDLER[:3])[0] == HANDLER[:3]


def test_nanobind_and_resource_tracker_lines_are_counted() -> None:
    noise = ["nanobind: leaked 4 instances!", ' - leaked instance 0x7f of type "triton._C.libtriton.ir.attribute"',
             " - ... skipped remainder", "nanobind: this is likely caused by a reference counting issue.",
             "/usr/lib/python3.11/multiprocessing/resource_tracker.py:254: UserWarning: resource_tracker: There "
             "appear to be 2 leaked shared_memory objects to clean up at shutdown",
             "  warnings.warn('resource_tracker: There appear to be %d '"]
    shown, f = run(noise)
    assert shown == [] and f.hidden == 6
    assert f.summary("decode0") == ("pdserve serve: decode0: left out 6 lines of vLLM's usual shutdown noise "
                                    "(nanobind leak reports, resource_tracker warnings); "
                                    "PDSERVE_SHOW_SHUTDOWN_NOISE=1 shows them")


def test_what_is_glued_to_nanobinds_last_line_is_filtered_on_its_own() -> None:
    url = "See https://nanobind.readthedocs.io/en/latest/refleaks.html"
    shown, f = run([url + "/x/resource_tracker.py:254: UserWarning: resource_tracker: There appear to be 2 leaked",
                    url + "ERROR a real line", url])
    assert shown == ["ERROR a real line"] and f.hidden == 2


def test_no_summary_when_nothing_was_left_out() -> None:
    assert run(["INFO: Shutting down"])[1].summary("prefill0") is None
