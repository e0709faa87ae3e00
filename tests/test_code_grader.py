"""The code grader's own failures: none under run_many's threads, and one that happens is retried, then named.

The sandbox is replaced by a stand-in that answers at once, as if each program's functions returned their first
argument: the threads then spend their time in the judge (parsing, compiling, running the tests), where these failures
are.
"""

from __future__ import annotations

import ast
import gc
import json
import logging
import sys
import time

import pytest

import dash_core.rewards.code as code
from dash_core.data.problem import Problem
from dash_core.rewards.code import run_many, run_tests
from dash_core.rewards.grading import grade


def _identity(name: str) -> str:
    return f"def {name}(x):\n    return x\n"


class _EchoRun:
    """A stand-in for one sandbox run, answering at once as the program would if its every function returned its
    first argument (the grader's side of the conversation is unchanged)."""

    def __init__(self, program: str, timeout_s: float, memory_mb: int) -> None:
        self.program, self.deadline, self.stderr = program, time.monotonic() + timeout_s, ""

    def __enter__(self) -> _EchoRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def exchange(self, request: bytes) -> bytes:
        kind, *arguments = json.loads(request)
        if kind == "run":
            names = [node.name for node in ast.parse(self.program).body if isinstance(node, ast.FunctionDef)]
            return json.dumps(["names", names]).encode()
        if kind == "global":
            return json.dumps(["value", {"handle": [0, "function"]}]).encode()
        return json.dumps(["value", arguments[1][0][0]]).encode()  # a call: [number, [args, kwargs]]

    def finish(self) -> None:
        pass


@pytest.fixture
def echo_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(code, "_Run", _EchoRun)


def _pause_mid_parse(phase: str, info: dict) -> None:
    """A gc callback: a collection in the middle of `ast.parse` waits a moment with the GIL released, as a finalizer
    that blocks would, so that other threads run meanwhile and may start parsing; elsewhere it lets them run."""
    caller = sys._getframe().f_back
    time.sleep(5e-5 if caller is not None and caller.f_code is ast.parse.__code__ else 0)


@pytest.fixture
def parser_race():
    """Make CPython's AST race (python/cpython#106905) likely instead of rare: a collection every 300 allocations,
    so one runs in the middle of most parses of the tests below, and there `_pause_mid_parse` hands over the GIL."""
    threshold = gc.get_threshold()
    gc.set_threshold(300)
    gc.callbacks.append(_pause_mid_parse)
    yield
    gc.callbacks.remove(_pause_mid_parse)
    gc.set_threshold(*threshold)


def _jobs(round_: int, count: int) -> list[tuple[str, str]]:
    """`count` programs, each with tests of its own (the judge compiles them once per task) that hold a long literal, as
    an MBPP+ checker's inputs do (a parse long enough for others to start); every other program defines a builtin
    its tests call, so that the judge parses the program too."""
    jobs = []
    for i in range(count):
        name = "f" if i % 2 else "abs"
        first = round_ * 100_000 + i * 10
        inputs = f"inputs = {list(range(first, first + 300))}\n"
        jobs.append((_identity(name), inputs + f"assert {name}({first}) == {first}\n"))
    return jobs


@pytest.mark.usefixtures("echo_sandbox", "parser_race")
def test_hundreds_of_programs_graded_in_threads_many_times(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=code.__name__):
        for round_ in range(4):
            results = run_many(_jobs(round_, 300), workers=8)
            assert [result.status for result in results] == ["passed"] * 300
    assert "trying once more" not in caplog.text  # the race is gone, not hidden by the retry


def test_a_grader_failure_is_tried_once_more(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def flaky(*args: object) -> _EchoRun:
        calls.append(args)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=33, after=183)")
        return _EchoRun(*args)

    monkeypatch.setattr(code, "_Run", flaky)
    with caplog.at_level(logging.WARNING, logger=code.__name__):
        assert run_tests(_identity("f"), "assert f(1) == 1\n").passed
    assert len(calls) == 2
    assert "SystemError" in caplog.text


def test_a_grader_failure_that_repeats_fails_the_batch_with_its_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SystemError of the grader's own on every try is not the program's: no reward of 0, the batch fails."""

    def broken(*args: object) -> _EchoRun:
        raise SystemError("AST constructor recursion depth mismatch (before=33, after=183)")

    monkeypatch.setattr(code, "_Run", broken)
    problem = Problem("c", "write f", tests="assert f(1) == 1\n", kind="code")
    with pytest.raises(code.GraderError, match="grader's own.*SystemError"):
        grade([problem, problem], [_identity("f"), "def f(x):\n    return 0\n"])
