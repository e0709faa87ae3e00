"""One judged statement cut where it needs the program, and the name analysis that decides where that is.

A site is a part of the statement the judge cannot evaluate by itself: a call of the function under test, a name the
program defines, a builtin with effects (open, print, ...) with what is applied to its result. The splitter returns
two rewrites of the statement: the judge's, where site k reads `_dash_out(k)`, and a recording one, which plan.py runs
in the judge to compute each site's op (a call with data arguments, else the site's source). A statement whose sites
would need names bound inside it, or that hands the program's function to the tests' own checker, raises _NotJudged:
it runs whole in the sandbox.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Callable
from dataclasses import dataclass

from .judge import _OUT, _RECORD, _SANDBOX_ONLY, _TICK


@dataclass(frozen=True)
class _Site:
    """A part of a judged statement that needs the program."""

    source: str  # evaluated in the sandbox when it is not a call with data arguments
    call: str | None  # the name of the function under test, when the judge computes the arguments


class _NotJudged(Exception):
    """The statement cannot be split between sandbox and judge; it runs in the sandbox (the fallback)."""


def _free_names(node: ast.AST) -> set[str]:
    """Names `node` reads from outside itself (approximately: a name it binds anywhere counts as its own)."""
    loaded, bound = set(), set()
    for child in ast.walk(node):
        if isinstance(child, ast.Name):
            (loaded if isinstance(child.ctx, ast.Load) else bound).add(child.id)
        elif isinstance(child, ast.arg):
            bound.add(child.arg)
    return loaded - bound


def _bound_names(statement: ast.stmt) -> set[str]:
    """Names a top-level statement binds or changes (`root.left = ...` changes root)."""
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
    names = set()
    for child in (node for target in targets for node in ast.walk(target)):
        if isinstance(child, (ast.Attribute, ast.Subscript)) and isinstance(child.ctx, ast.Store):
            while isinstance(child, (ast.Attribute, ast.Subscript)):
                child = child.value
        if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
            names.add(child.id)
    return names


class _Splitter(ast.NodeTransformer):
    """Replaces each part of a statement that needs the program with `_dash_out(k)`, and records it as site k."""

    def __init__(self, known: Callable[[str], bool], local: set[str], loop: set[str], checkers: set[str]) -> None:
        self.known, self.local, self.loop, self.checkers = known, local, loop, checkers
        self.sites: list[_Site] = []
        self.calls: list[ast.Call | None] = []  # per site: the call whose arguments the judge computes

    def _judge_can_evaluate(self, node: ast.AST) -> bool:
        return all(name in self.local or self.known(name) for name in _free_names(node))

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if isinstance(node.ctx, ast.Load) and node.id not in self.local and not self.known(node.id):
            return self._site(node, None)
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        return self._chain(node)

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        return self._chain(node)

    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        return self._chain(node)

    def _chain(self, node: ast.expr) -> ast.AST:
        """`a.b(c)[d]`: judged here unless `a` needs the program; a call of the function under test is the site."""
        bottom, above = node, None
        while isinstance(bottom, (ast.Call, ast.Attribute, ast.Subscript)):
            above, bottom = bottom, bottom.func if isinstance(bottom, ast.Call) else bottom.value
        if not isinstance(bottom, ast.Name) or bottom.id in self.local or self.known(bottom.id):
            if (
                isinstance(bottom, ast.Name)
                and bottom.id in self.checkers
                and any(
                    isinstance(argument, ast.Name) and argument.id not in self.local and not self.known(argument.id)
                    for argument in [*node.args, *(keyword.value for keyword in node.keywords)]
                )
            ):
                raise _NotJudged  # `check(candidate)`: the tests' checker calls the program's function itself
            return self.generic_visit(node)
        if bottom.id in _SANDBOX_ONLY or not (isinstance(above, ast.Call) and above.func is bottom):
            return self._site(node, None)  # a file from open(), an attribute of the program's objects
        if above is not node:
            return self.generic_visit(node)  # the call becomes the site; what is applied to its value is judged here
        arguments = ast.Tuple([*node.args, *(keyword.value for keyword in node.keywords)], ast.Load())
        return self._site(node, bottom.id if self._judge_can_evaluate(arguments) else None)

    def _site(self, node: ast.expr, call: str | None) -> ast.AST:
        inner = _free_names(node) & self.local
        if inner - (self.loop if call else set()):  # the sandbox never sees names bound inside the statement
            raise _NotJudged
        self.sites.append(_Site(ast.unparse(node), call))
        self.calls.append(node if call else None)
        return ast.Call(ast.Name(_OUT, ast.Load()), [ast.Constant(len(self.sites) - 1)], [])


def _split(
    statement: ast.stmt, known: Callable[[str], bool], checkers: set[str]
) -> tuple[ast.Module, ast.Module, list[_Site]]:
    """A judged statement's code for the judge, the code that records its sandbox ops, and its sites."""
    statement = copy.deepcopy(statement)  # the splitter rewrites it in place
    if isinstance(statement, ast.For):
        if statement.orelse or not all(isinstance(child, (ast.Assert, ast.Expr)) for child in statement.body):
            raise _NotJudged
        loop = _bound_names(statement)
        if not all(name in loop or known(name) for name in _free_names(statement.iter)):
            raise _NotJudged
        body = statement.body
    elif isinstance(statement, (ast.Assert, ast.Expr)):
        loop, body = set(), [statement]
    else:
        raise _NotJudged
    splitter = _Splitter(known, loop | _inner_names(statement), loop, checkers)
    tick = ast.Expr(ast.Call(ast.Name(_TICK, ast.Load()), [], []))
    judged = [tick, *(splitter.visit(child) for child in body)]
    records = [ast.Expr(_record_call(k, call)) for k, call in enumerate(splitter.calls)]
    if isinstance(statement, ast.For):
        judge = ast.Module([ast.For(statement.target, statement.iter, judged, [])], [])
        record = ast.Module([ast.For(statement.target, statement.iter, records or [ast.Pass()], [])], [])
    else:
        judge, record = ast.Module(judged, []), ast.Module(records, [])
    return ast.fix_missing_locations(judge), ast.fix_missing_locations(record), splitter.sites


def _inner_names(statement: ast.stmt) -> set[str]:
    """Names a statement binds inside itself: loop targets, comprehension variables, lambda arguments."""
    names = {child.arg for child in ast.walk(statement) if isinstance(child, ast.arg)}
    return names | {
        child.id for child in ast.walk(statement) if isinstance(child, ast.Name) and not isinstance(child.ctx, ast.Load)
    }


def _record_call(k: int, call: ast.Call | None) -> ast.Call:
    """`_dash_record(k, *arguments)`: the judge computes a call's arguments where the statement would."""
    if call is None:
        return ast.Call(ast.Name(_RECORD, ast.Load()), [ast.Constant(k)], [])
    return ast.Call(ast.Name(_RECORD, ast.Load()), [ast.Constant(k), *call.args], call.keywords)
