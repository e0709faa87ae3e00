"""The Prefect tasks of the nightly benchmark (`flows/nightly.py`): each measures a group of figures with the
benchmark code in bench/, and the last one judges the night against earlier nights and the baseline."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TypedDict

from prefect.artifacts import create_markdown_artifact

from bench import _history, grading_throughput, iteration_phases, learner_throughput, sampling_throughput, weight_sync
from bench._regression import judge, summary
from bench._trend import trend_plot
from dash_core.tracking import GIT_COMMIT_TAG, Tracker
from flows.progress import mlflow_link
from tasks import phase

SUMMARY_KEY = "dash-bench-summary"  # the Prefect artifact: one entry in the UI's Artifacts page, a version per night


class NightReport(TypedDict):
    """What a night returns and persists, as plain JSON (readable in any process, like `dash-train`'s result)."""

    run_id: str  # the night's MLflow run
    figures: dict[str, float]
    regressions: list[str]  # figures outside their noise band
    summary: str  # the verdict as Markdown


class RegressionError(RuntimeError):
    """Figures fell outside their noise band: the flow run fails, and so does the CI job that watches it."""

    def __init__(self, report: NightReport):
        regressions = ", ".join(report["regressions"])
        super().__init__(f"figures outside their noise band: {regressions} (MLflow run {report['run_id']})")
        self.report = report


@phase("iteration phases")
def iteration_figures(setup: iteration_phases.Setup, workdir: str) -> dict[str, float]:
    rows = iteration_phases.compare(setup, Path(workdir))
    preemptive, small = (iteration_phases.iteration_s(rows[mode]) for mode in ("preemptive", "small-batch"))
    return {
        "iteration/preemptive_s": preemptive,
        "iteration/small_batch_s": small,
        "iteration/speedup": small / preemptive,
    }


@phase("learner throughput")
def learner_figures(config: dict) -> dict[str, float]:
    return {"learner/tokens_per_s": learner_throughput.measure(config)["tokens_per_s"]}


@phase("grading throughput")
def grading_figures(math_rounds: int, code_rounds: int) -> dict[str, float]:
    math = grading_throughput.throughput("math", math_rounds)
    code = grading_throughput.throughput("code", code_rounds)
    return {"grader/math_answers_per_s": math.per_s, "grader/math_as_expected": math.as_expected,
            "sandbox/programs_per_s": code.per_s, "sandbox/as_expected": code.as_expected}  # fmt: skip


@phase("weight sync")
def sync_figures(backends: tuple[str, ...], repeats: int) -> dict[str, float]:
    """Seconds per sync of the embedded default's model with a LoRA adapter: full weights and the adapter alone."""
    figures = {}
    for backend in backends:
        result = weight_sync.measure("tiny", backend, rank=16, repeats=repeats)
        figures |= {f"sync/{backend}_full_s": result["full"]["s"], f"sync/{backend}_lora_s": result["lora"]["s"]}
        figures[f"sync/{backend}_lora_bytes_share"] = result["lora"]["bytes"] / result["full"]["bytes"]
    return figures


@phase("sampling throughput")
def sampling_figures(
    backends: tuple[str, ...], settings: sampling_throughput.Settings, workdir: str
) -> dict[str, float]:
    results = sampling_throughput.throughput(list(backends), settings, Path(workdir))
    largest = max(settings.sizes)
    return {
        f"sampling/{backend}_tokens_per_s": sampling_throughput.tokens_per_s(rows, largest)
        for backend, rows in results.items()
    }


@phase("regression check")
def check(night: Tracker, figures: dict[str, float], profile: str, baseline_file: Path) -> NightReport:
    """Judge the night, publish the summary (MLflow, Prefect) and the trend plot (MLflow); raise RegressionError
    when a figure is out of its band."""
    tags = night.tags()
    machine = tags[_history.MACHINE_TAG]
    committed = _history.baseline(baseline_file, profile, machine)
    reference = committed.get("figures", {})
    earlier = _history.earlier(night, committed.get("since"))
    verdicts = judge(figures, [n.figures for n in earlier], reference)
    if not reference:  # said in the run's state too, not only in its summary
        night.client.set_tag(night.run_id, "dash.baseline", f"none for this machine in {baseline_file.name}")
    context = [
        f"machine: {machine}",
        f"commit: `{tags.get(GIT_COMMIT_TAG, 'unknown')}`",
        "earlier nights of this profile on this machine that passed"
        + (f", since the baseline was written ({committed['since']})" if committed.get("since") else "")
        + f": {len(earlier)}",
        f"baseline: {baseline_file.name}"
        + (
            ""
            if reference
            else " has **none for this machine**: nights are judged "
            "only against earlier nights, once there are enough of them"
        ),
        mlflow_link(night.tracking_uri, night.experiment_id, night.run_id),
    ]
    text = summary(verdicts, f"dash-bench `{profile}`", context)
    night.log_text(text, "summary.md")
    night.log_figure(trend_plot(earlier, datetime.now(), verdicts, f"dash-bench {profile} on {machine}"), "trend.png")
    create_markdown_artifact(markdown=text, key=SUMMARY_KEY, description=f"dash-bench {profile}: figures and verdict")
    report = NightReport(
        run_id=night.run_id, figures=figures, regressions=[v.figure for v in verdicts if v.regression], summary=text
    )
    if report["regressions"]:
        raise RegressionError(report)
    return report
