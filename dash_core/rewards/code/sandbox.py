"""Launching one run of the harness: bubblewrap (layer 1), the seccomp filter (layer 5), collecting its records.

Each run is harness.py started as a script in a new session, with stdin and stdout on /dev/null, a clean environment
(PATH, HOME=its directory, a fixed hash seed, one BLAS thread; no AWS_*, MLFLOW_* or other secrets) and Python's
isolation flags, killed with SIGKILL at the wall-clock limit. Its layers, each holding where the next is missing, are
set up here (1, and 5's filter) and by the harness itself (2 to 6, described in harness.py):
1. bubblewrap (Debian's `bubblewrap`), when it can run here: new IPC, PID, network, UTS and cgroup namespaces; a root
   that holds only the Python installation, the system libraries and the harness's two files (harness.py and
   values.py), read-only; /tmp, the run's only writable directory, a private tmpfs of 64 MiB (the cap on the run's
   whole disk use); its own /proc and /dev. Killing bwrap ends the PID namespace, and with it everything the run
   started; the IPC namespace and tmpfs go too. Where bwrap cannot run, no program runs (SandboxUnavailable names
   the fix) unless the weaker sandbox was chosen (`allow_weak_sandbox`, a run's `reward.sandbox: weak`): then a
   warning is logged once and the run uses a fresh directory on the host's disk instead, where only each file's
   size is capped; the other layers are unchanged.
5. seccomp, a filter compiled by libseccomp (pyseccomp) in the judge and loaded by the harness: no sockets of any
   family (socket, socketpair, io_uring), no new processes (fork, vfork, clone without CLONE_THREAD; clone3 answers
   ENOSYS so that threads fall back to clone), no SysV or POSIX IPC objects, memfd or keyring entries (nothing outlives
   the run or escapes its memory cap), no new namespaces, bpf, ptrace, userfaultfd or perf events.
The run's records come back on a pipe, at most 16 MiB of them, for judge.py to read; a missing one is judged by how
the run ended (timeout, crash, early exit).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from . import harness, values
from .harness import _CRASHED, _DETAIL_CHARS, _MAX_DISK_BYTES, _MAX_OUTPUT_BYTES
from .judge import _Outputs

_log = logging.getLogger(__name__)

# -I would ignore PYTHONHASHSEED; the environment is built from scratch, so -s -P isolate just as well.
_ISOLATION = ("-s", "-P") if sys.version_info >= (3, 11) else ("-I",)
_SANDBOX_UID_BASE, _SANDBOX_UID_COUNT = 1_500_000_000, 100_000_000  # a range no real account uses
_SANDBOX_DIR = "/tmp"  # the run's directory inside bwrap: programs that write to /tmp keep working

_CLONE_THREAD = 0x00010000
_DENIED_SYSCALLS = (
    "socket socketpair io_uring_setup fork vfork memfd_create shmget msgget semget mq_open add_key request_key keyctl "
    "unshare setns bpf ptrace process_vm_readv process_vm_writev userfaultfd perf_event_open".split()
)


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


class SandboxUnavailable(RuntimeError):
    """bubblewrap cannot run here and the weaker sandbox was not chosen: no program is run (fail closed)."""


_weak_allowed = False  # reward.sandbox: weak


def allow_weak_sandbox(allowed: bool = True) -> None:
    """Where bubblewrap cannot run, run programs without it (layers 2 to 6 only) instead of refusing them: the
    `reward.sandbox: weak` opt-out, which a run records as its `dash.sandbox` tag."""
    global _weak_allowed
    _weak_allowed = allowed
    _warn_weak.cache_clear()  # each choice of it warns once, at its first program


def isolation_problem() -> str | None:
    """Why bubblewrap cannot isolate programs here, with the ways out; None where it can."""
    command, reason = _bwrap_probe()
    if command:
        return None
    return (
        f"{reason}. Code rewards run programs the policy wrote; without bubblewrap's namespaces they share the "
        "network, the processes and the disk of the trainer. Install it (apt-get install bubblewrap; "
        "scripts/setup.sh does where it runs as root), allow unprivileged user namespaces where the kernel blocks "
        "them (sysctl kernel.apparmor_restrict_unprivileged_userns=0 or kernel.unprivileged_userns_clone=1), or "
        "accept the weaker sandbox with reward.sandbox=weak"
    )


def _bwrap() -> tuple[str, ...] | None:
    """bubblewrap's command line up to the command; None (warned once) where it cannot run here and the weaker
    sandbox was chosen; SandboxUnavailable otherwise."""
    command, _ = _bwrap_probe()
    if command:
        return command
    if not _weak_allowed:
        raise SandboxUnavailable(isolation_problem())
    _warn_weak()
    return None


@functools.cache
def _warn_weak() -> None:
    _log.warning("reward.sandbox=weak: %s", _bwrap_probe()[1] + "; programs run without namespaces or a disk cap")


@functools.cache
def _bwrap_probe() -> tuple[tuple[str, ...] | None, str]:
    """bubblewrap's command line up to the command and "", or None and why it cannot run here."""
    path = shutil.which("bwrap")
    if path is None:
        return None, "bubblewrap (bwrap) is not installed"
    command = (path, *_bwrap_arguments())
    try:
        probe = subprocess.run([*command, sys.executable, *_ISOLATION, "-c", "pass"], capture_output=True, timeout=60)
        reason = f"exit status {probe.returncode}: {probe.stderr.decode(errors='replace').strip()}"
    except (OSError, subprocess.TimeoutExpired) as error:
        probe, reason = None, f"{type(error).__name__}: {error}"
    if probe is None or probe.returncode != 0:
        return None, f"bubblewrap cannot run here ({reason})"
    return command, ""


def _bwrap_arguments() -> list[str]:
    """Namespaces, a read-only root of what Python needs, and a size-capped tmpfs as the run's directory."""
    arguments = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() != 0:  # root keeps the host's user namespace, to give the run a fresh host uid
        arguments.insert(0, "--unshare-user-try")
    arguments += ["--die-with-parent", "--new-session", "--perms", "0777", "--size", str(_MAX_DISK_BYTES)]
    arguments += ["--tmpfs", _SANDBOX_DIR]
    readable = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    readable |= {os.path.realpath(module.__file__) for module in (harness, values)}  # what the harness imports
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
                [*(bwrap or ()), sys.executable, *_ISOLATION, harness.__file__, *map(str, fds)],
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
