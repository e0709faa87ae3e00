"""Judge an untrusted Python program by its outputs: test inputs run in a sandbox, the comparison runs outside it.

What runs where. The calling process (the judge) parses `tests` (MBPP asserts, or an MBPP+ checker) and splits it
statement by statement; the program never touches the judge's process:
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
program's definition of it. Values leave the sandbox as plain data, by exact type: None, bool, int, float, complex,
str, bytes, list, tuple, dict, set, frozenset and Counter, OrderedDict, defaultdict and deque of those (numpy scalars
become Python numbers). Anything else (a subclass, an object with its own __eq__, a generator, a match object)
reaches the judge as an opaque placeholder that equals only itself. No token proves completion: a value that is
missing, unreadable or forged is judged like any other, so exiting early, printing "passed" or reading the harness's
frames gains nothing. The judge stops at the first failure, and at the run's time limit (a data set's reference
function can be slow).

The sandbox. Each run is this file started as a script in a new session, with stdin and stdout on /dev/null, a clean
environment (PATH, HOME=its directory, a fixed hash seed, one BLAS thread; no AWS_*, MLFLOW_* or other secrets) and
Python's isolation flags, killed with SIGKILL at the wall-clock limit. Its layers, each holding where the next is
missing:
1. bubblewrap (Debian's `bubblewrap`), when it can run here: new IPC, PID, network, UTS and cgroup namespaces; a root
   that holds only the Python installation, the system libraries and this file, read-only; /tmp, the run's only
   writable directory, a private tmpfs of 64 MiB (the cap on the run's whole disk use); its own /proc and /dev.
   Killing bwrap ends the PID namespace, and with it everything the run started; the IPC namespace and tmpfs go too.
   Where bwrap cannot run, a warning is logged once and the run uses a fresh directory on the host's disk instead,
   where only each file's size is capped; the layers below are unchanged.
2. Resource limits: CPU seconds, address space, threads, file size, no core dumps. Layer 5 keeps the run to one
   process and forbids memory outside its address space (shared memory, memfd), so memory_mb caps the whole run
   (plus its files, at most 64 MiB).
3. Identity, when we are root: a fresh unprivileged uid, so the run cannot touch files of others or signal our
   processes. It keeps CAP_DAC_READ_SEARCH only when layer 4 is active (an interpreter under /root, pyenv, would be
   unreadable otherwise), and Landlock then decides what may be read.
4. Landlock (Linux >= 5.13): read only the Python installation and system libraries, write only the run's directory,
   no TCP (ABI >= 4), no signals outside the sandbox (ABI >= 6).
5. seccomp, a filter compiled by libseccomp (pyseccomp) in the judge and loaded by the harness: no sockets of any
   family (socket, socketpair, io_uring), no new processes (fork, vfork, clone without CLONE_THREAD; clone3 answers
   ENOSYS so that threads fall back to clone), no SysV or POSIX IPC objects, memfd or keyring entries (nothing outlives
   the run or escapes its memory cap), no new namespaces, bpf, ptrace, userfaultfd or perf events.
6. A Python guard like EvalPlus's reliability_guard (os.kill, os.fork, subprocess... raise PermissionError); a guard
   only, which ctypes goes around.
Not covered: the fallback statements above; a program that games its own inputs where the sandbox builds them; the
judge runs the data set's own test code in the calling process (trusted, like the data set) on at most 16 MiB of
returned data, so a costly reference function costs that there (MBPP+ 255's largest case takes 1.5 s and 1 GB, for a
program that passed every case before it); without bwrap, a run's total disk use; kernel bugs and timing channels.
"""

from __future__ import annotations

import ast
import builtins
import collections
import contextlib
import copy
import ctypes
import errno
import functools
import importlib
import json
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import CodeType

from py_landlock import AccessFs, Landlock, LandlockError, get_abi_version

STATUSES = ("passed", "failed", "timeout", "error", "crashed")

