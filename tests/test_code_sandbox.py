"""The code sandbox against honest, broken and hostile programs: right status, and the host stays intact."""

from __future__ import annotations

import ctypes
import gzip
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

import pytest
from py_landlock import LandlockError, get_abi_version

import dash_core.rewards.code.sandbox as sandbox
from dash_core.rewards.code import (
    STATUSES,
    SandboxUnavailable,
    allow_weak_sandbox,
    mbpp_plus_tests,
    mbpp_tests,
    run_many,
    run_tests,
)
from dash_core.rewards.code.values import _decode

DATA = Path(__file__).resolve().parent / "data"  # excerpts shipped with the tests
ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"


def _sandbox_processes() -> list[int]:
    """Live processes running the sandbox harness (zombies have an empty command line)."""
    marker = sandbox.harness.__file__.encode()
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                command = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            except OSError:
                continue
            if marker in command:
                pids.append(int(entry.name))
    return pids


@pytest.fixture(autouse=True)
def host_stays_clean():
    """After every test: no sandbox process survives and no sandbox directory is left behind."""
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("dash-sandbox-*"))
    yield
    deadline = time.monotonic() + 10
    while _sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _sandbox_processes() == []
    assert set(tmp.glob("dash-sandbox-*")) <= before


def test_correct_program_passes() -> None:
    result = run_tests(ADD, ADD_TESTS)
    assert (result.passed, result.status) == (True, "passed")
    assert result.duration_s > 0


def test_wrong_program_fails() -> None:
    result = run_tests("def add(a, b):\n    return a - b\n", ADD_TESTS)
    assert (result.passed, result.status) == (False, "failed")
    assert "AssertionError" in result.detail


def test_syntax_error_is_an_error() -> None:
    result = run_tests("def add(a, b) return a + b\n", ADD_TESTS)
    assert result.status == "error"
    assert "SyntaxError" in result.detail


def test_exception_in_program_is_an_error() -> None:
    assert run_tests("1 / 0\n" + ADD, ADD_TESTS).status == "error"


def test_non_assertion_exception_in_tests_is_an_error() -> None:
    assert run_tests(ADD, "assert add(1, 2) == 3\nadd(None, 1)\n").status == "error"


def test_infinite_loop_times_out() -> None:
    result = run_tests("while True:\n    pass\n", ADD_TESTS, timeout_s=2)
    assert result.status == "timeout"
    assert result.duration_s < 10


def test_sleeping_program_times_out() -> None:
    assert run_tests("import time\ntime.sleep(60)\n", ADD_TESTS, timeout_s=1).status == "timeout"


@pytest.mark.parametrize(
    "bomb",
    ["x = bytearray(10**11)\n", "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n"],
    ids=["at-once", "growing"],
)
def test_memory_bomb_crashes(bomb: str) -> None:
    assert run_tests(bomb, ADD_TESTS, memory_mb=256).status == "crashed"


def test_fork_bomb_is_refused() -> None:
    assert run_tests("import os\nwhile True:\n    os.fork()\n", ADD_TESTS).status == "error"


def test_fork_bomb_around_the_guard_is_contained() -> None:
    # ctypes bypasses the Python guard; RLIMIT_NPROC caps the bomb and everything is killed at the wall limit,
    # including the processes that left the process group with setsid().
    bomb = "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    if libc.fork() == 0:\n        libc.setsid()\n"
    assert run_tests(bomb, ADD_TESTS, timeout_s=2).status == "timeout"


@pytest.mark.parametrize(
    ("program", "tests", "status"),
    [
        ("import sys\nsys.exit(0)\n" + ADD, ADD_TESTS, "failed"),
        ("import os\nos._exit(0)\n" + ADD, ADD_TESTS, "failed"),
        ("raise SystemExit(0)\n", ADD_TESTS, "failed"),
        ("quit()\n", ADD_TESTS, "failed"),
        (ADD, "assert add(1, 2) == 3\nraise SystemExit(0)\nassert add(1, 2) == 4\n", "failed"),
        (ADD, "import os\nassert add(1, 2) == 3\nos._exit(0)\nassert add(1, 2) == 4\n", "error"),  # no os in the judge
        (ADD, "import sys\nsys.exit(0)\nassert add(1, 2) == 4\n", "error"),  # the judge's sys has no exit
        ("import sys\ndef add(a, b):\n    sys.exit(0)\n", ADD_TESTS, "failed"),
        ("def add(a, b):\n    raise KeyboardInterrupt\n", "try:\n    add(1, 2)\nexcept BaseException:\n    pass\n", "failed"),
    ],
    ids=[
        "sys.exit", "os._exit", "SystemExit", "quit", "SystemExit-in-tests", "os._exit-in-tests", "exit-in-tests",
        "exit-in-a-call", "interrupt-the-tests-catch",
    ],
)  # fmt: skip
def test_exiting_early_is_not_passing(program: str, tests: str, status: str) -> None:
    result = run_tests(program, tests)
    assert (result.passed, result.status) == (False, status)


