"""The plan: which parts of a task's tests run in the sandbox, and what the judge does with their values.

The calling process (the judge) parses `tests` (MBPP asserts, or an MBPP+ checker) and splits it statement by
statement; the program never touches the judge's process:
- Definitions that need nothing from the program (imports of a few pure modules such as math and numpy, functions,
  classes, assignments) run in the judge: an MBPP+ checker's `assertion`, `inputs` and `results` never enter the
  sandbox. A definition goes there too only when test code that runs in the sandbox reads it; the program's own
  functions do not see the tests' names.
- `assert` statements, expression statements and `for` loops of them are judged. Each part that needs the program is
  evaluated in the sandbox: a call of the function under test, a name the program defines, a call of a builtin with
  effects (open, print, ...) with what is applied to its result. The rest (the comparison, `set(...)`,
  `math.isclose(...)`, the MBPP+ row's own `assertion(out, exp, atol)`) is evaluated by the judge, with its own
  builtins and modules, on the values that came back. A call of the function under test whose arguments the judge
  can compute as plain data is sent as data (`assert f(1, 2) == 3`; each iteration of the MBPP+ loop); otherwise the
  call is evaluated in the sandbox from its source (arguments built from the program's classes or by the row's setup
  code) and only its result is judged.
- Fallback: any other statement (setup code that uses the program's classes, `raise`, a loop whose arguments are not
  data, an assert whose comprehension calls the program, a checker the tests define that is handed the program's
  function, as HumanEval's `check(candidate)`) runs in the sandbox, and only whether it raised comes back: for
  those, the program's word is taken.
The function under test is any name the tests call that neither they, Python's builtins nor the judge's modules
define; only when the tests call nothing else does a builtin's name (a task's function called `sum`) mean the
program's definition of it.

How one statement is cut is split.py's job; this module walks the statements, runs the judge's definitions, and
computes the data arguments of the calls it sends.
"""

from __future__ import annotations

import ast
import builtins
import functools
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import CodeType

from .judge import _GRADER_ERRORS, _JUDGE_MODULES, _RECORD, _SANDBOX_ONLY, _bind, _judge_namespace
from .split import _bound_names, _free_names, _NotJudged, _Site, _split
from .values import _encode


@dataclass(frozen=True)
class _Step:
    """One statement of the tests: its ops in the sandbox, and what the judge runs for it."""

    line: int
    first_op: int  # index of its first op in the sandbox's list
    ops: int
    judge: CodeType | None  # None: the statement ran in the sandbox, and the judge only checks that it did not raise
    sites: int  # values its judge code reads per iteration


@dataclass(frozen=True)
class _Plan:
    """What a task's tests become: the sandbox's ops, and the judge's steps that read their values."""

    ops: tuple[tuple, ...]  # ("exec", source) | ("eval", source) | ("call", name, arguments as _encode's JSON)
    steps: tuple[_Step, ...]
    modules: tuple[str, ...]  # modules the judge binds by name: the tests use them without importing them
    error: str | None = None  # the tests fail on their own, whatever the program


# CPython's converters between its internal AST and `ast` objects (ast.parse, compile of an `ast` tree) count their
# recursion depth in state all threads share (3.11 at least, python/cpython#106905): two of run_many's threads parsing
# at once can raise "SystemError: AST constructor recursion depth mismatch". Every parse and compile of the judge holds
# this lock; each takes far less than a sandbox run, and those of the tests are cached per task.
_AST_LOCK = threading.Lock()


def _parse(source: str, mode: str = "exec") -> ast.AST:
    """`ast.parse`, one thread at a time."""
    with _AST_LOCK:
        return ast.parse(source, mode=mode)


def _compile(tree: ast.Module) -> CodeType:
    """The judge's code for `tree`, compiled one thread at a time."""
    with _AST_LOCK:
        return compile(tree, "<tests>", "exec")


def _called_names(tree: ast.Module) -> set[str]:
    return {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}


@functools.lru_cache(maxsize=1024)
def _shadow_candidates(tests: str) -> frozenset[str]:
    """Builtin or module names the tests call, when they call nothing else the program could define."""
    try:
        tree = _parse(tests)
    except SyntaxError:
        return frozenset()
    own = set().union(*(_bound_names(statement) for statement in tree.body))
    called = _called_names(tree) - own
    judged = {name for name in called if name in _JUDGE_MODULES or hasattr(builtins, name)}
    return frozenset(judged) if judged == called else frozenset()


def _shadowed(program: str, tests: str) -> frozenset[str]:
    """Builtin names that mean the program's definitions: see the module docstring."""
    candidates = _shadow_candidates(tests)
    if not candidates:
        return candidates
    try:
        tree = _parse(program)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return frozenset()  # the sandbox reports why
    return candidates & set().union(*(_bound_names(statement) for statement in tree.body))


def _judge_setup(statement: ast.stmt, known: Callable[[str], bool]) -> bool:
    """Whether the judge can run this statement by itself: a definition that needs nothing from the program."""
    if isinstance(statement, ast.Import):
        return all(alias.name.partition(".")[0] in _JUDGE_MODULES for alias in statement.names)
    if isinstance(statement, ast.ImportFrom):  # not `import *`, whose names the judge could not tell apart
        module = (statement.module or "").partition(".")[0]
        return not statement.level and module in _JUDGE_MODULES and statement.names[0].name != "*"
    if not isinstance(statement, (ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AugAssign, ast.AnnAssign)):
        return False
    return all(known(name) for name in _free_names(statement) - _bound_names(statement))


