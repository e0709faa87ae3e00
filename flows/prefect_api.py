"""The Prefect API for one `dashrl` command, when no server is configured (PREFECT_API_URL unset).

It is the server Prefect's ephemeral mode would start (the same app, run by uvicorn, UI off, services off), with
two differences that make stops clean:
- it runs in its own session, so a terminal's Ctrl-C reaches only the trainer, which then saves its checkpoint
  and reports the stop to a server that is still up (with Prefect's own subprocess the server died with the same
  Ctrl-C, and the trainer spent a minute retrying it);
- it dies with the process that started it (PR_SET_PDEATHSIG), so it never outlives the command, even after
  kill -9.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from dash_core.serving import die_with_parent, stop_process, unused_port, wait_healthy


@contextmanager
def prefect_api() -> Iterator[None]:
    """Use the configured Prefect server, or start a private one for the duration of the block."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    port = unused_port()
    env = os.environ | {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    server = subprocess.Popen([sys.executable, "-m", "flows.prefect_api", str(port), str(os.getpid())], env=env,
                              start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    try:
        problem = wait_healthy(server, f"{url}/health", float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")))
        if problem:
            raise RuntimeError(f"the Prefect server {problem}; on a busy machine raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, "
                               "or point PREFECT_API_URL at a running server")  # fmt: skip
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield
            finally:
                _drain_clients()
    finally:
        stop_process(server)


def _drain_clients() -> None:
    """Send the logs and events Prefect's background workers still hold, while the server is up to take them."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    EventsWorker.drain_all()


def _serve(port: int, parent: int) -> None:
    """The server process: bound to its parent's life, then Prefect's app under uvicorn."""
    if not die_with_parent(parent):  # it died before the server could bind to it
        return
    import uvicorn

    uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=port, log_level="error",
                lifespan="on")  # fmt: skip


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