_DETAIL_CHARS = 500
_MAX_THREADS = 32  # RLIMIT_NPROC: threads, since layer 5 allows no other process
_MAX_DISK_BYTES = 64 << 20  # the run's tmpfs under bwrap, and any one file
_MAX_OUTPUT_BYTES = 16 << 20  # returned data the judge reads from one run
_CRASHED = 12  # exit code of a harness that ran out of memory before it could say so
# -I would ignore PYTHONHASHSEED; the environment is built from scratch, so -s -P isolate just as well.
_ISOLATION = ("-s", "-P") if sys.version_info >= (3, 11) else ("-I",)
_SANDBOX_UID_BASE, _SANDBOX_UID_COUNT = 1_500_000_000, 100_000_000  # a range no real account uses
_SANDBOX_DIR = "/tmp"  # the run's directory inside bwrap: programs that write to /tmp keep working
_SYSTEM_READABLE = ("/usr", "/lib", "/lib64", "/lib32", "/etc/ld.so.cache", "/etc/localtime", "/dev/urandom")

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

_CLONE_THREAD = 0x00010000
_DENIED_SYSCALLS = (
    "socket socketpair io_uring_setup fork vfork memfd_create shmget msgget semget mq_open add_key request_key keyctl "
    "unshare setns bpf ptrace process_vm_readv process_vm_writev userfaultfd perf_event_open".split()
)


@dataclass(frozen=True)
class CodeResult:
    passed: bool
    status: str  # one of STATUSES
    detail: str  # why it did not pass (the judge's or the program's exception), then the end of stderr
    duration_s: float