@functools.lru_cache(maxsize=1024)  # a data set's rows; MBPP+ plans are a few times their tests' size
def _plan(tests: str, shadowed: frozenset[str]) -> _Plan:
    """Split `tests` between the sandbox and the judge, computing the data arguments of the calls it sends."""
    try:
        tree = _parse(tests)
    except SyntaxError as error:
        return _Plan((), (), (), f"SyntaxError in the tests: {error}")
    judge_bound: set[str] = set()  # bound by what the judge runs
    checkers: set[str] = set()  # functions the tests define
    program_bound: set[str] = set(shadowed)  # bound by the program or by statements that run in the sandbox
    modules: set[str] = set()

    def known(name: str) -> bool:
        if name in program_bound:
            return False
        if name in judge_bound or hasattr(builtins, name) and name not in _SANDBOX_ONLY:
            return True
        if name in _JUDGE_MODULES:
            modules.add(name)
            return True
        return False

    namespace = _judge_namespace(())
    ops: list[tuple] = []
    steps: list[_Step] = []
    sandbox_code: list[ast.AST] = []  # what the sandbox runs or evaluates from source: it may need judge definitions
    setups: list[tuple[int, ast.stmt]] = []  # (index in steps, statement) of what the judge runs by itself
    for statement in tree.body:
        first = len(ops)
        code = None
        sites = 0
        if _judge_setup(statement, known):
            code = _compile(ast.Module([statement], []))
            try:
                _bind(namespace, modules)
                exec(code, namespace)
            except _GRADER_ERRORS:
                raise  # not the tests' fault: a plan that said so would score the task 0 until the process ends
            except Exception as error:
                return _Plan((), (), (), f"the tests raise by themselves: {type(error).__name__}: {error}")
            judge_bound |= _bound_names(statement)
            program_bound -= _bound_names(statement)
            checkers |= {statement.name} if isinstance(statement, ast.FunctionDef) else set()
            setups.append((len(steps), statement))
        else:
            try:
                judge, record, site_list = _split(statement, known, checkers)
                _bind(namespace, modules)
                ops.extend(_record_ops(record, site_list, namespace, isinstance(statement, ast.For)))
                code, sites = _compile(judge), len(site_list)
                sandbox_code.extend(_parse(op[1], mode="eval") for op in ops[first:] if op[0] == "eval")
            except _NotJudged:
                ops.append(("exec", ast.unparse(statement)))
                sandbox_code.append(statement)
                program_bound |= _bound_names(statement)
                judge_bound -= _bound_names(statement)
                checkers -= _bound_names(statement)
        steps.append(_Step(statement.lineno, first, len(ops) - first, code, sites))
    return _with_sandbox_setup(ops, steps, setups, sandbox_code, tuple(sorted(modules - judge_bound)))


def _record_ops(record: ast.Module, sites: list[_Site], namespace: dict, loop: bool) -> list[tuple]:
    """Run the recording code in the judge: the sandbox ops of a judged statement, each call with data arguments."""
    ops: list[tuple] = []

    def add(k: int, *args: object, **kwargs: object) -> None:
        site = sites[k]
        if site.call is None:
            ops.append(("eval", site.source))
            return
        try:
            ops.append(("call", site.call, json.dumps(_encode((list(args), kwargs), strict=True))))
        except (TypeError, RecursionError):
            if loop:
                raise _NotJudged from None  # the sandbox cannot rebuild one iteration's arguments
            ops.append(("eval", site.source))  # not data: the sandbox evaluates the whole call

    namespace[_RECORD] = add
    if loop:
        try:
            exec(_compile(record), namespace)
        except _GRADER_ERRORS:
            raise
        except Exception:  # a loop is recorded whole or not at all: the sandbox then runs it
            raise _NotJudged from None
        return ops
    for k, statement in enumerate(record.body):
        try:
            exec(_compile(ast.Module([statement], [])), namespace)
        except _GRADER_ERRORS:
            raise
        except Exception:  # the arguments raise here; they will in the sandbox too, where the judge can see it
            sites[k] = _Site(sites[k].source, None)
            ops.append(("eval", sites[k].source))
    return ops


def _with_sandbox_setup(
    ops: list[tuple],
    steps: list[_Step],
    setups: list[tuple[int, ast.stmt]],
    sandbox_code: list[ast.AST],
    modules: tuple[str, ...],
) -> _Plan:
    """Also run in the sandbox the judge's definitions that sandbox-side code reads, and nothing else."""
    needed = set().union(*(_free_names(node) for node in sandbox_code))
    chosen = set()
    for index, statement in reversed(setups):
        if _bound_names(statement) & needed:
            chosen.add(index)
            needed |= _free_names(statement)
    if not chosen:
        return _Plan(tuple(ops), tuple(steps), modules)
    statements = dict(setups)
    new_ops: list[tuple] = []
    new_steps = []
    for index, step in enumerate(steps):
        first = len(new_ops)
        if index in chosen:
            new_ops.append(("exec", ast.unparse(statements[index])))
        new_ops.extend(ops[step.first_op : step.first_op + step.ops])
        new_steps.append(_Step(step.line, first, len(new_ops) - first, step.judge, step.sites))
    return _Plan(tuple(new_ops), tuple(new_steps), modules)
