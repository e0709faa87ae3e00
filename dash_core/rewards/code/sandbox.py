"""Launching one run of the harness: bubblewrap (layer 1), the seccomp filter (layer 5), the conversation with it.

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
The judge talks to the run over two pipes (_Run): a request line in, exactly one answer line out, in order, at most
16 MiB of answers in all; an answer that never comes is judged by how the run ended (timeout, crash, early exit).
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


class _Stop(BaseException):
    """Judging cannot go on: the run ended, ran out of time or broke the protocol; the status and reason say how.
    Not an Exception: the tests, which run in the judge, cannot catch it."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class _Run:
    """One run of the harness on one program, a conversation: each request line gets one answer line, in order.

    Bytes from the run that no request asked for (before a request, or after the last) fail the program, and so does
    more than 16 MiB of answers in all; the wall-clock limit covers the whole conversation, the judge's side included.
    """

    def __init__(self, program: str, timeout_s: float, memory_mb: int) -> None:
        self.timeout_s, self.deadline = timeout_s, time.monotonic() + timeout_s
        self._answers, self._stderr, self._received = bytearray(), bytearray(), 0
        self._returncode: int | None = None
        self._stack = contextlib.ExitStack()
        try:
            self._start(program, memory_mb)
        except BaseException:
            self._stack.close()
            raise

    def _start(self, program: str, memory_mb: int) -> None:
        bwrap = self._bwrap = _bwrap()
        uid = (
            _SANDBOX_UID_BASE + int.from_bytes(os.urandom(8), "big") % _SANDBOX_UID_COUNT if os.geteuid() == 0 else None
        )
        if bwrap:
            workdir = _SANDBOX_DIR
        else:
            workdir = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="dash-sandbox-"))
            if uid is not None:
                os.chown(workdir, uid, uid)
        payload, self._ready = (self._stack.enter_context(tempfile.TemporaryFile()) for _ in range(2))
        job = {
            "program": program,
            "workdir": workdir,
            "uid": uid,
            "timeout_s": self.timeout_s,
            "memory_mb": memory_mb,
            "seccomp": _syscall_filter().hex(),
        }
        payload.write(json.dumps(job).encode())
        payload.seek(0)
        requests_read, self._requests = os.pipe()
        self._answers_fd, answers_write = os.pipe()
        self._stderr_fd, stderr_write = os.pipe()
        self._stack.callback(self._close_requests)
        self._stack.callback(os.close, self._answers_fd)
        self._stack.callback(os.close, self._stderr_fd)
        os.set_blocking(self._requests, False)
        fds = (payload.fileno(), self._ready.fileno(), requests_read, answers_write)
        try:
            self._proc = subprocess.Popen(
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
            for fd in (requests_read, answers_write, stderr_write):
                os.close(fd)
        self._stack.callback(self._kill)
        self._pidfd = os.pidfd_open(self._proc.pid)
        self._stack.callback(os.close, self._pidfd)
        self._poller = select.poll()  # not select(): a trainer's descriptors may be numbered past FD_SETSIZE
        for fd in (self._pidfd, self._answers_fd, self._stderr_fd):
            self._poller.register(fd, select.POLLIN)

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    @property
    def stderr(self) -> str:
        return _text(self._stderr)

    def exchange(self, request: bytes) -> bytes:
        """Send one request line; its answer line, or _Stop."""
        if time.monotonic() > self.deadline:  # answers that each come at once (an endless generator) end here
            self._kill()
            raise _Stop("timeout", f"stopped after {self.timeout_s:g} s")
        self._pump(wait=False)
        if self._answers:
            raise _Stop("failed", "the program wrote answers to questions the judge had not asked")
        view = memoryview(request)
        while view:
            if self._requests in {fd for fd, _ in self._pump(wait=True, writing=True)}:
                try:
                    view = view[os.write(self._requests, view) :]
                except BlockingIOError:
                    pass
                except BrokenPipeError:  # the run ended: how, its answers pipe will tell
                    while True:
                        self._pump(wait=True)
        while b"\n" not in self._answers:
            self._pump(wait=True)
        line, _, self._answers = self._answers.partition(b"\n")
        return bytes(line)

    def finish(self) -> None:
        """Close the requests and wait for the run to end: _Stop if it writes anything more, or runs out of time."""
        self._close_requests()
        try:
            while True:
                self._pump(wait=True)
        except _Stop as stop:
            if stop.status == "timeout":
                raise
        if self._answers:
            raise _Stop("failed", "the program wrote answers to questions the judge had not asked")

    def _pump(self, wait: bool, writing: bool = False) -> list[tuple[int, int]]:
        """Read what the run wrote, after waiting until the time limit for it to write (or, `writing`, for the
        requests pipe to take more); _Stop when the run ended, ran out of time or wrote too much."""
        left = max(self.deadline - time.monotonic(), 0) if wait else 0
        if writing:
            self._poller.register(self._requests, select.POLLOUT)
        try:
            events = self._poller.poll(left * 1000)
        finally:
            if writing:
                self._poller.unregister(self._requests)
        if wait and not events:
            self._kill()
            raise _Stop("timeout", f"stopped after {self.timeout_s:g} s")
        for fd, _ in events:
            if fd == self._pidfd:  # it exited: what it wrote is still in the pipes
                self._poller.unregister(fd)
            elif fd == self._stderr_fd:
                chunk = os.read(fd, 1 << 16)
                self._stderr = (self._stderr + chunk)[-4 * _DETAIL_CHARS :]
                if not chunk:
                    self._poller.unregister(fd)
            elif fd == self._answers_fd:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise self._ended()
                self._received += len(chunk)
                if self._received > _MAX_OUTPUT_BYTES:
                    self._kill()
                    raise _Stop("failed", f"the program returned more than {_MAX_OUTPUT_BYTES >> 20} MiB")
                self._answers += chunk
        return events

    def _ended(self) -> _Stop:
        """How the run ended, once its answers pipe closed; RuntimeError if it never got as far as running code."""
        with contextlib.suppress(subprocess.TimeoutExpired):  # bwrap may be a moment behind its command
            self._proc.wait(timeout=max(min(self.deadline - time.monotonic(), 1.0), 0))
        returncode = self._kill()
        if self._bwrap and returncode > 128:  # bwrap exits with 128 + the signal that ended its command
            returncode = 128 - returncode
        self._ready.seek(0)
        if self._ready.read() != b"ready":
            raise RuntimeError(f"the code sandbox could not be set up (exit status {returncode}): {self.stderr}")
        if returncode == -signal.SIGXCPU:
            return _Stop("timeout", f"stopped after {self.timeout_s:g} s of CPU time")
        if returncode < 0 or returncode == _CRASHED:
            return _Stop("crashed", f"the program died (exit status {returncode})")
        return _Stop("failed", "the program stopped before the tests finished")

    def _close_requests(self) -> None:
        """Tell the harness there is nothing more to answer (once: the number may be another pipe's afterwards)."""
        if self._requests is not None:
            os.close(self._requests)
            self._requests = None

    def _kill(self) -> int:
        """End the run (bwrap's death ends its PID namespace, and everything in it) and reap it: its exit status."""
        if self._returncode is None:
            with contextlib.suppress(ProcessLookupError):  # the leader is not reaped yet, so the group id is ours
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._returncode = self._proc.wait()
        return self._returncode


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