def test_printing_success_is_not_passing() -> None:
    forger = (
        "import os, sys\n"
        "claims = ['passed', 'PASSED', 'OK', 'ok', 'True', '1', 'All tests passed', '0' * 32, 'f' * 32]\n"
        "for claim in claims:\n"
        "    print(claim)\n"
        "    print(claim, file=sys.stderr)\n"
        "    for fd in range(3, 64):\n"
        "        try:\n"
        "            os.write(fd, claim.encode())\n"
        "        except OSError:\n"
        "            pass\n"
        "os._exit(0)\n"
    )
    assert run_tests(forger, ADD_TESTS).status == "failed"


def test_tampering_with_the_checker_is_not_passing() -> None:
    tamper = (
        "import atexit, builtins, os, sys\n"
        "builtins.exec = lambda *args, **kwargs: None\n"
        "builtins.compile = lambda *args, **kwargs: None\n"
        "builtins.AssertionError = type('Harmless', (Exception,), {})\n"
        "sys.exit = lambda *args: None\n"
        "atexit.register(os._exit, 0)\n"
        "harness = sys.modules['__main__']\n"
        "for name, value in list(vars(harness).items()):\n"
        "    if callable(value) and not isinstance(value, type):\n"
        "        setattr(harness, name, lambda *args, **kwargs: None)\n"
        "def skip_asserts(frame, event, arg):\n"  # jumping over assert lines works in plain Python
        "    if frame.f_code.co_filename != '<tests>':\n"
        "        return None\n"
        "    def local(frame, event, arg):\n"
        "        if event == 'line' and frame.f_lineno == 2:\n"
        "            frame.f_lineno = 3\n"
        "        return local\n"
        "    return local\n"
        "sys.settrace(skip_asserts)\n"
        "__builtins__ = {'len': lambda x: 0}\n" + ADD
    )
    result = run_tests(tamper, "x = add(1, 1)\nassert x == 3\nx = 0\n")
    assert not result.passed  # its patched harness answers None for `add`: an error, when the tests call it


def test_killing_the_parent_is_refused() -> None:
    guarded = "import os\nos.kill(os.getppid(), 9)\n" + ADD
    assert run_tests(guarded, ADD_TESTS).status == "error"
    direct = "import ctypes, os\nstatus = ctypes.CDLL(None).kill(os.getppid(), 9)\n"
    result = run_tests(direct, "assert status == 0\n")  # the kernel must say no
    assert result.status == "failed"
    os.kill(os.getpid(), 0)  # and we are alive to check


@pytest.mark.parametrize("shared", [False, True], ids=["private-dir", "world-writable-dir"])
def test_files_outside_the_sandbox_cannot_be_changed(tmp_path: Path, shared: bool) -> None:
    folder = tmp_path / "shared" if shared else tmp_path
    folder.mkdir(exist_ok=True)
    target = folder / "keep.txt"
    target.write_text("precious")
    if shared:
        os.chmod(tmp_path, 0o755)
        os.chmod(folder, 0o777)
        os.chmod(target, 0o666)
    vandal = (
        "import ctypes, os, shutil\n"
        f"path = {str(target)!r}\n"
        "libc = ctypes.CDLL(None)\n"
        "attempts = [lambda: os.remove(path), lambda: shutil.rmtree(os.path.dirname(path)),\n"
        "            lambda: libc.unlink(path.encode()), lambda: libc.rename(path.encode(), b'moved'),\n"
        "            lambda: libc.truncate(path.encode(), 0), lambda: open(path, 'w').close()]\n"
        "succeeded = []\n"
        "for number, attempt in enumerate(attempts):\n"
        "    try:\n"
        "        if attempt() in (0, None):\n"  # libc returns 0 on success, the Python calls None
        "            succeeded.append(number)\n"
        "    except Exception:\n"
        "        pass\n"
    )
    result = run_tests(vandal, "assert succeeded\n")
    assert result.status == "failed"
    assert target.read_text() == "precious"


def test_files_inside_the_sandbox_can_be_used() -> None:
    program = (
        "with open('scratch.txt', 'w') as f:\n    f.write('hi')\ndef read():\n    return open('scratch.txt').read()\n"
    )
    assert run_tests(program, "assert read() == 'hi'\n").status == "passed"


