"""The judge: the tests run in the calling process, and the program is reachable from them only through handles.

The program runs in a sandbox (sandbox.py) that answers requests (harness.py). Every line of the tests runs here, with
the judge's own builtins (those without effects outside pure computation) and modules (a few pure ones: math,
numpy, ...): setup code, loops, comprehensions, an MBPP+ row's checker, `check(candidate)`. Each name the tests read
from the program is, here, what the sandbox answered for it: plain data of exact builtin types (values.py), or a
handle (`_Remote`) to an object that stays there. Calling a handle, reading or setting its attributes, indexing,
measuring or iterating it sends a request carrying only the arguments, names and keys the tests give it, and brings
back data or more handles; comparing it never asks the sandbox (a handle equals only itself), so no expected value,
checker or builtin of the tests is ever inside the sandbox, and no verdict comes from there. An exception the
program raises is raised here as its builtin class (or as ProgramError), where the tests may catch it; its exit or
running out of memory, the run ending, the time limit and any answer nobody asked for end judging (_Stop).

Comparisons within a tolerance (numpy's allclose and isclose, math.isclose) judge only values of one type and
shape: EvalPlus's harness asserts `type(out) == type(exp)` and equal lengths before np.allclose, and the judge holds
that at every depth (`_comparable`), where MBPP+'s own checker omits it and numpy broadcasts.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import importlib
import json
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .sandbox import _Run, _Stop
from .values import _decode, _encode

if TYPE_CHECKING:  # annotations only: names.py imports this module
    from .names import _Tests

# Modules the judge imports itself: pure computation, nothing that reaches the host (of sys, only _SYS_NAMES).
_JUDGE_MODULES = frozenset(
    "bisect cmath collections decimal fractions functools heapq itertools math numpy operator re statistics "
    "string sys".split()
)
_SYS_NAMES = frozenset("getsizeof maxsize float_info int_info byteorder".split())  # MBPP 596 uses sys.getsizeof
# Builtins with effects outside pure computation (files, output, code, introspection, a per-process hash): the judge
# does not offer them to the tests.
_WITHHELD = frozenset(
    "__import__ breakpoint compile copyright credits dir eval exec exit globals hash help id input license locals "
    "memoryview open print quit vars".split()
)
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
    return _judge_module(importlib.__import__(name, globals, locals, fromlist, level))


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


class _JudgeModule(ModuleType):
    """A module as the tests see it in the judge: its tolerance comparisons strict, and of sys only _SYS_NAMES."""

    def __init__(self, module: ModuleType) -> None:
        super().__init__(module.__name__, module.__doc__)
        comparisons = _STRICT_COMPARISONS.get(module.__name__, ())
        self.__dict__.update({name: _within_tolerance(getattr(module, name)) for name in comparisons})
        self._module = module

    def __getattr__(self, name: str) -> Any:
        if self._module.__name__ == "sys" and name not in _SYS_NAMES:
            raise AttributeError(f"the judge's sys has no {name}")
        return getattr(self._module, name)


_STRICT_COMPARISONS = {"math": ("isclose",), "numpy": ("allclose", "isclose")}


def _judge_module(module: ModuleType) -> ModuleType:
    if module.__name__ not in (*_STRICT_COMPARISONS, "sys"):
        return module
    return _judge_module_named(module.__name__)


@functools.cache
def _judge_module_named(name: str) -> ModuleType:
    return _JudgeModule(importlib.import_module(name))


_JUDGE_BUILTINS = {name: value for name, value in vars(builtins).items() if name not in _WITHHELD}
_JUDGE_BUILTINS["__import__"] = _judge_import


def _judge_namespace(modules: frozenset[str]) -> dict:
    """A fresh namespace with the judge's builtins, and the `modules` the tests use without importing them (the
    program did) as the judge's own: one run's tests never see another's names."""
    namespace = {"__name__": "__judge__", "__builtins__": _JUDGE_BUILTINS}
    for name in modules:
        namespace[name] = _judge_module(importlib.import_module(name))
    return namespace


class ProgramError(Exception):
    """An exception the program raised that the judge has no class of its own for: its type's name and message."""


# Raised by the program, these end judging instead of reaching the tests: no test may catch the program's exit.
_ENDING = {"SystemExit": "failed", "KeyboardInterrupt": "failed", "GeneratorExit": "failed", "MemoryError": "crashed"}
# The program's exceptions that the judge raises as its own class: builtin ones, except those that mean something to
# the judge (the grader's errors) or to Python's iteration (a StopIteration from a call would end a `map` early).
_REBUILT = {
    name: kind for name, kind in vars(builtins).items()
    if isinstance(kind, type) and issubclass(kind, Exception) and not issubclass(kind, (*_GRADER_ERRORS, StopIteration, StopAsyncIteration))
}  # fmt: skip