def run_tests(program: str, tests: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> CodeResult:
    """Run `program` and the parts of `tests` that need it in a fresh sandbox, and judge the results here.

    Raises RuntimeError only when the sandbox itself cannot be set up, never because of what the program does.
    """
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


# ---- plain data across the sandbox's boundary ----


class _Opaque:
    """A returned value that is not plain data: the judge knows only its type's name, and it equals only itself."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"<{self.type_name} object>"


_SEQUENCES = {kind.__name__: kind for kind in (tuple, set, frozenset, collections.deque)}
_MAPPINGS: dict[str, Callable] = {"dict": dict, "OrderedDict": collections.OrderedDict}
_MAPPINGS["Counter"] = lambda pairs: collections.Counter(dict(pairs))  # Counter(pairs) would count them
_MAPPINGS["defaultdict"] = lambda pairs: collections.defaultdict(None, pairs)
_SEQUENCE_TYPES = tuple(_SEQUENCES.values())
_MAPPING_TYPES = (dict, collections.Counter, collections.OrderedDict, collections.defaultdict)


def _encode(value: object, strict: bool = False) -> object:
    """`value` as JSON-ready data, by exact type; anything else becomes an opaque marker, or a TypeError if `strict`."""
    numpy = sys.modules.get("numpy")

    def walk(item: object) -> object:  # recursion through a closure: patching this module cannot redirect it
        kind = type(item)
        if item is None or kind is bool or kind is str or kind is float:
            return item
        if kind is int:
            return item if -(1 << 63) < item < 1 << 63 else {"int": hex(item)}  # JSON readers differ on big ints
        if kind is list:
            return [walk(element) for element in item]
        if kind in _SEQUENCE_TYPES:
            return {kind.__name__: [walk(element) for element in item]}
        if kind in _MAPPING_TYPES:
            return {kind.__name__: [[walk(key), walk(element)] for key, element in item.items()]}
        if kind is bytes:
            return {"bytes": item.hex()}
        if kind is complex:
            return {"complex": [item.real, item.imag]}
        if numpy is not None and isinstance(item, numpy.generic):
            return walk(item.item())  # numpy's scalars stand for Python numbers; item() gives the exact type
        if strict:
            raise TypeError(f"{kind.__name__} is not plain data")
        return {"opaque": kind.__qualname__}

    return walk(value)


def _decode(text: str | bytes) -> object:
    """Parse JSON written by _encode into the judge's own types; ValueError or TypeError for anything else."""
    return json.loads(text, object_hook=_untag)  # lists stay lists; every JSON object must be a tag


def _untag(item: dict) -> object:
    if len(item) != 1:
        raise ValueError("not encoded data")
    ((tag, body),) = item.items()
    if tag in _SEQUENCES and type(body) is list:
        return _SEQUENCES[tag](body)
    if tag in _MAPPINGS and type(body) is list:
        return _MAPPINGS[tag](body)
    if tag == "int" and type(body) is str:
        return int(body, 16)
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "complex" and type(body) is list:
        return complex(*map(float, body))
    if tag == "opaque" and type(body) is str:
        return _Opaque(body)
    raise ValueError(f"unknown tag {tag!r}")


# ---- the plan: which parts of the tests run in the sandbox, and what the judge does with their values ----


@dataclass(frozen=True)
class _Site:
    """A part of a judged statement that needs the program."""

    source: str  # evaluated in the sandbox when it is not a call with data arguments
    call: str | None  # the name of the function under test, when the judge computes the arguments


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
    ops: tuple[tuple, ...]  # ("exec", source) | ("eval", source) | ("call", name, arguments as _encode's JSON)
    steps: tuple[_Step, ...]
    modules: tuple[str, ...]  # modules the judge binds by name: the tests use them without importing them
    error: str | None = None  # the tests fail on their own, whatever the program


class _NotJudged(Exception):
    """The statement cannot be split between sandbox and judge; it runs in the sandbox (the fallback)."""


class _Stop(Exception):
    """The judge cannot go on: the sandbox's value is missing, unreadable, or an exception."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status


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


def _called_names(tree: ast.Module) -> set[str]:
    return {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}


@functools.lru_cache(maxsize=1024)
def _shadow_candidates(tests: str) -> frozenset[str]:
    """Builtin or module names the tests call, when they call nothing else the program could define."""
    try:
        tree = ast.parse(tests)
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
        tree = ast.parse(program)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return frozenset()  # the sandbox reports why
    return candidates & set().union(*(_bound_names(statement) for statement in tree.body))


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


@functools.lru_cache(maxsize=1024)  # a data set's rows; MBPP+ plans are a few times their tests' size
def _plan(tests: str, shadowed: frozenset[str]) -> _Plan:
    """Split `tests` between the sandbox and the judge, computing the data arguments of the calls it sends."""
    try:
        tree = ast.parse(tests)
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
            code = compile(ast.Module([statement], []), "<tests>", "exec")
            try:
                _bind(namespace, modules)
                exec(code, namespace)
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
                code, sites = compile(judge, "<tests>", "exec"), len(site_list)
                sandbox_code.extend(ast.parse(op[1], mode="eval") for op in ops[first:] if op[0] == "eval")
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
            exec(compile(record, "<tests>", "exec"), namespace)
        except Exception:  # a loop is recorded whole or not at all: the sandbox then runs it
            raise _NotJudged from None
        return ops
    for k, statement in enumerate(record.body):
        try:
            exec(compile(ast.Module([statement], []), "<tests>", "exec"), namespace)
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


def _judge_import(name: str, globals=None, locals=None, fromlist=(), level=0):
    if level or name.partition(".")[0] not in _JUDGE_MODULES:
        raise ImportError(f"the judge does not import {name}")
    return importlib.__import__(name, globals, locals, fromlist, level)


_JUDGE_BUILTINS = {name: value for name, value in vars(builtins).items() if name not in _SANDBOX_ONLY}
_JUDGE_BUILTINS["__import__"] = _judge_import


def _judge_namespace(modules: tuple[str, ...]) -> dict:
    namespace = {"__name__": "__judge__", "__builtins__": _JUDGE_BUILTINS}
    _bind(namespace, modules)
    return namespace


def _bind(namespace: dict, modules: set[str] | tuple[str, ...]) -> None:
    """Bind modules the tests use without importing them (the program did), as the judge's own imports."""
    for name in modules:
        namespace.setdefault(name, importlib.import_module(name))


# ---- judging the sandbox's values ----


@dataclass
class _Outputs:
    """What came back from one run: one record per op after the program's, and how the run ended."""

    records: list[bytes]
    ended: tuple[str, str]  # the status and reason for a value that is missing
    stderr: str

    def get(self, index: int) -> list:
        if index >= len(self.records):
            raise _Stop(*self.ended)
        try:
            record = _decode(self.records[index])
        except (ValueError, TypeError, RecursionError, OverflowError):
            raise _Stop("failed", "unreadable output from the program") from None
        if type(record) is not list or not record:
            raise _Stop("failed", "unreadable output from the program")
        if record[0] == "raised" and len(record) == 3:
            raise _Stop(_RAISED_STATUS.get(str(record[1]), "error"), f"{record[1]}: {record[2]}".rstrip(": "))
        return record

    def value(self, index: int) -> object:
        record = self.get(index)
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
        return self.outputs.value(self.base + (self.iteration - 1) * self.sites + k)


def _judge(plan: _Plan, outputs: _Outputs, deadline: float) -> tuple[str, str]:
    """Replay the tests in the judge on the sandbox's values until `deadline`: (status, reason)."""
    namespace = _judge_namespace(plan.modules)
    step = None
    try:
        outputs.get(0)  # the program itself
        for step in plan.steps:
            base = 1 + step.first_op
            if step.judge is None or step.sites == 0:  # statements run in the sandbox: did they raise?
                for index in range(base, base + step.ops):
                    outputs.get(index)
            if step.judge is not None:
                replay = _Replay(outputs, base, step.sites, deadline)
                namespace[_TICK], namespace[_OUT] = replay.tick, replay.out
                exec(step.judge, namespace)
    except _Stop as stop:
        return stop.status, _where(str(stop), step)
    except AssertionError as error:
        return "failed", _where(f"AssertionError: {error}".rstrip(": "), step)
    except Exception as error:
        return "error", _where(f"{type(error).__name__}: {error}", step)
    return "passed", ""


def _where(reason: str, step: _Step | None) -> str:
    return f"{reason} (tests line {step.line})" if step is not None else reason


# ---- running the sandbox ----


@functools.cache
def _syscall_filter() -> bytes:
    """Layer 5 as a BPF program, compiled once by libseccomp (imported here: only code grading needs it)."""
    import pyseccomp as seccomp

    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in _DENIED_SYSCALLS:
        rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
    rules.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, _CLONE_THREAD, 0))
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")  # its flags are out of the filter's reach
    with tempfile.TemporaryFile() as program:
        rules.export_bpf(program)
        program.seek(0)
        return program.read()


