"""The nightly benchmark: the quick profile end to end into a real MLflow store, and the regression check on nights
logged to a real sqlite MLflow (a night 40% slower is flagged and fails the check; one inside the band is not)."""

import json
from pathlib import Path
from uuid import UUID

import pytest
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from bench import _history
from bench._regression import FIGURES, MIN_NIGHTS, judge, slowdown
from flows.nightly import dash_bench
from tasks.nightly import SUMMARY_KEY, RegressionError, check

NIGHT = {  # a quick night's figures, in round numbers
    "iteration/speedup": 2.0,
    "iteration/preemptive_s": 0.3,
    "iteration/small_batch_s": 0.6,
    "sampling/transformers_tokens_per_s": 50_000.0,
    "learner/tokens_per_s": 8_000.0,
    "grader/math_answers_per_s": 200.0,
    "grader/math_as_expected": 1.0,
    "sandbox/programs_per_s": 15.0,
    "sandbox/as_expected": 1.0,
    "curve/train_s_to_gain": 8.0,
    "curve/iterations_to_gain": 30.0,
    "curve/final_sampled_accuracy": 0.4,
    "curve/final_greedy_accuracy": 0.7,
    "sync/transformers_full_s": 0.002,
    "sync/transformers_lora_s": 0.001,
    "sync/transformers_lora_bytes_share": 0.15,
}
TIMINGS = {
    name for name in NIGHT if not name.endswith(("as_expected", "accuracy", "iterations_to_gain", "bytes_share"))
}


def slower(figures: dict[str, float], factor: float) -> dict[str, float]:
    """The same night with every timing figure `factor` times slower (rates divided, times multiplied)."""
    return {
        name: value if name not in TIMINGS else value / factor if FIGURES[name].higher_is_better else value * factor
        for name, value in figures.items()
    }


@flow(name="nightly-check")
def judged(uri: str, figures: dict[str, float], baseline: Path) -> dict:
    """A night of `figures` logged to MLflow, then judged by the nightly's check, in a flow run as in dash-bench."""
    night = _history.start(uri, "dash-nightly", "quick", {})
    night.log_metrics(figures, step=0)
    with night.failing():  # as in dash-bench: a regression ends the night's MLflow run as FAILED
        report = check(night, figures, "quick", baseline)
    night.finish()
    return report


def test_quick_profile_end_to_end(prefect_api, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    report = dash_bench(profile="quick", tracking_uri=uri, baseline=str(tmp_path / "no-baseline.json"))

    assert report["regressions"] == []  # no earlier night and no baseline: nothing to regress against
    client = MlflowClient(uri)
    run = client.get_run(report["run_id"])
    assert run.data.tags["dash.baseline"] == "none for this machine in no-baseline.json"  # and the summary says so
    assert run.info.status == "FINISHED"
    # every figure of the quick profile on a CPU; the time to the gain only when the short run reaches it
    assert set(NIGHT) - {"curve/train_s_to_gain", "curve/iterations_to_gain"} <= set(run.data.metrics) <= set(NIGHT)
    assert set(run.data.metrics) == set(report["figures"])
    assert run.data.metrics["grader/math_as_expected"] == run.data.metrics["sandbox/as_expected"] == 1.0
    tags = run.data.tags
    assert tags[_history.PROFILE_TAG] == "quick"
    assert tags[_history.MACHINE_TAG] == _history.machine()[_history.MACHINE_TAG]
    assert {"machine.cpu", "machine.cores", "machine.gpu", "version.torch", "version.transformers", "version.prefect",
            "version.mlflow", "mlflow.source.git.commit", "prefect.flow_run_id"} <= set(tags)  # fmt: skip
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"summary.md", "trend.png"}
    summary = client.download_artifacts(run.info.run_id, "summary.md", str(tmp_path))
    assert "no regression" in open(summary).read()
    (curve,) = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert "eval/arithmetic/sampled_accuracy" in curve.data.metrics

    night_run = ArtifactFilterFlowRunId(any_=[UUID(tags["prefect.flow_run_id"])])
    with get_client(sync_client=True) as prefect:
        (artifact,) = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[SUMMARY_KEY]), flow_run_id=night_run)
        )
    assert report["run_id"] in artifact.data and "iteration/speedup" in artifact.data


