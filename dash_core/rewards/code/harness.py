"""The script that runs inside the sandbox: it confines itself, then answers the judge's requests about the program.

sandbox.py starts this file as a script (under bubblewrap, layer 1, where it can run) with values.py bind-mounted
next to it; apart from these two files it imports only what the Python installation holds. It reads its job (the
program, the limits, the compiled seccomp filter) from a descriptor, sets up layers 2 to 6 below, says "ready", then
reads one JSON request per line and writes one answer line each, in order: "run" runs the program and answers with
the names it defined; the others fetch one of those names, or call, read, set, index, measure or iterate an object it
holds (by number). An answer is ["value", data by values.py, with handles for what is not data], ["names", [...]] or
["raised", type, message]. Nothing here needs to be trusted: the program can patch this script, and whatever it then
writes is only its answer to the judge's question, which the judge alone judges (judge.py). Its layers, each holding
where the next is missing (1, bubblewrap, is in sandbox.py):
2. Resource limits: CPU seconds, address space, threads, file size, no core dumps. Layer 5 keeps the run to one
   process and forbids memory outside its address space (shared memory, memfd), so memory_mb caps the whole run
   (plus its files, at most 64 MiB).
3. Identity, when we are root: a fresh unprivileged uid, so the run cannot touch files of others or signal our
   processes. It keeps CAP_DAC_READ_SEARCH only when layer 4 is active (an interpreter under /root, pyenv, would be
   unreadable otherwise), and Landlock then decides what may be read.
4. Landlock (Linux >= 5.13): read only the Python installation and system libraries, write only the run's directory,
   no TCP (ABI >= 4), no signals outside the sandbox (ABI >= 6).
5. seccomp: the filter sandbox.py compiles (its docstring lists what it denies), loaded for this process and the
   threads it starts.
6. A Python guard like EvalPlus's reliability_guard (os.kill, os.fork, subprocess... raise PermissionError); a guard
   only, which ctypes goes around.
sandbox.py reads the limits that both sides must agree on (answers, disk, detail, the crash status) from here.
"""

from __future__ import annotations

import builtins
import ctypes
import json
import math
import operator
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import traceback

from py_landlock import AccessFs, Landlock, LandlockError, get_abi_version

if __name__ == "__main__":  # a script in the sandbox, where values.py is bind-mounted next to this file
    sys.path.insert(0, os.path.dirname(__file__))
    from values import _encode, _untag

    del sys.path[0]  # the program gets the sys.path it had before
else:
    from .values import _encode, _untag

_DETAIL_CHARS = 500  # of an exception's message, and of stderr, that come back
_MAX_THREADS = 32  # RLIMIT_NPROC: threads, since layer 5 allows no other process
_MAX_DISK_BYTES = 64 << 20  # the run's tmpfs under bwrap, and any one file
_MAX_OUTPUT_BYTES = 16 << 20  # answers the judge reads from one run
_MAX_NAMES = 10_000  # of the program's namespace, that the judge is told
_CRASHED = 12  # exit code of a harness that ran out of memory outside the program, before it could say so
_SYSTEM_READABLE = ("/usr", "/lib", "/lib64", "/lib32", "/etc/ld.so.cache", "/etc/localtime", "/dev/urandom")


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


def _sandbox_main(payload_fd: int, ready_fd: int, requests_fd: int, answers_fd: int) -> None:
    """Confine this process, then answer the judge's requests one line each, in order, until it closes them."""
    with os.fdopen(payload_fd, "rb") as payload:
        job = json.load(payload)
    _confine(job)
    os.write(ready_fd, b"ready")  # tells the parent that setup worked; closed before untrusted code runs
    os.close(ready_fd)
    objects = _Objects(job["program"])
    try:
        _serve(objects, requests_fd, answers_fd)
    except MemoryError:  # building an answer the memory cap leaves no room for
        os._exit(_CRASHED)


def _serve(objects: _Objects, requests_fd: int, answers_fd: int) -> None:
    with os.fdopen(requests_fd, "rb") as requests:
        for line in requests:
            answer = objects.answer(line)
            view = memoryview((json.dumps(answer, separators=(",", ":")) + "\n").encode())
            while view:
                view = view[os.write(answers_fd, view) :]
    os._exit(0)  # the judge is done


_ACTIONS = {
    "getattr": getattr, "setattr": setattr, "getitem": operator.getitem, "setitem": operator.setitem, "len": len,
    "bool": bool, "iter": iter, "next": next,
}  # fmt: skip


class _Objects:
    """The program's namespace and every object the judge holds a handle to, by number; the requests on them."""

    def __init__(self, program: str) -> None:
        self.program = program
        self.namespace = {"__name__": "__main__", "__builtins__": builtins}
        self.held: list = []
        self.numbers: dict[int, int] = {}  # id() of a held object -> its number (held objects keep their ids)

    def handle(self, item: object) -> dict:
        number = self.numbers.setdefault(id(item), len(self.held))
        if number == len(self.held):
            self.held.append(item)
        return {"handle": [number, type(item).__qualname__]}

    def untag(self, item: dict) -> object:
        return _untag(item, self.held_object)

    def held_object(self, tag: str, body: object) -> object:
        if tag != "ref" or type(body) is not int or not 0 <= body < len(self.held):
            raise ValueError(f"unknown tag {tag!r}")
        return self.held[body]

    def answer(self, line: bytes) -> list:
        """["names", the program's names] to "run", else ["value", data or handles], or ["raised", type, message]."""
        request = ["?"]
        try:
            request = json.loads(line, object_hook=self.untag)  # a handle the program forged may name nothing
            if request[0] == "run":
                exec(compile(self.program, "<program>", "exec"), self.namespace)
                return ["names", [name for name in self.namespace if type(name) is str][:_MAX_NAMES]]
            value = self.act(*request)
            try:
                return ["value", _encode(value, self.handle)]
            except RecursionError:
                return ["raised", "RecursionError", "the value is nested too deeply to return"]
        except BaseException as error:  # the program's, reported to the judge; never this process's end
            if isinstance(error, MemoryError):
                os.write(2, b"MemoryError\n")  # formatting a traceback may itself need memory
                return ["raised", "MemoryError", ""]
            return ["raised", type(error).__name__, _described(error, traced=request[0] in ("run", "call"))]

    def act(self, kind: str, *arguments: object) -> object:
        if kind == "global":
            if arguments[0] not in self.namespace:
                raise NameError(f"name {arguments[0]!r} is not defined")
            return self.namespace[arguments[0]]
        target = self.held[arguments[0]]
        if kind == "call":
            args, kwargs = arguments[1]
            return target(*args, **kwargs)
        return _ACTIONS[kind](target, *arguments[1:])


def _described(error: BaseException, traced: bool) -> str:
    """The start of `error`'s message, with its traceback on stderr where `traced` (the program's code raised it, not a
    probe such as the length hint `list()` asks for); the program's exception may fail to print itself."""
    try:
        if traced:
            traceback.print_exception(error)
            sys.stderr.flush()
        return str(error)[:_DETAIL_CHARS]
    except Exception:
        return "(the exception could not be printed)"


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
    _sandbox_main(*map(int, sys.argv[1:5]))