@functools.cache
def _bwrap() -> tuple[str, ...] | None:
    """bubblewrap's command line up to the command, or None (warned once) where it cannot run here."""
    import logging  # here: the harness, which runs this file too, never logs

    log = logging.getLogger(__name__)
    path = shutil.which("bwrap")
    if path is None:
        log.warning("bubblewrap (bwrap) is not installed: the code sandbox runs without namespaces or a disk cap")
        return None
    command = (path, *_bwrap_arguments())
    try:
        probe = subprocess.run([*command, sys.executable, *_ISOLATION, "-c", "pass"], capture_output=True, timeout=60)
        reason = f"exit status {probe.returncode}: {probe.stderr.decode(errors='replace').strip()}"
    except (OSError, subprocess.TimeoutExpired) as error:
        probe, reason = None, f"{type(error).__name__}: {error}"
    if probe is None or probe.returncode != 0:
        log.warning("bubblewrap cannot run here (%s): the code sandbox runs without namespaces or a disk cap", reason)
        return None
    return command


def _bwrap_arguments() -> list[str]:
    """Namespaces, a read-only root of what Python needs, and a size-capped tmpfs as the run's directory."""
    arguments = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() != 0:  # root keeps the host's user namespace, to give the run a fresh host uid
        arguments.insert(0, "--unshare-user-try")
    arguments += ["--die-with-parent", "--new-session", "--perms", "0777", "--size", str(_MAX_DISK_BYTES)]
    arguments += ["--tmpfs", _SANDBOX_DIR]
    readable = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.realpath(__file__)}
    readable |= {"/usr", "/etc/ld.so.cache", "/etc/localtime"}
    for path in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):  # merged /usr: keep the links, which ld.so and scripts rely on
            arguments += ["--symlink", os.readlink(path), path]
        else:
            readable.add(path)
    made, bound = {"/"}, set()
    for path in sorted(readable):
        if not os.path.exists(path) or any(path.startswith(f"{done}/") for done in bound):
            continue
        parents = [parent for parent in _parents(path) if parent not in made]
        for parent in parents:  # bwrap would make them 0700, closed to the run's uid
            arguments += ["--perms", "0755", "--dir", parent]
        made.update(parents)
        bound.add(path)
        arguments += ["--ro-bind", path, path]
    return [*arguments, "--proc", "/proc", "--dev", "/dev", "--chdir", _SANDBOX_DIR]