def test_a_night_forty_percent_slower_fails_the_check(prefect_api, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    no_baseline = tmp_path / "no-baseline.json"
    for noise in [0.95, 1.0, 1.05]:
        judged(uri, slower(NIGHT, noise), no_baseline)

    report = judged(uri, slower(NIGHT, 1.2), no_baseline)
    assert report["regressions"] == []
    assert "no regression" in report["summary"]

    with pytest.raises(RegressionError) as failed:
        judged(uri, slower(NIGHT, 1.4), no_baseline)
    report = failed.value.report
    assert set(report["regressions"]) == TIMINGS
    assert "worse than the median" in report["summary"]
    client = MlflowClient(uri)
    logged = client.download_artifacts(report["run_id"], "summary.md", str(tmp_path))
    assert "**REGRESSION**" in open(logged).read()


def test_failed_nights_never_become_the_reference(prefect_api, tmp_path):
    """A lasting regression: every slow night fails, however many there are, because failed nights are not
    references (with them, the median of 3 good and 3 slow nights would accept the fourth)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    no_baseline = tmp_path / "no-baseline.json"
    for noise in [0.95, 1.0, 1.05]:
        judged(uri, slower(NIGHT, noise), no_baseline)
    for _ in range(4):
        with pytest.raises(RegressionError):
            judged(uri, slower(NIGHT, 1.4), no_baseline)
    # accepting the slower normal: writing the baseline starts the reference afresh from its time
    accepted = tmp_path / "accepted.json"
    _history.write_baseline(accepted, "quick", slower(NIGHT, 1.4))
    assert judged(uri, slower(NIGHT, 1.4), accepted)["regressions"] == []
    statuses = [
        run.info.status
        for run in MlflowClient(uri).search_runs(
            [MlflowClient(uri).get_experiment_by_name("dash-nightly").experiment_id]
        )
    ]
    assert sorted(statuses) == ["FAILED"] * 4 + ["FINISHED"] * 4


def test_the_baseline_alone_flags_a_slow_night(prefect_api, tmp_path):
    """Before MIN_NIGHTS earlier nights exist, the committed baseline is the reference."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    baseline = tmp_path / "baseline.json"
    _history.write_baseline(baseline, "quick", NIGHT)
    _history.write_baseline(baseline, "full", {"iteration/speedup": 99.0})  # another profile: not used

    assert judged(uri, slower(NIGHT, 1.1), baseline)["regressions"] == []
    with pytest.raises(RegressionError, match="sandbox/programs_per_s"):
        judged(uri, slower(NIGHT, 1.4), baseline)


def test_judge_rules():
    assert slowdown(FIGURES["iteration/preemptive_s"], 1.4, 1.0) == pytest.approx(1.4)
    assert slowdown(FIGURES["learner/tokens_per_s"], 1.0, 1.4) == pytest.approx(1.4)
    earlier = [NIGHT] * (MIN_NIGHTS - 1)
    (speedup,) = [v for v in judge(slower(NIGHT, 2.0), earlier, {}) if v.figure == "iteration/speedup"]
    assert speedup.median is None and not speedup.regression  # too few nights for a median
    lost = {k: v for k, v in NIGHT.items() if k != "curve/train_s_to_gain"}  # the gain was never reached
    (gain,) = [v for v in judge(lost, [NIGHT] * MIN_NIGHTS, {}) if v.figure == "curve/train_s_to_gain"]
    assert gain.value is None and gain.regression
    (wrong,) = [v for v in judge(NIGHT | {"sandbox/as_expected": 0.95}, [], NIGHT) if v.figure == "sandbox/as_expected"]
    assert wrong.regression  # a grader that stopped agreeing fails at any speed
    with pytest.raises(ValueError, match="no/such"):
        judge({"no/such": 1.0}, [], {})


def test_committed_baseline_covers_both_profiles():
    data = json.loads(_history.BASELINE.read_text())
    for profile in ("quick", "full"):
        (entry,) = [e for e in data[profile] if e["machine"].endswith("no GPU")]
        assert set(entry["figures"]) <= set(FIGURES)
        assert set(NIGHT) <= set(entry["figures"])


def test_the_profile_is_a_form_field():
    schema = dash_bench.parameters.model_dump()["properties"]
    assert schema["profile"]["enum"] == ["quick", "full"] and schema["profile"]["default"] == "full"
    assert all(schema[name].get("description") for name in ("profile", "tracking_uri", "experiment", "baseline"))