class _Remote:
    """An object that stays in the sandbox (a function, a class, an instance, a generator): the judge reaches it only
    by requests, which carry nothing of the tests but the arguments, names and keys they are given. Equal only to
    itself; its answers are data or more handles; no dunder attribute crosses (numpy would read `__array_interface__`
    as an address in this process)."""

    __slots__ = ("_conversation", "_number", "_type")

    def __init__(self, conversation: _Conversation, number: int, type_name: str) -> None:
        object.__setattr__(self, "_conversation", conversation)
        object.__setattr__(self, "_number", number)
        object.__setattr__(self, "_type", type_name)

    def __repr__(self) -> str:
        return f"<{self._type} in the sandbox>"

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self._conversation.ask("call", self._number, [list(args), kwargs])

    def __getattr__(self, name: str) -> object:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(f"{self!r} does not share {name}")
        return self._conversation.ask("getattr", self._number, name)

    def __setattr__(self, name: str, value: object) -> None:
        self._conversation.ask("setattr", self._number, name, value)

    def __getitem__(self, key: object) -> object:
        return self._conversation.ask("getitem", self._number, key)

    def __setitem__(self, key: object, value: object) -> None:
        self._conversation.ask("setitem", self._number, key, value)

    def __len__(self) -> int:
        return self._conversation.ask("len", self._number)

    def __bool__(self) -> bool:
        return self._conversation.ask("bool", self._number)

    def __iter__(self) -> Iterator[object]:
        iterator = self._conversation.ask("iter", self._number)
        if type(iterator) is not _Remote:
            raise TypeError(f"iter() of {self!r} returned no iterator")
        while True:
            try:
                yield self._conversation.ask("next", iterator._number)
            except StopIteration:
                return


class _Conversation:
    """The judge's side of one run: each request gets its answer as data, handles (_Remote) or the program's
    exception raised here; a run that cannot go on raises _Stop, which no test can catch, every time after."""

    def __init__(self, run: _Run) -> None:
        self.run, self.stopped = run, None

    def names(self) -> set[str]:
        """Run the program: the names it defined."""
        answer = self._answer("run")
        if answer[0] != "names" or len(answer) != 2 or type(answer[1]) is not list:
            raise self._stop(_Stop("failed", "unreadable answer from the program"))
        return {name for name in answer[1] if type(name) is str}

    def ask(self, *request: object) -> object:
        answer = self._answer(*request)
        if answer[0] != "value" or len(answer) != 2:
            raise self._stop(_Stop("failed", "unreadable answer from the program"))
        return answer[1]

    def _answer(self, *request: object) -> list:
        if self.stopped is not None:
            raise self.stopped
        try:
            line = json.dumps(_encode(list(request), self._reference), separators=(",", ":")) + "\n"
        except RecursionError:
            raise TypeError("the tests pass the program a value nested too deeply to send") from None
        try:
            answer = _decode(self.run.exchange(line.encode()), self.run.deadline, self._handle)
        except _Stop as stop:
            raise self._stop(stop) from None
        except TimeoutError:
            raise self._stop(
                _Stop("timeout", "reading the program's answers took longer than the time limit")
            ) from None
        except (ValueError, TypeError, RecursionError, OverflowError) as error:
            raise self._stop(_Stop("failed", f"unreadable answer from the program ({error})")) from None
        if type(answer) is not list or not answer:
            raise self._stop(_Stop("failed", "unreadable answer from the program"))
        if answer[0] == "raised" and len(answer) == 3:
            raise self._raised(str(answer[1]), str(answer[2]), request[0])
        return answer

    def _raised(self, name: str, message: str, kind: object) -> BaseException:
        """The program's exception, as the judge raises it."""
        if name in _ENDING:
            return self._stop(_Stop(_ENDING[name], f"{name}: {message}".rstrip(": ")))
        if name == "StopIteration" and kind == "next":
            return StopIteration()
        with contextlib.suppress(Exception):  # a class whose constructor takes other arguments (UnicodeDecodeError)
            if name in _REBUILT:
                return _REBUILT[name](message)
        return ProgramError(f"{name}: {message}".rstrip(": "))

    def _stop(self, stop: _Stop) -> _Stop:
        self.stopped = stop
        return stop

    def _reference(self, item: object) -> dict:
        if type(item) is _Remote and item._conversation is self:
            return {"ref": item._number}
        raise TypeError(f"the tests pass the program a {type(item).__name__}, which does not cross to the sandbox")

    def _handle(self, tag: str, body: object) -> _Remote:
        if tag != "handle" or type(body) is not list or len(body) != 2 or type(body[0]) is not int:
            raise ValueError(f"unknown tag {tag!r}")
        return _Remote(self, body[0], str(body[1]))


def _judge(tests: _Tests, run: _Run) -> tuple[str, str]:
    """Run the program, then the tests here with its names as handles: (status, reason)."""
    conversation = _Conversation(run)
    try:
        try:
            defined = conversation.names()
            namespace = _judge_namespace(tests.modules)
            for name in sorted(tests.from_program & defined):
                namespace[name] = conversation.ask("global", name)
            exec(tests.code, namespace)
        finally:
            if conversation.stopped is not None:  # whatever the tests did with it
                raise conversation.stopped
        run.finish()
    except _Stop as stop:
        return stop.status, _where(str(stop), stop)
    except AssertionError as error:
        return "failed", _where(f"AssertionError: {error}".rstrip(": "), error)
    except SystemExit as error:  # the tests' own exit
        return "failed", _where(f"SystemExit: {error}".rstrip(": "), error)
    except _GRADER_ERRORS:
        raise
    except ProgramError as error:
        return "error", _where(str(error), error)
    except Exception as error:
        return "error", _where(f"{type(error).__name__}: {error}", error)
    return "passed", ""


def _where(reason: str, error: BaseException) -> str:
    """`reason`, and the line of the tests that was running when `error` was raised."""
    line = None
    traceback = error.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename == "<tests>":
            line = traceback.tb_lineno
        traceback = traceback.tb_next
    return f"{reason} (tests line {line})" if line is not None else reason