def _parents(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _run_sandboxed(program: str, ops: tuple[tuple, ...], timeout_s: float, memory_mb: int) -> _Outputs:
    """Start the harness on `program` and `ops`, collect its records until it exits or the limit, then kill it."""
    bwrap = _bwrap()
    uid = _SANDBOX_UID_BASE + int.from_bytes(os.urandom(8), "big") % _SANDBOX_UID_COUNT if os.geteuid() == 0 else None
    with contextlib.ExitStack() as stack:
        if bwrap:
            workdir = _SANDBOX_DIR
        else:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="dash-sandbox-"))
            if uid is not None:
                os.chown(workdir, uid, uid)
        payload, ready = (stack.enter_context(tempfile.TemporaryFile()) for _ in range(2))
        job = {
            "program": program,
            "ops": ops,
            "workdir": workdir,
            "uid": uid,
            "timeout_s": timeout_s,
            "memory_mb": memory_mb,
            "seccomp": _syscall_filter().hex(),
        }
        payload.write(json.dumps(job).encode())
        payload.seek(0)
        results_read, results_write = os.pipe()
        stderr_read, stderr_write = os.pipe()
        stack.callback(os.close, results_read)
        stack.callback(os.close, stderr_read)
        fds = (payload.fileno(), ready.fileno(), results_write)
        try:
            proc = subprocess.Popen(
                [*(bwrap or ()), sys.executable, *_ISOLATION, __file__, *map(str, fds)],
                cwd=None if bwrap else workdir,
                env=_clean_env(workdir),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr_write,
                pass_fds=fds,
                start_new_session=True,
            )
        finally:
            os.close(results_write)
            os.close(stderr_write)
        try:
            timed_out, results, overflow, stderr = _collect(proc.pid, results_read, stderr_read, timeout_s)
        finally:
            with contextlib.suppress(ProcessLookupError):  # the leader is not reaped yet, so the group id is ours
                os.killpg(proc.pid, signal.SIGKILL)  # bwrap's death ends its PID namespace
            returncode = proc.wait()
        if bwrap and returncode > 128:  # bwrap exits with 128 + the signal that ended its command
            returncode = 128 - returncode
        ready.seek(0)
        if not timed_out and ready.read() != b"ready":
            raise RuntimeError(f"the code sandbox could not be set up: {stderr}")
    if timed_out or returncode == -signal.SIGXCPU:
        ended = ("timeout", f"stopped after {timeout_s:g} s")
    elif overflow:
        ended = ("failed", f"the program returned more than {_MAX_OUTPUT_BYTES >> 20} MiB")
    elif returncode < 0 or returncode == _CRASHED:
        ended = ("crashed", f"the program died (exit status {returncode})")
    else:
        ended = ("failed", "the program stopped before the tests finished")
    return _Outputs(results.split(b"\n")[:-1], ended, stderr)


