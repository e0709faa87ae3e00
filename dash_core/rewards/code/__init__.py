"""Judge an untrusted Python program by its answers: the program runs in a sandbox, the tests run outside it.

The calling process (the judge) runs every line of a task's tests itself. The program runs in a fresh sandbox and is
reachable from the tests only through handles: a call of its function sends the arguments as plain data and brings
back plain data by exact type (or a handle to an object that stays in the sandbox), and the comparison runs in the
judge, with its own builtins and modules. The sandbox holds in six layers: bubblewrap's namespaces, resource
limits, a fresh uid, Landlock, seccomp and a Python guard.

Modules, in the order a run goes through them:
- names.py: the tests, compiled once per task, and the names they read from the program.
- sandbox.py: launching one run: environment, bubblewrap (layer 1), the seccomp filter (layer 5), the conversation
  with it (one answer per request, in order), the time limit; without bubblewrap, a refusal (fail closed) or, when
  chosen, the warned weaker fallback.
- harness.py: the script that runs inside the sandbox: layers 2 to 6, then the program, then its answers.
- values.py: values across the boundary: JSON by exact type, and handles for what is not data.
- judge.py: the tests in the judge's namespace, with the program's names as handles; the verdict.

Not covered: a program that games inputs the tests build from its own classes (setup code calling them gets what
it answers); the judge runs the data set's own test code in the calling process (trusted, like the data set) on at
most 16 MiB of answers, so a costly reference function costs that there; without bwrap, a run's total disk use;
kernel bugs and timing channels.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .harness import _DETAIL_CHARS
from .judge import _judge
from .names import _tests
from .sandbox import SandboxUnavailable, _Run, allow_weak_sandbox, isolation_problem

__all__ = [
    "STATUSES", "CodeResult", "GraderError", "SandboxUnavailable", "allow_weak_sandbox", "isolation_problem",
    "mbpp_plus_tests", "mbpp_tests", "run_many", "run_tests",
]  # fmt: skip

STATUSES = ("passed", "failed", "timeout", "error", "crashed")

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CodeResult:
    """One program judged against one task's tests."""

    passed: bool
    status: str  # one of STATUSES
    detail: str  # why it did not pass (the judge's or the program's exception), then the end of stderr
    duration_s: float


class GraderError(RuntimeError):
    """Grading failed twice for a reason of the grader's own: no reward can be trusted, so none is given."""


def run_tests(program: str, tests: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> CodeResult:
    """Run `program` in a fresh sandbox and `tests` here, against its answers.

    Whatever the program does ends in a status. Anything raised is the grader's own failure (the sandbox cannot be
    set up, a SystemError or MemoryError in the judge), usually transient: it is tried once more, then GraderError
    names the cause, so that it never becomes a reward of 0.
    """
    try:
        return _run_tests_once(program, tests, timeout_s, memory_mb)
    except SandboxUnavailable:
        raise  # not transient: the machine lacks the isolation, and the message says how to get it
    except Exception as error:
        _log.warning("code grading failed (%s: %s); trying once more", type(error).__name__, error)
    try:
        return _run_tests_once(program, tests, timeout_s, memory_mb)
    except Exception as error:
        raise GraderError(
            f"code grading failed twice for a reason of the grader's own, not the program's: {type(error).__name__}: "
            f"{error}. No reward was given for this batch; resuming the run grades it again. If the cause repeats, "
            "fix it first (the traceback above says where: the sandbox's setup, the host's memory, the judge)"
        ) from error


def _run_tests_once(program: str, tests: str, timeout_s: float, memory_mb: int) -> CodeResult:
    start = time.monotonic()
    compiled = _tests(tests)
    if isinstance(compiled, str):
        return CodeResult(False, "error", compiled, time.monotonic() - start)
    with _Run(program, timeout_s, memory_mb) as run:
        status, reason = _judge(compiled, run)
        detail = f"{reason}\n{run.stderr}".strip()[-_DETAIL_CHARS:]
    return CodeResult(status == "passed", status, detail, time.monotonic() - start)


def run_many(
    jobs: list[tuple[str, str]], timeout_s: float = 10.0, workers: int | None = None, memory_mb: int = 1024
) -> list[CodeResult]:
    """Run (program, tests) pairs in parallel sandboxes; results come back in the order of `jobs`."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda job: run_tests(job[0], job[1], timeout_s, memory_mb), jobs))


def mbpp_tests(row: dict) -> str:
    """Test code of an MBPP row: its setup code, then its asserts."""
    return "\n".join([row.get("test_setup_code") or "", *row["test_list"]])


def mbpp_plus_tests(row: dict) -> str:
    """Test code of an MbppPlus-OriginFmt row: its imports, then its self-contained checker (uses numpy)."""
    return "\n".join([*row.get("test_imports", []), row["test"]])
