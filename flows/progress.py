"""What a training run shows, in the terminal and in the Prefect UI: live progress drawn with rich, its lines
(start, evaluations, stop) also in the flow run's logs, and the closing summary as a table and a Markdown artifact."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from uuid import UUID

from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.logging.handlers import APILogHandler
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from dash_core.tracking import run_url, ui_command

PHASES = ("sample", "reward", "wait", "learn", "sync", "checkpoint")  # the timed phases of `dash_core.loop.step`
SUMMARY_KEY = "dash-train-summary"  # the artifact's key: one entry in the UI's Artifacts page, a version per run
RUN_LOGGERS = ("dash_core", "flows")  # loggers whose records also go to the flow run's logs
# The console already shows these lines, drawn above the progress bar; this logger carries them to the flow run's
# logs only, so it does not propagate to the console handler (which would print each twice).
lines = logging.getLogger(__name__)
lines.propagate = False
lines.setLevel(logging.INFO)


class TrainingProgress:
    def __init__(
        self,
        total: int,
        done: int,
        console: Console | None = None,
        evals: list[tuple[int, dict[str, float]]] | None = None,
    ):
        """`evals`: evaluations logged before this process (a resumed run's first), which the summary compares."""
        self.console = console or Console()
        self.started = time.perf_counter()
        self.evals = list(evals or [])
        self.progress = Progress(
            TextColumn("[bold]iter"),
            MofNCompleteColumn(),
            BarColumn(bar_width=20),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            refresh_per_second=2,  # each redraw holds the GIL for ~1 ms; rich's default 10/s took ~2% of the loop
        )
        self.bar = self.progress.add_task("", total=total, completed=done)

    def __enter__(self) -> TrainingProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def say(self, line: str, style: str = "", level: int = logging.INFO) -> None:
        """A line for both UIs: the console (styled) and the flow run's logs."""
        self.console.print(f"[{style}]{escape(line)}[/]" if style else escape(line))
        lines.log(level, line)

    def iteration(self, iteration: int, m: dict[str, float]) -> None:
        self.progress.update(
            self.bar,
            completed=iteration,
            description=(
                f"reward {m['reward/mean']:.3f}  kept {m['train/kept_fraction']:.2f}  {m['time/iteration_s']:.3f}s/it = "
                + " + ".join(f"{phase} {m[f'time/{phase}_s']:.3f}" for phase in PHASES if f"time/{phase}_s" in m)
            ),
        )

    def evaluation(self, iteration: int, metrics: dict[str, float]) -> None:
        self.evals.append((iteration, metrics))
        self.say(
            f"eval @ iter {iteration}  " + "  ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in metrics.items()),
            "cyan",
        )

    def comparison(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the held-out metrics, first evaluation against last: what both summaries show."""
        if not self.evals:
            return ["held-out metric", "start", "end", "change"], []
        (first_at, first), (last_at, last) = self.evals[0], self.evals[-1]
        header = ["held-out metric", f"start (iter {first_at})", f"end (iter {last_at})", "change"]
        rows = [
            [key, f"{first[key]:.3f}", f"{last[key]:.3f}", f"{last[key] - first[key]:+.3f}"]
            for key in last
            if key in first
        ]
        return header, rows

    def footer(self, samples: int) -> str:
        return f"samples {samples:,}  wall-clock {time.perf_counter() - self.started:.0f} s"

    def summary(self, run_id: str, samples: int, mlflow_link: str) -> None:
        """The closing table on the console, and as the flow run's Markdown artifact with `mlflow_link`."""
        header, rows = self.comparison()
        table = Table(title=f"DASH run {run_id}")
        for i, column in enumerate(header):
            table.add_column(column, justify="right" if i else "left")
        for row in rows:
            table.add_row(*row)
        self.console.print(table)
        self.console.print(self.footer(samples))
        markdown = "\n".join(
            [
                f"## DASH run `{run_id}`",
                "",
                mlflow_link,
                "",
                "| " + " | ".join(header) + " |",
                "|---" + "|---:" * (len(header) - 1) + "|",
            ]
            + ["| " + " | ".join(row) + " |" for row in rows]
            + ["", self.footer(samples)]
        )
        create_markdown_artifact(
            markdown, key=SUMMARY_KEY, description=f"DASH run {run_id}: held-out metrics, first evaluation against last"
        )


def mlflow_link(uri: str, experiment_id: str, run_id: str) -> str:
    """Markdown that leads to the MLflow run: its page on a tracking server, else how to browse the local store."""
    url = run_url(uri, experiment_id, run_id)
    return (
        f"MLflow run: [{run_id}]({url})"
        if url
        else f"MLflow run `{run_id}` in `{uri}`; browse it with `{ui_command(uri)}`"
    )


class _FlowRunLogHandler(APILogHandler):
    """Prefect's API log handler, bound to one flow run, so records from any thread (say, the checkpoint writer's)
    reach its logs: the stock handler finds the run in the logging thread's context, which only Prefect's threads
    have."""

    def __init__(self, flow_run_id: UUID):
        super().__init__()
        self.flow_run_id = flow_run_id

    def prepare(self, record: logging.LogRecord) -> dict:
        return super().prepare(logging.makeLogRecord(record.__dict__ | {"flow_run_id": self.flow_run_id}))


@contextmanager
def run_logs() -> Iterator[None]:
    """In a flow run: dash_core's and the flows' records at INFO and above also go to the run's logs (the Prefect
    UI). The console keeps its own levels: `dashrl train` quiets Prefect's per-task lines, not these."""
    handler = _FlowRunLogHandler(FlowRunContext.get().flow_run.id)
    loggers = [logging.getLogger(name) for name in RUN_LOGGERS] + [lines]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
