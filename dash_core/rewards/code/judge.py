"""The judge: replay the tests' judged statements in the calling process on the values that came back.

split.py rewrites each judged statement so that every part that needs the program reads `_dash_out(k)`; here
`_dash_out` hands it the sandbox's value for site k, and the rest of the statement (the comparison, `set(...)`,
`math.isclose(...)`, an MBPP+ row's own `assertion(out, exp, atol)`) runs with the judge's own builtins (those without
effects outside pure computation) and modules (a few pure ones: math, numpy, ...). For a statement that ran whole in
the sandbox, the judge checks only that it did not raise.

Comparisons within a tolerance (numpy's allclose and isclose, math.isclose) judge only values of one type and
shape: EvalPlus's harness asserts `type(out) == type(exp)` and equal lengths before np.allclose, and the judge holds
that at every depth (`_comparable`), where MBPP+'s own checker omits it and numpy broadcasts.

No token proves completion: a value that is missing, unreadable or forged is judged like any other, so exiting early,
printing "passed" or reading the harness's frames gains nothing. The judge stops at the first failure, and at the
run's time limit (a data set's reference function can be slow).
"""

from __future__ import annotations

import builtins
import functools
import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .values import _decode

if TYPE_CHECKING:  # annotations only: plan.py imports this module
    from .plan import _Plan, _Step

# Modules the judge imports itself: pure computation, nothing that reaches the host.
_JUDGE_MODULES = frozenset(
    "bisect cmath collections decimal fractions functools heapq itertools math numpy operator re statistics "
    "string".split()
)
# Builtins with effects outside pure computation (files, output, code, introspection, a per-process hash): the
# sandbox evaluates them, together with whatever the tests apply to what they return.
_SANDBOX_ONLY = frozenset(
    "__import__ breakpoint compile copyright credits dir eval exec exit globals hash help id input license locals "
    "memoryview open print quit vars".split()
)
_OUT, _TICK, _RECORD = "_dash_out", "_dash_tick", "_dash_record"  # names the judge binds while it runs the tests
_RAISED_STATUS = {"AssertionError": "failed", "SystemExit": "failed", "MemoryError": "crashed"}  # otherwise "error"
# Raised in the judge's own process, the grader's failures (CPython's parser under threads), not the program's: the
# judge lets them through, never a status. A MemoryError stays the program's ("crashed"): the values it returned
# could cause one, and no program may stop training.
_GRADER_ERRORS = (SystemError,)


def _judge_import(
    name: str, globals: dict | None = None, locals: dict | None = None, fromlist: Sequence[str] = (), level: int = 0
) -> ModuleType:
    """The judge's `__import__`: only its own modules, so the tests' imports cannot reach the host."""
    if level or name.partition(".")[0] not in _JUDGE_MODULES:
        raise ImportError(f"the judge does not import {name}")
    return _strict(importlib.__import__(name, globals, locals, fromlist, level))


def _comparable(out: object, expected: object, top: bool = True) -> bool:
    """Whether a comparison within a tolerance may judge `out` against `expected`: EvalPlus's rule before
    np.allclose (`type(out) == type(exp)`, equal lengths), at every depth, where numbers may be int or float below
    the top. Without it numpy broadcasts: `np.allclose([], 3.14)` is True, so `return []` passed float tasks."""
    if type(out) is not type(expected):
        return not top and type(out) in (int, float) and type(expected) in (int, float)
    if isinstance(expected, (list, tuple)):
        return len(out) == len(expected) and all(_comparable(o, e, top=False) for o, e in zip(out, expected))
    return getattr(out, "shape", None) == getattr(expected, "shape", None)  # arrays: no broadcasting either


def _within_tolerance(compare: Callable[..., Any]) -> Callable[..., Any]:
    """`compare(out, expected, ...)`, a comparison within a tolerance, only where `_comparable` allows it."""

    @functools.wraps(compare)
    def strict(out: object, expected: object, *args: Any, **kwargs: Any) -> Any:
        return _comparable(out, expected) and compare(out, expected, *args, **kwargs)

    return strict


class _Strict(ModuleType):
    """A module as the tests see it in the judge: its own names, with its tolerance comparisons strict."""

    def __init__(self, module: ModuleType, *comparisons: str) -> None:
        super().__init__(module.__name__, module.__doc__)
        self.__dict__.update({name: _within_tolerance(getattr(module, name)) for name in comparisons})
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


