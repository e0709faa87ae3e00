"""What the benchmarks share: the embedded default's warm-started policy, worker processes, and statistics."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def embedded_config(workdir: Path, overrides: tuple[str, ...] = (), **fields: Any):
    """The embedded default (`dashrl train` with no flags), with its store and MLflow database in `workdir`, then
    `fields` and `overrides` (`--set` style: `learner.lora.rank=16`)."""
    from dash_core.config import load_config, merge

    base = {"store": {"url": str(workdir / "store")},
            "tracking": {"uri": f"sqlite:///{workdir}/mlflow.db", "experiment": "bench"}}  # fmt: skip
    return load_config(overrides=list(overrides), base=merge(base, fields))


def warm_policy(workdir: Path, threads: int) -> str:
    """A model directory holding the embedded default's policy after its supervised warm-up (made once)."""
    folder = workdir / "warm-policy"
    if not (folder / "config.json").exists():
        from dash_core import loop
        from dash_core.run import TrainingRun

        run = TrainingRun.start(embedded_config(workdir, threads=threads))
        loop.warm_up(run)
        run.save_policy(str(folder))
        run.finish()
    return str(folder)


def worker(
    script: str, role: str, out: Path, options: list[str], env: dict[str, str] | None = None, stderr: IO | None = None
) -> subprocess.Popen:
    """Start `script --worker role --out out ...` in a fresh process (its own imports, threads and heap)."""
    inherited = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}  # ephemeral unless given
    environment = inherited | QUIET_ENV | (env or {})
    command = [sys.executable, script, "--worker", role, "--out", str(out), *options]
    return subprocess.Popen(command, env=environment, stderr=stderr)


def finish(process: subprocess.Popen, out: Path) -> dict[str, Any]:
    if process.wait() != 0:
        raise RuntimeError(f"benchmark worker {' '.join(process.args[1:4])} failed with exit code {process.returncode}")
    return json.loads(out.read_text())


def spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    median = statistics.median(ordered)
    return {
        "median": median,
        "mean": statistics.fmean(ordered),
        "p90": ordered[int(0.9 * (len(ordered) - 1))],
        "max": ordered[-1],
        "max/median": ordered[-1] / median,
        "over_1.5x": sum(v > 1.5 * median for v in ordered),
        "over_2x": sum(v > 2 * median for v in ordered),
    }
