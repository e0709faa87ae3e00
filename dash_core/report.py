"""The comparison report of a sweep, rebuilt from MLflow alone: Markdown tables and PNG plots.

One row per preset: final held-out accuracy of every evaluation set, pass@k, training wall-clock, samples, mean
completion length and how training time split between sampling and learning; with several seeds, each figure is
the mean ± std over the preset's runs (n), and a second table lists every run. The plots draw every run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.entities import Run  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

PLOTS = {
    "reward_vs_wallclock.png": ("time/train_s", "reward/mean", "training wall-clock (s)", "mean reward"),
    "length_vs_iteration.png": (None, "gen/length_mean", "iteration", "mean completion length (tokens)"),
    "abs_advantage_vs_iteration.png": (None, "train/abs_adv_mean", "iteration", "mean |A| (before filtering)"),
    "forward_backward_time.png": (None, "time/forward_s+time/backward_s", "iteration", "learner forward + backward (s)"),
}  # fmt: skip


@dataclass
class PresetRun:
    """A child run's metric histories as {key: {step: value}}; `name` is the run's (`<preset>-seed<seed>` in sweeps
    with seeds), `preset` the preset it ran."""

    name: str
    preset: str
    run: Run
    history: dict[str, dict[int, float]] = field(default_factory=dict)

    def series(self, key: str) -> dict[int, float]:
        parts = [self.history.get(k, {}) for k in key.split("+")]
        return {step: sum(p[step] for p in parts) for step in sorted(parts[0]) if all(step in p for p in parts)}

    def final(self, key: str) -> float | None:
        series = self.series(key)
        return series[max(series)] if series else None


def sweep_runs(client: MlflowClient, experiment: str, parent_run_id: str | None = None) -> tuple[str, list[PresetRun]]:
    """The sweep's parent run (the latest one when not given) and its children, in the order they started."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment {experiment!r} at {client.tracking_uri}")
    if parent_run_id is None:
        parents = client.search_runs(
            [found.experiment_id], "tags.`dash.kind` = 'sweep'", order_by=["start_time DESC"], max_results=1
        )
        if not parents:
            raise ValueError(f"experiment {experiment!r} has no sweep run")
        parent_run_id = parents[0].info.run_id
    children = client.search_runs(
        [found.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'", order_by=["start_time ASC"]
    )
    runs = []
    for child in children:
        tag = child.data.tags.get("dash.preset") or child.info.run_name  # a sweep names its runs <preset>-seed<seed>
        preset = tag.removesuffix(f"-seed{child.data.params.get('seed')}")
        run = PresetRun(child.info.run_name or tag, preset, child)
        for key in child.data.metrics:
            run.history[key] = {m.step: m.value for m in client.get_metric_history(child.info.run_id, key)}
        runs.append(run)
    return parent_run_id, runs


def by_preset(runs: list[PresetRun]) -> dict[str, list[PresetRun]]:
    """The runs of each preset (its seeds), presets in the order their first run started."""
    groups: dict[str, list[PresetRun]] = {}
    for run in runs:
        groups.setdefault(run.preset, []).append(run)
    return groups


def eval_names(runs: list[PresetRun]) -> list[str]:
    return sorted({key.split("/")[1] for r in runs for key in r.history if key.startswith("eval/")})


def markdown_table(rows: dict[str, list[PresetRun]], label: str = "preset") -> str:
    """One row per entry of `rows` (named in column `label`); a row of several runs shows each figure as
    mean ± std over them."""
    runs = [r for group in rows.values() for r in group]
    sets = eval_names(runs)
    ks = sorted({int(k.rsplit("_", 1)[1]) for r in runs for k in r.history if "/pass_at_" in k})
    header = [label, "n", "status"]
    header += [f"{s} {m}" for s in sets for m in ["greedy acc", "sampled acc", *[f"pass@{k}" for k in ks]]]
    header += ["wall-clock s", "samples", "mean length", "sample / learn time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, group in rows.items():
        statuses = Counter(r.run.info.status.lower() for r in group)
        status = (
            next(iter(statuses)) if len(statuses) == 1 else ", ".join(f"{n} {s}" for s, n in statuses.most_common())
        )
        cells = [name, str(len(group)), status]
        for s in sets:
            keys = [f"eval/{s}/accuracy", f"eval/{s}/sampled_accuracy", *[f"eval/{s}/pass_at_{k}" for k in ks]]
            cells += [_stat([r.final(key) for r in group], len(group)) for key in keys]
        sample = sum(v for r in group for v in r.series("time/sample_s").values())
        learn = sum(v for r in group for v in r.series("time/learn_s").values())
        lengths = [mean(series.values()) if (series := r.series("gen/length_mean")) else None for r in group]
        cells += [
            _stat([r.final("time/train_s") for r in group], len(group), "{:.0f}"),
            _stat([r.final("samples/total") for r in group], len(group), "{:,.0f}"),
            _stat(lengths, len(group), "{:.1f}"),
            f"{sample / (sample + learn):.0%} / {learn / (sample + learn):.0%}" if sample + learn else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _stat(values: list[float | None], n: int, spec: str = "{:.3f}") -> str:
    """One value as is; several as mean ± std, with their count when some of the `n` runs lack the figure."""
    found = [v for v in values if v is not None]
    if len(found) < 2:
        return spec.format(found[0]) if found else "-"
    text = f"{spec.format(mean(found))} ± {spec.format(stdev(found))}"
    return text if len(found) == n else f"{text} (n={len(found)})"


def plot_all(runs: list[PresetRun], folder: Path) -> list[Path]:
    files = [_plot(runs, folder / name, *spec) for name, spec in PLOTS.items()]
    files.append(_plot_accuracy(runs, folder / "accuracy_vs_wallclock.png"))
    files.append(_plot_pass_at_k(runs, folder / "pass_at_k.png"))
    return files


def _plot(runs: list[PresetRun], path: Path, x_key: str | None, y_key: str, x_label: str, y_label: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        ys = r.series(y_key)
        xs = r.series(x_key) if x_key else {step: step for step in ys}
        steps = [s for s in ys if s in xs]
        ax.plot([xs[s] for s in steps], [ys[s] for s in steps], marker=".", markersize=3, label=r.name)
    return _save(fig, ax, path, x_label, y_label)


def _plot_accuracy(runs: list[PresetRun], path: Path) -> Path:
    """Sampled held-out accuracy of every evaluation set against training wall-clock (step 0 is at 0 s)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for style, name in zip(["-", "--", ":", "-."] * 4, eval_names(runs)):
        for color, r in enumerate(runs):
            clock = {0: 0.0} | r.series("time/train_s")
            acc = r.series(f"eval/{name}/sampled_accuracy")
            steps = [s for s in acc if s in clock]
            ax.plot([clock[s] for s in steps], [acc[s] for s in steps], style, marker=".", color=f"C{color}",
                    label=f"{r.name} ({name})")  # fmt: skip
    return _save(fig, ax, path, "training wall-clock (s)", "held-out sampled accuracy")


def _plot_pass_at_k(runs: list[PresetRun], path: Path) -> Path:
    """Final pass@k against k, per preset and evaluation set."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for style, name in zip(["-o", "--s", ":^", "-.v"] * 4, eval_names(runs)):
        for color, r in enumerate(runs):
            points = sorted(
                (int(key.rsplit("_", 1)[1]), r.final(key))
                for key in r.history
                if key.startswith(f"eval/{name}/pass_at_")
            )
            if points:
                ax.plot(*zip(*points), style, color=f"C{color}", label=f"{r.name} ({name})")
    if not ax.lines:
        ax.text(0.5, 0.5, "no pass@k recorded (set eval.n and eval.ks)", ha="center", transform=ax.transAxes)
    return _save(fig, ax, path, "k", "pass@k")


def _save(fig: plt.Figure, ax: plt.Axes, path: Path, x_label: str, y_label: str) -> Path:
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    if ax.lines:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_report(tracking_uri: str, experiment: str, out_dir: str | Path, parent_run_id: str | None = None) -> Path:
    """Write report.md and the plots to `out_dir` and log them to the sweep's parent run under `report/`."""
    client = MlflowClient(tracking_uri=tracking_uri)
    parent_run_id, runs = sweep_runs(client, experiment, parent_run_id)
    if not runs:
        raise ValueError(f"sweep run {parent_run_id} has no child runs yet")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    groups = by_preset(runs)
    seeded = any(len(group) > 1 for group in groups.values())
    text = f"# Sweep {experiment} (parent run {parent_run_id})\n\n"
    text += "Each figure is the mean ± std over the preset's n runs, one per seed.\n\n" if seeded else ""
    text += markdown_table(groups)
    text += f"\n## Runs\n\n{markdown_table({r.name: [r] for r in runs}, 'run')}" if seeded else ""
    (folder / "report.md").write_text(text)
    plot_all(runs, folder)
    client.log_artifacts(parent_run_id, str(folder), "report")
    return folder
