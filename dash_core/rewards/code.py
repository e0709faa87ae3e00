"""Run an untrusted Python program against test code in a sandbox and report whether the tests passed.

Each run is this file started as a script in a new session (process group), in a fresh temporary directory
(deleted afterwards), with stdin and stdout on /dev/null, a clean environment (PATH, HOME=the directory, a fixed
hash seed, one BLAS thread; nothing inherited, so no AWS_*, MLFLOW_* or other secrets) and Python's isolation
flags. The whole group is killed with SIGKILL at the wall-clock limit. The harness confines itself before it reads
or runs anything untrusted, in layers, each of which holds on its own where the next one is missing:
1. Resource limits (setrlimit): CPU seconds, address space, processes, file size, no core dumps.
2. Identity, when we are root: the run gets a fresh unprivileged uid (so it cannot touch files owned by others,
   signal or inspect our processes, raise its limits, or fork past RLIMIT_NPROC, which root ignores), and every
   process of that uid is killed afterwards, including ones that escaped the process group. It keeps one
   capability, CAP_DAC_READ_SEARCH, only when layer 3 is active: an interpreter installed under /root (pyenv)
   would otherwise be unreadable, and Landlock is then what decides which files may be read.
3. Landlock (Linux >= 5.13; no privileges needed): the kernel lets the process read only the Python installation
   and system libraries, write only inside its directory, make no TCP connections (ABI >= 4), and send no signals
   outside the sandbox (ABI >= 6). This stops reading host files or /proc/<parent>/environ and deleting files
   outside the directory, even for a program that bypasses layer 4 with ctypes. Landlock does not cover metadata
   (chmod, chown, utime): when not root, a program could still change the mode of files the user owns.
4. A Python guard, like EvalPlus's reliability_guard: os.kill, os.remove, os.fork, subprocess and friends raise
   PermissionError. It is a guard only (ctypes goes around it); the layers above are the protection.

Success is proven, not claimed. The parent passes a random nonce (with the program and the tests) through an
anonymous file that the harness reads and closes before any untrusted code runs. Once confined, the harness writes
the nonce to a second file and closes it (a sandbox that cannot be set up raises RuntimeError in the parent
instead of failing every program); the nonce then lives only in a local variable and is written to a third file
only when the tests have run to their end, followed by os._exit(0). Exiting early (sys.exit, os._exit, SystemExit
inside the tests), killing the parent, printing "passed" or patching builtins, the harness module, sys.exit or
atexit cannot produce it. The program and the tests share one namespace, as in the field's harnesses; before the
tests run, the builtins module, the namespace's __builtins__ and tracing are reset. Not covered: a program that
deliberately inspects the harness's stack frames or memory can find the nonce, and one whose functions return
objects that compare equal to anything passes equality asserts; the OS layers keep such a program from harming
the host, not from gaming weak tests.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import json
import math
import os
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from py_landlock import AccessFs, Landlock, LandlockError, get_abi_version

STATUSES = ("passed", "failed", "timeout", "error", "crashed")

# Exit codes of the harness; anything else without the nonce means the program left before the tests finished.
_FAILED, _ERROR, _CRASHED = 10, 11, 12
_DETAIL_CHARS = 500
_MAX_PROCESSES = 32  # per sandbox uid when root; for the whole user otherwise
_MAX_FILE_BYTES = 64 << 20
# -I would ignore PYTHONHASHSEED; the environment is built from scratch, so -s -P isolate just as well.
_ISOLATION = ("-s", "-P") if sys.version_info >= (3, 11) else ("-I",)
_SANDBOX_UID_BASE, _SANDBOX_UID_COUNT = 1_500_000_000, 100_000_000  # a range no real account uses
_SYSTEM_READABLE = ("/usr", "/lib", "/lib64", "/lib32", "/etc/ld.so.cache", "/etc/localtime", "/dev/urandom")


@dataclass(frozen=True)
class CodeResult:
    passed: bool
    status: str  # one of STATUSES
    detail: str  # the end of stderr: the traceback, or why the run was stopped
    duration_s: float


def run_tests(program: str, tests: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> CodeResult:
    """Run `program`, then `tests` in the same namespace, in a fresh sandbox; passed only if the tests finish.

    Raises RuntimeError only when the sandbox itself cannot be set up, never because of what the program does.
    """
    nonce = secrets.token_hex(16)
    uid = _SANDBOX_UID_BASE + secrets.randbelow(_SANDBOX_UID_COUNT) if os.geteuid() == 0 else None
    start = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="dash-sandbox-") as workdir,
        tempfile.TemporaryFile() as payload,
        tempfile.TemporaryFile() as ready,
        tempfile.TemporaryFile() as proof,
        tempfile.TemporaryFile() as stderr,
    ):
        if uid is not None:
            os.chown(workdir, uid, uid)
        job = {
            "nonce": nonce,
            "program": program,
            "tests": tests,
            "workdir": workdir,
            "uid": uid,
            "timeout_s": timeout_s,
            "memory_mb": memory_mb,
        }
        payload.write(json.dumps(job).encode())
        payload.seek(0)
        fds = (payload.fileno(), ready.fileno(), proof.fileno())
        proc = subprocess.Popen(
            [sys.executable, *_ISOLATION, __file__, *map(str, fds)],
            cwd=workdir,
            env=_clean_env(workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            pass_fds=fds,
            start_new_session=True,
        )
        timed_out = not _wait_exit(proc.pid, timeout_s)
        with contextlib.suppress(ProcessLookupError):  # the leader is not reaped yet, so the group id is ours
            os.killpg(proc.pid, signal.SIGKILL)
        returncode = proc.wait()
        if uid is not None:
            _kill_user(uid)
        detail = _tail(stderr)
        if not timed_out and not _holds(ready, nonce):
            raise RuntimeError(f"the code sandbox could not be set up: {detail}")
        proven = _holds(proof, nonce)
    status = _status(returncode, proven, timed_out)
    if timed_out:
        detail = f"{detail}\nstopped after {timeout_s:g} s".strip()
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


def _wait_exit(pid: int, timeout_s: float) -> bool:
    """Wait for the process to exit without reaping it; False on timeout."""
    pidfd = os.pidfd_open(pid)
    try:
        return bool(select.select([pidfd], [], [], timeout_s)[0])
    finally:
        os.close(pidfd)


def _kill_user(uid: int) -> None:
    """Kill every live process of the sandbox uid, including those that left the process group."""
    for _ in range(100):  # a fork bomb is capped by RLIMIT_NPROC, so a few rounds empty it
        pids = _live_pids(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _live_pids(uid: int) -> list[int]:
    """Processes whose real uid is `uid`, zombies excepted (they are dead; their parent reaps them)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:  # gone meanwhile
            continue
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            pids.append(int(entry.name))
    return pids


