"""Judge an untrusted Python program by its outputs: test inputs run in a sandbox, the comparison runs outside it.

The calling process (the judge) splits a task's tests statement by statement. What needs the program (a call of the
function under test, a name the program defines) is evaluated in a fresh sandbox, and only its value comes back, as
plain data by exact type; the comparison runs in the judge, with its own builtins and modules, on those values. A
statement that cannot be split runs whole in the sandbox, and only whether it raised comes back. The sandbox holds
in six layers: bubblewrap's namespaces, resource limits, a fresh uid, Landlock, seccomp and a Python guard.

Modules, in the order a run goes through them:
- plan.py: which statements the judge runs and which the sandbox does; the function under test.
- split.py: one statement cut at the parts that need the program; the names a statement reads and binds.
- sandbox.py: launching one run: environment, bubblewrap (layer 1), the seccomp filter (layer 5), collecting its
  records, the time limit; without bubblewrap, a refusal (fail closed) or, when chosen, the warned weaker fallback.
- harness.py: the script that runs inside the sandbox: layers 2 to 6, then the program and the tests' ops.
- values.py: values across the boundary: JSON by exact type, anything else an opaque placeholder.
- judge.py: replaying the judged statements on the returned values, with the judge's namespace and builtins.

Not covered: the fallback statements (plan.py); a program that games its own inputs where the sandbox builds them;
the judge runs the data set's own test code in the calling process (trusted, like the data set) on at most 16 MiB of
returned data, so a costly reference function costs that there (MBPP+ 255's largest case takes 1.5 s and 1 GB, for a
program that passed every case before it); without bwrap, a run's total disk use; kernel bugs and timing channels.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .harness import _DETAIL_CHARS
from .judge import _judge
from .plan import _plan, _shadowed
from .sandbox import SandboxUnavailable, _run_sandboxed, allow_weak_sandbox, isolation_problem

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
    """Run `program` and the parts of `tests` that need it in a fresh sandbox, and judge the results here.

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
    plan = _plan(tests, _shadowed(program, tests))
    if plan.error is not None:
        return CodeResult(False, "error", plan.error, time.monotonic() - start)
    outputs = _run_sandboxed(program, plan.ops, timeout_s, memory_mb)
    status, reason = _judge(plan, outputs, time.monotonic() + timeout_s)
    detail = f"{reason}\n{outputs.stderr}".strip()[-_DETAIL_CHARS:]
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