def test_private_host_files_cannot_be_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-4711")
    secret.chmod(0o600)
    reader = (
        "import sys\n"
        "try:\n"
        f"    data = open({str(secret)!r}).read()\n"
        "except OSError as error:\n"
        "    data = str(error)\n"
        "print(data, file=sys.stderr)\n"
    )
    result = run_tests(reader, "assert 'TOPSECRET' in data\n")
    assert result.status == "failed"
    assert "TOPSECRET" not in result.detail


def _landlock_abi() -> int:
    try:
        return get_abi_version()
    except LandlockError:
        return 0


@pytest.mark.skipif(_landlock_abi() < 1, reason="the kernel has no Landlock")
def test_only_the_python_installation_is_readable(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    public = tmp_path / "public.txt"
    public.write_text("anyone may read this")
    public.chmod(0o644)
    reader = f"try:\n    data = open({str(public)!r}).read()\nexcept OSError:\n    data = ''\n"
    assert run_tests(reader, "assert data\n").status == "failed"


@pytest.mark.skipif(_landlock_abi() < 4, reason="the kernel's Landlock does not handle TCP")
def test_no_tcp_connections() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        caller = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n"
            "    connected = True\n"
            "except OSError:\n"
            "    connected = False\n"
        )
        assert run_tests(caller, "assert connected\n").status == "failed"


def test_host_environment_is_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASH_TEST_SECRET", "hunter2-0451")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2-0452")
    snoop = (
        "import os, sys\n"
        "seen = [repr(dict(os.environ))]\n"
        "for path in ['/proc/self/environ', f'/proc/{os.getppid()}/environ']:\n"
        "    try:\n"
        "        seen.append(open(path, 'rb').read().decode(errors='replace'))\n"
        "    except OSError as error:\n"
        "        seen.append(str(error))\n"
        "blob = '\\n'.join(seen)\n"
        "print(blob, file=sys.stderr)\n"
    )
    result = run_tests(snoop, "assert 'hunter2' in blob\n")
    assert result.status == "failed"
    assert "hunter2" not in result.detail


def test_run_many_keeps_order_and_statuses() -> None:
    cases = [
        (ADD, ADD_TESTS, "passed"),
        ("def add(a, b):\n    return 0\n", ADD_TESTS, "failed"),
        ("def add(a, b)\n", ADD_TESTS, "error"),
        ("while True:\n    pass\n", ADD_TESTS, "timeout"),
        ("x = bytearray(10**11)\n", ADD_TESTS, "crashed"),
        ("import os\nos._exit(0)\n", ADD_TESTS, "failed"),
        ("def square(x):\n    return x * x\n", "assert square(3) == 9\n", "passed"),
        ("def square(x):\n    return x + x\n", "assert square(3) == 9\n", "failed"),
        ("import time\ntime.sleep(30)\n", ADD_TESTS, "timeout"),
        ("import numpy as np\ndef mean(xs):\n    return float(np.mean(xs))\n", "assert mean([1, 3]) == 2\n", "passed"),
        (ADD, "assert add(1, 2) == 3\nraise KeyError('x')\n", "error"),
        ("import os\nos.abort()\n", ADD_TESTS, "crashed"),
        ("import sys\nsys.exit(0)\n", ADD_TESTS, "failed"),
        ("def first(xs):\n    return xs[0]\n", "assert first([4, 5]) == 4\n", "passed"),
        ("def first(xs):\n    return xs[1]\n", "assert first([4, 5]) == 4\n", "failed"),
        (ADD, ADD_TESTS, "passed"),
    ]
    results = run_many([(program, tests) for program, tests, _ in cases], timeout_s=3, workers=4)
    assert [result.status for result in results] == [expected for _, _, expected in cases]
    assert all(result.status in STATUSES for result in results)
    assert [result.passed for result in results] == [expected == "passed" for _, _, expected in cases]


def _rows(name: str) -> list[dict]:
    path = DATA / name
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as lines:
        return [json.loads(line) for line in lines]


def test_mbpp_plus_canonical_solutions_pass_and_a_wrong_one_fails() -> None:
    rows = _rows("mbppplus_originfmt.jsonl.gz")
    results = run_many([(row["code"], mbpp_plus_tests(row)) for row in rows], timeout_s=20)
    assert [(row["task_id"], result.status) for row, result in zip(rows, results, strict=True)] == [
        (row["task_id"], "passed") for row in rows
    ]
    first = rows[0]
    wrong = "def similar_elements(test_tup1, test_tup2):\n    return tuple(test_tup1)\n"
    assert run_tests(wrong, mbpp_plus_tests(first)).status == "failed"