def _holds(stream, nonce: str) -> bool:
    stream.seek(0)
    return stream.read(len(nonce) + 1) == nonce.encode()


def _tail(stream) -> str:
    stream.seek(max(0, stream.seek(0, os.SEEK_END) - 4 * _DETAIL_CHARS))
    return stream.read().decode("utf-8", "replace")[-_DETAIL_CHARS:].strip()


def _status(returncode: int, proven: bool, timed_out: bool) -> str:
    if proven and returncode == 0:
        return "passed"
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode < 0 or returncode == _CRASHED:
        return "crashed"
    return "error" if returncode == _ERROR else "failed"


# ---- the sandbox side: this file run as a script ----


def _limit(timeout_s: float, memory_mb: int) -> None:
    cpu = math.ceil(timeout_s)
    for limit, value in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (memory_mb << 20,) * 2),
        (resource.RLIMIT_NPROC, (_MAX_PROCESSES,) * 2),
        (resource.RLIMIT_FSIZE, (_MAX_FILE_BYTES,) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(limit, value)


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32))


def _become(uid: int, keep_read: bool) -> None:
    """Drop root for `uid`, keeping CAP_DAC_READ_SEARCH if `keep_read` (see layer 2 in the module docstring)."""
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


def _sandbox_main(payload_fd: int, ready_fd: int, proof_fd: int) -> None:
    """Confine this process, run the program and then the tests, and write the nonce only if both finished."""
    with os.fdopen(payload_fd, "rb") as payload:
        job = json.load(payload)
    nonce = job.pop("nonce").encode()
    # Everything used after untrusted code starts is a local captured now: module globals can be patched.
    write, exit_now, run, build, settrace, setprofile = os.write, os._exit, exec, compile, sys.settrace, sys.setprofile
    report, builtins_dict = _report, vars(builtins)
    pristine = dict(builtins_dict)
    _confine(job)
    write(ready_fd, nonce)  # tells the parent that setup worked, out of reach of what runs next
    os.close(ready_fd)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    for source, name in ((job["program"], "<program>"), (job["tests"], "<tests>")):
        if name == "<tests>":
            settrace(None)
            setprofile(None)
            builtins_dict.clear()
            builtins_dict.update(pristine)
            namespace["__builtins__"] = builtins
        try:
            run(build(source, name, "exec"), namespace)
        except BaseException as error:
            exit_now(report(error, in_tests=name == "<tests>"))
    write(proof_fd, nonce)
    exit_now(0)


def _confine(job: dict) -> None:
    """Layers 1 to 4 of the module docstring, then a check that Python's libraries are still readable."""
    _limit(job["timeout_s"], job["memory_mb"])
    landlock = _landlock_available()
    if job["uid"] is not None:
        _become(job["uid"], keep_read=landlock)
    if landlock:
        _landlock(job["workdir"])
    _guard()
    for name in ("stdlib", "purelib"):
        os.listdir(sysconfig.get_path(name))  # without Landlock, a uid that cannot reach /root fails here


def _report(error: BaseException, in_tests: bool) -> int:
    """Print why the run stopped and return the harness exit code for it."""
    if isinstance(error, MemoryError):
        os.write(2, b"MemoryError\n")  # formatting a traceback may itself need memory
        return _CRASHED
    traceback.print_exception(error)
    sys.stderr.flush()
    if isinstance(error, SystemExit):
        return _FAILED  # left before the tests finished
    return _FAILED if in_tests and isinstance(error, AssertionError) else _ERROR


if __name__ == "__main__":
    _sandbox_main(*map(int, sys.argv[1:4]))
