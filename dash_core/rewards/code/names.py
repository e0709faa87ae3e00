"""A task's tests as the judge runs them: their code, compiled once, and the names they read from the program.

The tests read from the program every name they use without binding it that is neither a builtin nor one of the
judge's modules. A builtin's name means the program's definition only for the function under test of tests that
call nothing else the program could define (MBPP 126's function is called `sum`): the one builtin they call in their
asserts and checked expressions, outside their own functions and their loops' iterables. With several such names
none is the program's, since a redefined `zip` or `set` would see the tests' expected values; a right program then
fails (no row of MBPP or MBPP+ is such a case).
"""

from __future__ import annotations

import ast
import builtins
import functools
import threading
from dataclasses import dataclass
from types import CodeType

from .judge import _JUDGE_MODULES

# CPython's converters between its internal AST and `ast` objects (ast.parse, compile of an `ast` tree) count their
# recursion depth in state all threads share (3.11 at least, python/cpython#106905): two of run_many's threads parsing
# at once can raise "SystemError: AST constructor recursion depth mismatch". Every parse and compile of the judge holds
# this lock; each takes far less than a sandbox run, and the tests' are cached per task.
_AST_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Tests:
    """What the judge needs of a task's tests."""

    code: CodeType
    from_program: frozenset[str]  # names whose values the judge asks the program for, where it defines them
    modules: frozenset[str]  # the judge's modules the tests use without importing them


@functools.lru_cache(maxsize=1024)  # a data set's rows
def _tests(tests: str) -> _Tests | str:
    """The tests, compiled with what they read from the program; or why they cannot run (a SyntaxError)."""
    try:
        with _AST_LOCK:
            tree = ast.parse(tests)
            code = compile(tree, "<tests>", "exec")
    except (SyntaxError, ValueError) as error:
        return f"{type(error).__name__} in the tests: {error}"
    own = set().union(*(_bound_names(statement) for statement in tree.body))
    read = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)} - own
    judges = {name for name in read if hasattr(builtins, name) or name in _JUDGE_MODULES}
    return _Tests(code, frozenset(read - judges) | _under_test(tree, own), frozenset(read & _JUDGE_MODULES))


def _under_test(tree: ast.Module, own: set[str]) -> frozenset[str]:
    """A builtin's name that is the function under test: see the module docstring."""
    called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    if any(not hasattr(builtins, name) and name not in _JUDGE_MODULES for name in called - own):
        return frozenset()  # the tests call a function of the program's own
    checked: list[ast.stmt] = []
    for statement in tree.body:
        body = statement.body if isinstance(statement, ast.For) else [statement]
        checked += [child for child in body if isinstance(child, (ast.Assert, ast.Expr))]
    names = {
        node.func.id for statement in checked for node in ast.walk(statement)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id not in own
    }  # fmt: skip
    return frozenset(names) if len(names) == 1 else frozenset()


def _bound_names(statement: ast.stmt) -> set[str]:
    """Names a top-level statement binds (`root.left = ...` binds none: it changes the object root names)."""
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).partition(".")[0] for alias in statement.names}
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {statement.name}
    if isinstance(statement, ast.Assign):
        targets = statement.targets  # not the value, which may be a long literal
    elif isinstance(statement, (ast.AugAssign, ast.AnnAssign, ast.For)):
        targets = [statement.target]
    else:
        targets = [statement]
    nodes = (node for target in targets for node in ast.walk(target))
    return {node.id for node in nodes if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