@pytest.mark.parametrize(
    ("expected", "right", "wrong"),
    [(240.0, "240.0", "[]"), ([], "[]", "3.0"), ((1.5, 2.5), "(1.5, 2.5)", "[1.5, 2.5]"), ([1.0, 2.0], "[1.0, 2.0]", "[[1.0, 2.0]]"),
     ([1.0, 2.0], "[1.0, 2.0]", "[1.0]"), (2.5, "2.5", "(2.5,)")],
    ids=["empty-for-float", "float-for-empty", "list-for-tuple", "nested-list", "shorter", "tuple-for-float"],
)  # fmt: skip
def test_a_tolerance_compares_only_values_of_one_type_and_shape(expected, right: str, wrong: str) -> None:
    """MBPP+'s checker calls np.allclose when the output differs from a float expectation, and numpy broadcasts:
    `np.allclose([], 3.14)` is True. The judge's numpy compares within a tolerance only what EvalPlus would."""
    row = next(row for row in _rows("mbppplus_originfmt.jsonl.gz") if row["task_id"] == 14)  # float results
    checker = mbpp_plus_tests(row).split("\ninputs = ")[0]  # the row's imports and its `assertion`
    cases = f"\nfor inp, exp in zip([[0]], [{expected!r}]):\n    assertion(f(*inp), exp, 0)\n"
    assert run_tests(f"def f(x):\n    return {right}\n", checker + cases).passed
    assert run_tests(f"def f(x):\n    return {wrong}\n", checker + cases).status == "failed"


def test_math_isclose_compares_only_values_of_one_type() -> None:
    tests = "import math\nassert math.isclose(f(0), 240.0, rel_tol=1e-6)\n"
    assert run_tests("def f(x):\n    return 240.0\n", tests).passed
    assert run_tests("def f(x):\n    return 240\n", tests).status == "failed"  # EvalPlus's type rule, as numpy's


def test_returned_sets_whose_elements_share_one_hash_are_refused_before_they_are_built() -> None:
    """A set of k * (2**61 - 1) costs quadratic time to build (all hash to 0): 8k took 0.41 s in the trainer's
    process, 16 MiB of them about half an hour, inside one C call holding the GIL. Decoding refuses it first."""
    colliding = [k * (2**61 - 1) for k in range(1, 50_000)]
    for body in ({"set": colliding}, {"frozenset": colliding}, {"dict": [[k, 0] for k in colliding]}):
        with pytest.raises(ValueError, match="share a hash"):
            _decode(json.dumps(["value", body]))
    assert _decode(json.dumps(["value", {"set": [-1, -2, 3]}])) == ["value", {-1, -2, 3}]  # hash(-1) == hash(-2)
    with pytest.raises(TimeoutError):
        _decode(json.dumps([{"dict": [[i, i]]} for i in range(1000)]), deadline=time.monotonic() - 1)
    program = "def f():\n    return {k * (2**61 - 1) for k in range(1, 3000)}\n"
    result = run_tests(program, "assert f() == {1}\n")
    assert result.status == "failed" and "share a hash" in result.detail


def test_mbpp_tests_run_setup_code_first() -> None:
    rows = [row for row in _rows("mbpp.jsonl") if row["test_setup_code"]]
    results = run_many([(row["code"], mbpp_tests(row)) for row in rows], timeout_s=20)
    assert [result.status for result in results] == ["passed"] * len(rows)


def test_mbpp_special_forms_pass_and_wrong_ones_fail() -> None:
    # 126 names its function `sum`, 596 compares with sys.getsizeof, 601 builds its arguments from the program's class.
    rows = {row["task_id"]: row for row in _rows("mbpp_special.jsonl")}
    results = run_many([(row["code"], mbpp_tests(row)) for row in rows.values()], timeout_s=20)
    assert [result.status for result in results] == ["passed"] * len(rows)
    wrong = {
        126: "def sum(a, b):\n    return a + b\n",
        596: "def tuple_size(items):\n    return len(items)\n",
        601: "class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\ndef max_chain_length(pairs, n):\n    return n\n",
    }
    results = run_many([(wrong[task], mbpp_tests(rows[task])) for task in wrong], timeout_s=20)
    assert [result.passed for result in results] == [False] * len(wrong)


def test_mbpp_plus_rows_returning_a_counter_or_a_match_object() -> None:
    # 88 compares with a Counter from the row's reference function; 737's checker asserts nothing about the value.
    rows = {row["task_id"]: row for row in _rows("mbppplus_originfmt_special.jsonl")}
    results = run_many([(row["code"], mbpp_plus_tests(row)) for row in rows.values()], timeout_s=20)
    assert [result.status for result in results] == ["passed"] * len(rows)
    tests = mbpp_plus_tests(rows[88])
    plain = "def freq_count(items):\n    counts = {}\n    for item in items:\n        counts[item] = counts.get(item, 0) + 1\n    return counts\n"
    assert run_tests(plain, tests).status == "passed"
    assert run_tests("def freq_count(items):\n    return {item: 1 for item in items}\n", tests).status == "failed"


