"""Failures are contained where untrusted input enters: counted by boundary and reason,
told once per thing, and in strict mode (the tests) a bug still fails."""

from __future__ import annotations

import threading

import pytest

from bpfprof.symbolizer import containment
from bpfprof.symbolizer.containment import Failures
from bpfprof.symbolizer.errors import MalformedInput, TooLarge
from bpfprof.symbolizer.process_memory import UnreadableMemory


def test_input_failures_are_counted_by_reason_and_told_once_per_thing():
    told = []
    failures = Failures(told.append)
    for error in (MalformedInput("bad note"), MalformedInput("bad note"), TooLarge("a 9 GiB section"),
                  UnreadableMemory("gone"), FileNotFoundError("gone")):
        with failures.contain("binary", "/lib/evil\n.so"):
            raise error
    assert failures.counts() == {("binary", "malformed"): 2, ("binary", "too large"): 1, ("binary", "unreadable"): 2}
    # One line per binary, escaped; being unreadable (a process that exited) is not told.
    assert told == ["binary /lib/evil\\x0a.so: malformed: bad note"]
    assert failures.examples()[("binary", "too large")] == "/lib/evil\\x0a.so: a 9 GiB section"


def test_strict_mode_lets_a_bug_through(monkeypatch):
    monkeypatch.setattr(containment, "STRICT", True)
    with pytest.raises(ZeroDivisionError):
        with Failures().contain("sample", "of process 1"):
            1 / 0
    with Failures().contain("sample", "of process 1"):  # input errors are still contained
        raise MalformedInput("bad")


def test_a_bug_is_contained_and_counted_outside_strict_mode(monkeypatch):
    monkeypatch.setattr(containment, "STRICT", False)
    told = []
    failures = Failures(told.append)
    with failures.contain("code object", "in process 7"):
        {}["missing"]
    assert failures.counts() == {("code object", "internal error"): 1}
    assert told == ["code object in process 7: internal error: KeyError: 'missing'"]


def test_a_worker_loop_that_fails_starts_again_then_is_given_up_loudly(monkeypatch):
    monkeypatch.setattr(containment, "STRICT", False)
    runs = []

    def loop():
        runs.append(1)
        raise RuntimeError("broken")

    failures = Failures()
    thread = threading.Thread(target=failures.keep_running, args=("events", loop))
    thread.start()
    thread.join()
    assert len(runs) == containment._THREAD_STARTS
    assert failures.dead_thread == "events: RuntimeError: broken"
    assert failures.counts() == {("thread", "internal error"): containment._THREAD_STARTS}


def test_a_worker_loop_that_recovers_is_not_given_up(monkeypatch):
    monkeypatch.setattr(containment, "STRICT", False)
    runs = []

    def loop():
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("once")

    failures = Failures()
    failures.keep_running("unwind tables", loop)
    assert len(runs) == 3 and failures.dead_thread is None