def _collect(pid: int, results_fd: int, stderr_fd: int, timeout_s: float) -> tuple[bool, bytes, bool, str]:
    """Read both pipes until the process exits and they close, or the limit: (timed out, results, overflow, stderr)."""
    deadline = time.monotonic() + timeout_s
    pidfd = os.pidfd_open(pid)
    results, stderr = bytearray(), bytearray()
    overflow = False
    waiting = {pidfd, results_fd, stderr_fd}
    poller = select.poll()  # not select(): a trainer's descriptors may be numbered past FD_SETSIZE
    for fd in waiting:
        poller.register(fd, select.POLLIN)
    try:
        while waiting:
            events = poller.poll(max(deadline - time.monotonic(), 0) * 1000)
            if not events:
                return True, bytes(results), overflow, _text(stderr)
            for fd, _ in events:
                chunk = b"" if fd == pidfd else os.read(fd, 1 << 16)  # pidfd: exited; the pipes still hold the end
                if not chunk:
                    poller.unregister(fd)
                    waiting.discard(fd)
                elif fd == stderr_fd:
                    stderr = (stderr + chunk)[-4 * _DETAIL_CHARS :]
                elif len(results) + len(chunk) <= _MAX_OUTPUT_BYTES:
                    results += chunk
                else:
                    overflow = True  # keep draining, so the program is not blocked on a full pipe
        return False, bytes(results), overflow, _text(stderr)
    finally:
        os.close(pidfd)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")[-_DETAIL_CHARS:].strip()


def _clean_env(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


# ---- the sandbox side: this file run as a script ----


def _limit(timeout_s: float, memory_mb: int) -> None:
    cpu = math.ceil(timeout_s)
    for limit, value in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (memory_mb << 20,) * 2),
        (resource.RLIMIT_NPROC, (_MAX_THREADS,) * 2),
        (resource.RLIMIT_FSIZE, (_MAX_DISK_BYTES,) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(limit, value)


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32))


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_char_p))


def _become(uid: int, keep_read: bool) -> None:
    """Drop root for `uid`, keeping CAP_DAC_READ_SEARCH if `keep_read` (see layer 3 in the module docstring)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if keep_read:
        libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS: keep the permitted set across setuid
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if keep_read:
        data = (_CapData * 2)()
        data[0].effective = data[0].permitted = 1 << 2  # CAP_DAC_READ_SEARCH
        if libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), data) != 0:  # _LINUX_CAPABILITY_VERSION_3
            raise OSError(ctypes.get_errno(), "capset failed")


def _landlock(workdir: str) -> None:
    rules = Landlock(strict=False)  # use what the running kernel supports
    for path in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *_SYSTEM_READABLE}:
        if os.path.isdir(path):
            rules.allow_read(path)
        elif os.path.exists(path):
            rules.add_path_rule(path, access=AccessFs.READ_FILE)
    rules.add_path_rule(os.devnull, access=AccessFs.READ_FILE | AccessFs.WRITE_FILE)
    rules.allow_read_write(workdir)
    rules.apply()  # also sets no_new_privs


def _landlock_available() -> bool:
    try:
        return get_abi_version() >= 1
    except LandlockError:
        return False


def _seccomp(program: bytes) -> None:
    """Load the judge's compiled filter (layer 5) for this process and the threads it starts."""
    libc = ctypes.CDLL(None, use_errno=True)
    fprog = _SockFprog(len(program) // 8, program)  # 8 bytes per struct sock_filter
    # PR_SET_NO_NEW_PRIVS, then PR_SET_SECCOMP with SECCOMP_MODE_FILTER
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "loading the seccomp filter failed")


_GUARDED = {
    os: "kill killpg system popen fork forkpty setsid setpgid setpgrp execv execve execvp execvpe execl execle "
    "execlp execlpe spawnv spawnve spawnvp spawnvpe spawnl spawnle spawnlp spawnlpe posix_spawn posix_spawnp "
    "remove unlink rmdir removedirs rename renames replace truncate chmod fchmod lchmod chown fchown lchown chroot "
    "chdir fchdir link symlink setuid setgid setreuid setregid setresuid setresgid",
    shutil: "rmtree move chown",
    subprocess: "Popen run call check_call check_output getoutput getstatusoutput",
}