_STRICT_COMPARISONS = {"math": ("isclose",), "numpy": ("allclose", "isclose")}


def _strict(module: ModuleType) -> ModuleType:
    if module.__name__ not in _STRICT_COMPARISONS:
        return module
    return _strict_module(module.__name__)


@functools.cache
def _strict_module(name: str) -> ModuleType:
    return _Strict(importlib.import_module(name), *_STRICT_COMPARISONS[name])


_JUDGE_BUILTINS = {name: value for name, value in vars(builtins).items() if name not in _SANDBOX_ONLY}
_JUDGE_BUILTINS["__import__"] = _judge_import


def _judge_namespace(modules: tuple[str, ...]) -> dict:
    """A fresh namespace with the judge's builtins: one run's tests never see another's names."""
    namespace = {"__name__": "__judge__", "__builtins__": _JUDGE_BUILTINS}
    _bind(namespace, modules)
    return namespace


def _bind(namespace: dict, modules: set[str] | tuple[str, ...]) -> None:
    """Bind modules the tests use without importing them (the program did), as the judge's own imports."""
    for name in modules:
        namespace.setdefault(name, _strict(importlib.import_module(name)))


class _Stop(Exception):
    """The judge cannot go on: the sandbox's value is missing, unreadable, or an exception."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class _Outputs:
    """What came back from one run: one record per op after the program's, and how the run ended."""

    records: list[bytes]
    ended: tuple[str, str]  # the status and reason for a value that is missing
    stderr: str

    def get(self, index: int, deadline: float) -> list:
        if index >= len(self.records):
            raise _Stop(*self.ended)
        try:
            record = _decode(self.records[index], deadline)
        except TimeoutError:
            raise _Stop("timeout", "reading the returned values took longer than the time limit") from None
        except (ValueError, TypeError, RecursionError, OverflowError) as error:
            raise _Stop("failed", f"unreadable output from the program ({error})") from None
        if type(record) is not list or not record:
            raise _Stop("failed", "unreadable output from the program")
        if record[0] == "raised" and len(record) == 3:
            raise _Stop(_RAISED_STATUS.get(str(record[1]), "error"), f"{record[1]}: {record[2]}".rstrip(": "))
        return record

    def value(self, index: int, deadline: float) -> object:
        record = self.get(index, deadline)
        if record[0] != "value" or len(record) != 2:
            raise _Stop("failed", "unreadable output from the program")
        return record[1]


class _Replay:
    """Hands a judged statement the sandbox's values: `_dash_out(k)` is site k in the current iteration."""

    def __init__(self, outputs: _Outputs, base: int, sites: int, deadline: float) -> None:
        self.outputs, self.base, self.sites, self.deadline, self.iteration = outputs, base, sites, deadline, 0

    def tick(self) -> None:
        self.iteration += 1
        if time.monotonic() > self.deadline:  # a data set's reference function can be slow (MBPP+ 255, 630)
            raise _Stop("timeout", "judging the outputs took longer than the time limit")

    def out(self, k: int) -> object:
        return self.outputs.value(self.base + (self.iteration - 1) * self.sites + k, self.deadline)


def _judge(plan: _Plan, outputs: _Outputs, deadline: float) -> tuple[str, str]:
    """Replay the tests in the judge on the sandbox's values until `deadline`: (status, reason)."""
    namespace = _judge_namespace(plan.modules)
    step = None
    try:
        outputs.get(0, deadline)  # the program itself
        for step in plan.steps:
            base = 1 + step.first_op
            if step.judge is None or step.sites == 0:  # statements run in the sandbox: did they raise?
                for index in range(base, base + step.ops):
                    outputs.get(index, deadline)
            if step.judge is not None:
                replay = _Replay(outputs, base, step.sites, deadline)
                namespace[_TICK], namespace[_OUT] = replay.tick, replay.out
                exec(step.judge, namespace)
    except _Stop as stop:
        return stop.status, _where(str(stop), step)
    except AssertionError as error:
        return "failed", _where(f"AssertionError: {error}".rstrip(": "), step)
    except _GRADER_ERRORS:
        raise
    except Exception as error:
        return "error", _where(f"{type(error).__name__}: {error}", step)
    return "passed", ""


def _where(reason: str, step: _Step | None) -> str:
    return f"{reason} (tests line {step.line})" if step is not None else reason