@pytest.mark.parametrize(
    ("program", "tests", "expected"),
    [
        (
            "import math\ndef area(r):\n    return math.pi * r * r\n",
            "import math\nassert math.isclose(area(2), 12.566, rel_tol=0.001)\n",
            "passed",
        ),
        (
            "def area(r):\n    return 3 * r * r\n",
            "import math\nassert math.isclose(area(2), 12.566, rel_tol=0.001)\n",
            "failed",
        ),
        ("def is_even(n):\n    return n % 2 == 0\n", "assert is_even(4)\nassert not is_even(3)\n", "passed"),
        ("def is_even(n):\n    return True\n", "assert is_even(4)\nassert not is_even(3)\n", "failed"),
        (
            "def common(a, b):\n    return list(set(a) & set(b))\n",
            "assert set(common([1, 2], [3, 2])) == set([2])\n",
            "passed",
        ),
        ("def common(a, b):\n    return a\n", "assert set(common([1, 2], [3, 2])) == set([2])\n", "failed"),
        ("def pair(a):\n    return (a, a)\n", "assert pair(1) == (1, 1)\nassert pair('x')[1] == 'x'\n", "passed"),
        ("def pair(a):\n    return [a, a]\n", "assert pair(1) == (1, 1)\n", "failed"),  # a list is not a tuple
    ],
)
def test_mbpp_assert_forms_are_judged_outside(program: str, tests: str, expected: str) -> None:
    assert run_tests(program, tests).status == expected


# ---- hostile programs that today's judge must refuse: each passed the in-sandbox judge it replaced ----

ANYTHING = "class Anything:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
ANY_INT = "class AnyInt(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"


@pytest.mark.parametrize(
    ("program", "tests"),
    [
        (ANYTHING + "def add(a, b):\n    return Anything()\n", "assert add(1, 2) == 3\n"),
        (ANYTHING + "def add(a, b):\n    return Anything()\n", "assert 3 == add(1, 2)\n"),
        (ANY_INT + "def add(a, b):\n    return AnyInt(0)\n", "assert add(1, 2) == 3\n"),
        (ANY_INT + "def add(a, b):\n    return AnyInt(0)\n", "assert 3 == add(1, 2)\n"),
        (ANYTHING + "def is_not_prime(n):\n    return Anything()\n", None),  # MBPP+ row 3, the row's own checker
    ],
    ids=["object", "object-reversed", "int-subclass", "int-subclass-reversed", "mbpp-plus"],
)
def test_values_that_equal_anything_do_not_pass(program: str, tests: str | None) -> None:
    tests = tests or mbpp_plus_tests(_rows("mbppplus_originfmt.jsonl.gz")[1])
    assert not run_tests(program, tests).passed


def test_redefining_a_builtin_the_tests_use_does_not_pass() -> None:
    wrong = "def sort_digits(x):\n    return [9]\n"
    tests = "assert sorted(sort_digits([3, 1, 2])) == sorted([1, 2, 3])\n"
    assert run_tests(wrong, tests).status == "failed"
    assert run_tests("sorted = lambda items: 0\n" + wrong, tests).status == "failed"


@pytest.mark.parametrize("plus", [False, True], ids=["mbpp", "mbpp-plus"])
def test_redefining_set_does_not_pass_a_real_row(plus: bool) -> None:
    # similar_elements: MBPP+ row 2's checker compares set(out) with set(exp); the MBPP row's asserts use set() too.
    row = _rows("mbppplus_originfmt.jsonl.gz")[0] if plus else _rows("mbpp.jsonl")[1]
    tests = (
        mbpp_plus_tests(row)
        if plus
        else "\n".join(
            f"assert set({a.split('assert ')[1].split(' == ')[0]}) == set({a.split(' == ')[1]})"
            for a in row["test_list"]
        )
    )
    wrong = "def similar_elements(test_tup1, test_tup2):\n    return ()\n"
    assert run_tests(wrong, tests).status == "failed"
    assert not run_tests("set = lambda items: 0\n" + wrong, tests).passed


@pytest.mark.parametrize("imported", [True, False], ids=["tests-import-math", "program-imports-math"])
def test_patching_math_isclose_does_not_pass(imported: bool) -> None:
    cheat = "import math\nmath.isclose = lambda *args, **kwargs: True\ndef area(r):\n    return 0.0\n"
    tests = ("import math\n" if imported else "") + "assert math.isclose(area(2), 12.566, rel_tol=0.001)\n"
    assert run_tests(cheat, tests).status == "failed"


