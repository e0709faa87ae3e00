"""Live progress of a training run and its closing summary, drawn with rich."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

PHASES = ("sample", "reward", "learn", "sync", "checkpoint")  # the timed phases of `TrainingRun.step`


class TrainingProgress:
    def __init__(self, total: int, done: int, console: Console | None = None):
        self.console = console or Console()
        self.started = time.perf_counter()
        self.evals: list[tuple[int, dict[str, float]]] = []
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

    def iteration(self, iteration: int, m: dict[str, float]) -> None:
        self.progress.update(
            self.bar,
            completed=iteration,
            description=(
                f"reward {m['reward/mean']:.3f}  kept {m['train/kept_fraction']:.2f}  {m['time/iteration_s']:.3f}s/it = "
                + " + ".join(f"{phase} {m[f'time/{phase}_s']:.3f}" for phase in PHASES)
            ),
        )

    def evaluation(self, iteration: int, metrics: dict[str, float]) -> None:
        self.evals.append((iteration, metrics))
        shown = "  ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in metrics.items())
        self.console.print(f"[cyan]eval @ iter {iteration}[/]  {shown}")

    def summary(self, run_id: str, samples: int) -> None:
        table = Table(title=f"DASH run {run_id}")
        table.add_column("held-out metric")
        table.add_column(f"start (iter {self.evals[0][0]})" if self.evals else "start", justify="right")
        table.add_column(f"end (iter {self.evals[-1][0]})" if self.evals else "end", justify="right")
        table.add_column("change", justify="right")
        if self.evals:
            first, last = self.evals[0][1], self.evals[-1][1]
            for key in first:
                if key in last:
                    table.add_row(key, f"{first[key]:.3f}", f"{last[key]:.3f}", f"{last[key] - first[key]:+.3f}")
        self.console.print(table)
        self.console.print(f"samples {samples:,}  wall-clock {time.perf_counter() - self.started:.0f} s")