def _guard() -> None:
    def disabled(*args: object, **kwargs: object) -> None:
        raise PermissionError("disabled in the sandbox")

    for module, names in _GUARDED.items():
        for name in names.split():
            if hasattr(module, name):
                setattr(module, name, disabled)


def _sandbox_main(payload_fd: int, ready_fd: int, results_fd: int) -> None:
    """Confine this process, run the program, then each op, writing one record per op to `results_fd`."""
    with os.fdopen(payload_fd, "rb") as payload:
        job = json.load(payload)
    # Everything used after untrusted code starts is a local captured now: module globals can be patched.
    write, exit_now, run, evaluate, build, dumps = os.write, os._exit, exec, eval, compile, json.dumps
    settrace, setprofile, encode, decode, print_exception = sys.settrace, sys.setprofile, _encode, _decode, _print
    builtins_dict = vars(builtins)
    pristine = dict(builtins_dict)
    _confine(job)
    write(ready_fd, b"ready")  # tells the parent that setup worked; closed before untrusted code runs
    os.close(ready_fd)

    budget = _MAX_OUTPUT_BYTES - 1024  # what the judge reads, less room for the notice below

    def report(record: list) -> None:
        nonlocal budget
        line = (dumps(record, separators=(",", ":")) + "\n").encode()
        full = len(line) > budget
        if full:
            line = b'["raised","OverflowError","the outputs exceed what the judge reads"]\n'
        budget -= len(line)
        view = memoryview(line)
        while view:
            view = view[write(results_fd, view) :]
        if full:
            exit_now(0)  # nothing after this would be read

    def raised(error: BaseException) -> list:
        if isinstance(error, MemoryError):
            write(2, b"MemoryError\n")  # formatting a traceback may itself need memory
            return ["raised", "MemoryError", ""]
        print_exception(error)
        return ["raised", type(error).__name__, str(error)[:_DETAIL_CHARS]]

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        run(build(job["program"], "<program>", "exec"), namespace)
    except BaseException as error:
        record = raised(error)
        report(record)
        exit_now(_CRASHED if record[1] == "MemoryError" else 0)
    report(["ok"])
    settrace(None)
    setprofile(None)
    builtins_dict.clear()
    builtins_dict.update(pristine)
    namespace["__builtins__"] = builtins
    for kind, source, *arguments in job["ops"]:
        try:
            if kind == "exec":
                run(build(source, "<tests>", "exec"), namespace)
                record = ["ok"]
            else:
                if kind == "eval":
                    value = evaluate(build(source, "<tests>", "eval"), namespace)
                else:
                    function = namespace[source] if source in namespace else pristine.get(source)
                    if function is None:
                        raise NameError(f"name {source!r} is not defined")
                    args, kwargs = decode(arguments[0])
                    value = function(*args, **kwargs)
                try:
                    record = ["value", encode(value)]
                except RecursionError:
                    record = ["value", {"opaque": "nested too deeply"}]
        except BaseException as error:
            record = raised(error)
        report(record)
    exit_now(0)


def _print(error: BaseException) -> None:
    traceback.print_exception(error)
    sys.stderr.flush()


def _confine(job: dict) -> None:
    """Layers 2 to 6 of the module docstring (bwrap, layer 1, started us), then a check that Python still works."""
    _limit(job["timeout_s"], job["memory_mb"])
    landlock = _landlock_available()
    if job["uid"] is not None:
        _become(job["uid"], keep_read=landlock)
    if landlock:
        _landlock(job["workdir"])
    _seccomp(bytes.fromhex(job["seccomp"]))
    _guard()
    for name in ("stdlib", "purelib"):
        os.listdir(sysconfig.get_path(name))  # without Landlock, a uid that cannot reach /root fails here


if __name__ == "__main__":
    _sandbox_main(*map(int, sys.argv[1:4]))