# ---- the judge runs every line of the tests; the program answers only what it is asked ----

FORGE = (  # writes `lines` to every descriptor: the harness's answers pipe is among them, whatever its number
    "import os\n"
    "def forge(lines):\n"
    "    for fd in range(3, 64):\n"
    "        try:\n"
    "            os.write(fd, lines)\n"
    "        except OSError:\n"
    "            pass\n"
)


@pytest.mark.parametrize(
    ("program", "tests"),
    [
        (FORGE + "forge(b'[\"ok\"]\\n' * 8)\nos._exit(0)\n", "assert all(add(x, 1) == x + 1 for x in [1, 2, 3])\n"),
        (FORGE + "def add(a, b):\n    forge(b'[\"value\", 3]\\n')\n    return 0\n", ADD_TESTS),
        (FORGE + "def add(a, b):\n    if a == -1:\n        forge(b'[\"value\", 0]\\n')\n    return a + b + (a == 1)\n", ADD_TESTS),
        (FORGE + "def add(a, b):\n    if a == -1:\n        forge(b'[\"value\", 0]\\n')\n    return a + b\n", ADD_TESTS),
        (FORGE + "forge(b'[\"names\", [\"add\"]]\\n[\"value\", 3]\\n[\"value\", 0]\\n')\ndef add(a, b):\n    return 0\n", ADD_TESTS),
        (FORGE + "def add(a, b):\n    forge(b'passed\\n')\n    return a + b\n", ADD_TESTS),
    ],
    ids=["ok-records-then-exit", "an-answer-ahead", "an-extra-answer", "an-extra-answer-after-the-last", "before-the-first-call", "malformed"],
)  # fmt: skip
def test_forged_answers_fail(program: str, tests: str) -> None:
    """Bytes on the answers pipe are only ever the answer to the request the judge made, in order: one more, one
    before, or one it cannot read fails the program, even where every answer it read was right."""
    result = run_tests(program, tests)
    assert (result.passed, result.status) == (False, "failed"), result.detail


PAIR = "class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n"
SQUARE = "def square(x):\n    return x * x\n"


@pytest.mark.parametrize(
    ("right", "wrong", "tests"),
    [
        (SQUARE, ANYTHING + "def square(x):\n    return Anything()\n", "assert all(square(x) == x * x for x in [1, 2, 3])\n"),
        (SQUARE, ANYTHING + "def square(x):\n    return Anything()\n", "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\ncheck(square)\n"),
        (PAIR + "def first(p):\n    return p.a\n", ANYTHING + PAIR + "def first(p):\n    return Anything()\n", "for p in [Pair(1, 2), Pair(3, 4)]:\n    assert first(p) == p.a\n"),
        ("def is_even(n):\n    return n % 2 == 0\n", "def is_even(n):\n    raise StopIteration\n", "assert all(map(is_even, [2, 4, 6]))\nassert not any(map(is_even, [1, 3]))\n"),
        ("def root(x):\n    if x < 0:\n        raise ValueError(x)\n    return x ** 0.5\n", "def root(x):\n    return x ** 0.5\n", "assert root(4) == 2\ntry:\n    root(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError('no ValueError')\n"),
    ],
    ids=["comprehension", "check-candidate", "loop-over-the-program's-objects", "stop-iteration-in-map", "expected-exception"],
)  # fmt: skip
def test_every_statement_is_judged_outside(right: str, wrong: str, tests: str) -> None:
    """Comprehensions, a checker handed the program's function, loops over objects of the program's classes and the
    tests' own try/except all run in the judge: a value that equals anything, or a StopIteration that would end the
    tests' `map` early, earns nothing there."""
    assert run_tests(right, tests).status == "passed"
    assert not run_tests(wrong, tests).passed


def test_redefining_the_tests_loop_builtins_does_not_pass_a_row_whose_function_is_a_builtin() -> None:
    """MBPP+ 126's function is named `sum`, and its tests call only builtins. Redefining `zip` too made the whole
    checker loop, expected values included, run beside the program: `zip` chose what `sum` was checked against."""
    row = next(row for row in _rows("mbppplus_originfmt_special.jsonl") if row["task_id"] == 126)
    cheat = "def zip(*lists):\n    return [((0, 0), 0)]\ndef sum(a, b):\n    return 0\n"
    assert run_tests(row["code"], mbpp_plus_tests(row)).status == "passed"
    assert run_tests(cheat, mbpp_plus_tests(row)).status == "failed"


@pytest.mark.parametrize(
    ("program", "tests"),
    [
        ("def evens(xs):\n    return (x for x in xs if x % 2 == 0)\n", "assert list(evens([1, 2, 3, 4])) == [2, 4]\n"),
        ("import numpy as np\ndef double(xs):\n    return np.array(xs) * 2\n", "assert list(double([1, 2])) == [2, 4]\nassert double([1.5]).tolist() == [3.0]\n"),
        ("def names(xs):\n    return map(str, xs)\n", "assert sorted(names([2, 1])) == ['1', '2']\nassert '1' in names([1])\n"),
        ("class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n        self.items.append(x)\n    def pop(self):\n        return self.items.pop()\n", "s = Stack()\ns.push(1)\ns.push(2)\nassert s.pop() == 2\nassert len(s.items) == 1\n"),
        ("def types(xs, kind):\n    return [x for x in xs if isinstance(x, kind)]\n", "assert types([1, 'a', 2.0], int) == [1]\nassert types([1, 'a'], str) == ['a']\n"),
    ],
    ids=["generator", "numpy-array", "map-object", "class-with-methods", "a-type-as-argument"],
)  # fmt: skip
def test_right_programs_returning_objects_pass(program: str, tests: str) -> None:
    """A generator, an array or an instance stays in the sandbox as a handle that the judge iterates, indexes and calls."""
    result = run_tests(program, tests)
    assert result.status == "passed", result.detail


def test_no_dunder_attribute_crosses() -> None:
    """numpy reads `__array_interface__` as an address in the judge's memory: a handle shares no dunder attribute, so
    the array numpy builds holds the handle itself."""
    program = (
        "class Fake:\n"
        "    __array_interface__ = {'data': (8, False), 'shape': (1 << 30,), 'typestr': '<f8', 'version': 3}\n"
        "def f():\n"
        "    return Fake()\n"
    )
    result = run_tests(program, "import numpy as np\nassert np.array(f()).sum() == 0\n")
    assert result.status in ("failed", "error"), result.detail


def test_the_program_raising_a_grader_error_is_its_own_error() -> None:
    """The judge retries its own SystemErrors and then fails the batch: the program's are only its error."""
    result = run_tests("def add(a, b):\n    raise SystemError('boom')\n", ADD_TESTS)
    assert (result.status, result.detail.splitlines()[0]) == ("error", "SystemError: boom (tests line 1)")


def test_expected_outputs_never_reach_the_sandbox() -> None:
    row = _rows("mbppplus_originfmt.jsonl.gz")[0]
    peek = "def similar_elements(a, b):\n    return results[inputs.index([a, b])]\n"  # the checker's own lists
    assert not run_tests(peek, mbpp_plus_tests(row)).passed


@pytest.mark.parametrize(
    "opener",
    [
        "socket.socket(socket.AF_INET, socket.SOCK_DGRAM)",
        "socket.socket(socket.AF_INET6, socket.SOCK_STREAM)",
        "socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)",
        "socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)",
        "socket.socketpair()",
    ],
    ids=["udp", "tcp6", "unix", "netlink", "socketpair"],
)
def test_no_sockets_of_any_family(opener: str) -> None:
    program = f"import socket\ntry:\n    {opener}\n    opened = True\nexcept OSError:\n    opened = False\n"
    assert run_tests(program, "assert opened\n").status == "failed"


def test_no_udp_datagrams() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(1)
        sender = (
            "import socket\n"
            "try:\n"
            f"    sent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', {listener.getsockname()!r}) == 1\n"
            "except OSError:\n"
            "    sent = False\n"
        )
        result = run_tests(sender, "assert sent\n")
        with pytest.raises(TimeoutError):
            listener.recvfrom(16)
    assert result.status == "failed"


def test_no_unix_socket_connections(tmp_path: Path) -> None:
    path = tmp_path / "host.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        server.settimeout(1)
        path.chmod(0o777)
        caller = (
            "import socket\n"
            "try:\n"
            f"    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect({str(path)!r})\n"
            "    connected = True\n"
            "except OSError:\n"
            "    connected = False\n"
        )
        result = run_tests(caller, "assert connected\n")
        with pytest.raises(TimeoutError):
            server.accept()
    assert result.status == "failed"


def test_no_tcp_fast_open() -> None:
    # sendto(MSG_FASTOPEN) connects without connect(), where Landlock's TCP rule is checked.
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(1)
        caller = (
            "import socket\n"
            "try:\n"
            f"    socket.socket().sendto(b'x', socket.MSG_FASTOPEN, ('127.0.0.1', {server.getsockname()[1]}))\n"
            "    sent = True\n"
            "except OSError:\n"
            "    sent = False\n"
        )
        result = run_tests(caller, "assert sent\n")
        with pytest.raises(TimeoutError):
            server.accept()
    assert result.status == "failed"


@pytest.mark.skipif(
    sandbox.isolation_problem() is not None, reason="the run's total disk use is capped by bubblewrap's tmpfs"
)
def test_total_disk_use_is_capped() -> None:
    writer = (
        "written = 0\n"
        "chunk = b'x' * (32 << 20)\n"
        "try:\n"
        "    for number in range(16):\n"  # each file under the per-file limit
        "        with open(f'big{number}', 'wb') as out:\n"
        "            out.write(chunk)\n"
        "        written += len(chunk)\n"
        "except OSError:\n"
        "    pass\n"
    )
    assert run_tests(writer, "assert written >= 256 << 20\n").status == "failed"


def _shared_memory_segments() -> set[int]:
    with open("/proc/sysvipc/shm") as table:
        return {int(line.split()[1]) for line in list(table)[1:]}


def test_no_shared_memory_outlives_the_run() -> None:
    before = _shared_memory_segments()
    program = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.shmat.restype = ctypes.c_void_p\n"
        "size = 192 << 20\n"
        "segment = libc.shmget(0, ctypes.c_size_t(size), 0o1600)\n"  # IPC_PRIVATE, IPC_CREAT | 0600
        "created = segment >= 0\n"
        "if created:\n"
        "    address = libc.shmat(segment, None, 0)\n"
        "    ctypes.memset(address, 1, size)\n"
        "    libc.shmdt(ctypes.c_void_p(address))\n"
    )
    try:
        result = run_tests(program, "assert created\n")
        assert _shared_memory_segments() - before == set()
        assert result.status == "failed"
    finally:
        for segment in _shared_memory_segments() - before:  # keep the host clean when this fails
            ctypes.CDLL(None).shmctl(segment, 0, None)  # IPC_RMID


def test_memory_cap_covers_the_whole_run() -> None:
    splitter = (
        "import ctypes, os, time\n"
        "libc = ctypes.CDLL(None)\n"
        "read_end, write_end = os.pipe()\n"
        "children = 0\n"
        "for _ in range(4):\n"
        "    pid = libc.fork()\n"
        "    if pid == 0:\n"
        "        block = b'x' * (320 << 20)\n"
        "        os.write(write_end, b'1')\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    children += pid > 0\n"
        "used_mb = sum(320 for _ in range(children) if os.read(read_end, 1))\n"
    )
    assert run_tests(splitter, "assert used_mb >= 1024\n", timeout_s=20, memory_mb=512).status == "failed"


def test_bubblewrap_runs_programs_here_or_its_absence_is_named() -> None:
    """CI requires bubblewrap (setup.sh installs it); elsewhere its absence is a refusal that names the fix."""
    problem = sandbox.isolation_problem()
    if os.environ.get("CI"):
        assert problem is None, problem
    if problem is None:
        assert sandbox._bwrap() is not None  # the command line every program runs under
        assert run_tests(ADD, ADD_TESTS).passed
    else:
        assert "apt-get install bubblewrap" in problem and "reward.sandbox=weak" in problem


def test_without_bubblewrap_it_refuses_unless_the_weak_sandbox_is_chosen(
    monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    sandbox._bwrap_probe.cache_clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    try:
        with pytest.raises(SandboxUnavailable, match=r"apt-get install bubblewrap.*reward.sandbox=weak"):
            run_tests(ADD, ADD_TESTS)
        with pytest.raises(SandboxUnavailable):
            run_many([(ADD, ADD_TESTS)] * 3)
        allow_weak_sandbox()
        with caplog.at_level(logging.WARNING, logger=sandbox.__name__):
            assert run_tests(ADD, ADD_TESTS).status == "passed"
        assert "bubblewrap" in caplog.text
        assert run_tests("def add(a, b):\n    return a - b\n", ADD_TESTS).status == "failed"
        assert not run_tests(ANYTHING + "def add(a, b):\n    return Anything()\n", ADD_TESTS).passed
        row = _rows("mbppplus_originfmt.jsonl.gz")[0]
        assert run_tests(row["code"], mbpp_plus_tests(row)).status == "passed"
        escape = (  # seccomp holds without the namespaces: no socket, no second process
            "import ctypes, os, socket\n"
            "try:\n"
            "    socket.socket(socket.AF_UNIX)\n"
            "    opened = True\n"
            "except OSError:\n"
            "    opened = False\n"
            "pid = ctypes.CDLL(None).fork()\n"
            "if pid == 0:\n"
            "    os._exit(0)\n"
            "forked = pid > 0\n"
        )
        assert run_tests(escape, "assert opened or forked\n").status == "failed"
    finally:
        allow_weak_sandbox(False)
        monkeypatch.undo()
        sandbox._bwrap_probe.cache_clear()
