"""A tiny sweep over every preset: Prefect subflows, one MLflow experiment, the report and its plots."""

import json

import yaml
from mlflow.tracking import MlflowClient

from flows.cli import main
from flows.sweep import dash_sweep

PRESETS = ["dash", "grpo", "no_gf", "kl", "no_kl", "ppo_multi", "ppo_mini", "sft_h", "sft_m"]
PLOTS = [
    "reward_vs_wallclock.png", "accuracy_vs_wallclock.png", "length_vs_iteration.png",
    "abs_advantage_vs_iteration.png", "forward_backward_time.png", "pass_at_k.png",
]  # fmt: skip


def test_sweep_over_all_presets_reports_every_one(prefect_api, small_config, tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(small_config.model_dump(mode="json")))
    overrides = ["eval.n=2", "eval.ks=[1,2]", "algo.ppo_steps=2"]
    folder = dash_sweep(presets=PRESETS, configs=[str(base)], overrides=overrides, experiment="tiny", report_dir=str(tmp_path / "reports"))

    table = (tmp_path / "reports" / "tiny" / "report.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| preset")]
    assert sorted(row.split(" | ")[0].removeprefix("| ") for row in rows) == sorted(PRESETS)
    assert "arithmetic pass@2" in table
    for plot in PLOTS:
        assert (tmp_path / "reports" / "tiny" / plot).stat().st_size > 1000, plot

    client = MlflowClient(small_config.tracking.uri)
    experiment = client.get_experiment_by_name("tiny")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`dash.kind` = 'sweep'")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["dash.preset"] for c in children) == sorted(PRESETS)
    assert all(c.info.status == "FINISHED" for c in children)
    by_preset = {c.data.tags["dash.preset"]: c for c in children}
    assert by_preset["dash"].data.params["iterations"] == "2"  # dash runs as configured; the others get its time
    assert float(by_preset["grpo"].data.params["budget_minutes"]) > 0
    assert "train/kl" in by_preset["kl"].data.metrics and "train/kl" not in by_preset["dash"].data.metrics
    assert "train/clip_fraction" in by_preset["ppo_multi"].data.metrics
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {f"report/{p}" for p in ["report.md", *PLOTS]}

    # The report rebuilds from MLflow alone.
    out = tmp_path / "rebuilt"
    assert main(["report", "--experiment", "tiny", "--tracking-uri", small_config.tracking.uri, "--out", str(out)]) == 0
    assert (out / "tiny" / "report.md").read_text().splitlines()[2:] == table.splitlines()[2:]
    assert folder == str(tmp_path / "reports" / "tiny")


def test_unknown_preset_fails_before_any_run(prefect_api, small_config, tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="no preset 'dahs'"):
        dash_sweep(presets=["dash", "dahs"], overrides=[f"tracking.uri={small_config.tracking.uri}"], experiment="bad")
    assert MlflowClient(small_config.tracking.uri).get_experiment_by_name("bad") is None


def test_a_failing_preset_is_reported_and_the_sweep_goes_on(prefect_api, small_config, tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(small_config.model_dump(mode="json")))
    broken = tmp_path / "broken.yaml"  # random weights get no reward: nothing is kept, and it stops at once
    broken.write_text("warmup:\n  steps: 0\nalgo:\n  max_empty_iterations: 1\n")
    dash_sweep(presets=[str(broken), "dash"], configs=[str(base)], experiment="partial", report_dir=str(tmp_path))
    table = (tmp_path / "partial" / "report.md").read_text()
    assert "| dash | finished |" in table and f"| {broken} | failed |" in table
    client = MlflowClient(small_config.tracking.uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("partial").experiment_id], "tags.`dash.kind` = 'sweep'")
    with open(client.download_artifacts(parent.info.run_id, "failed_presets.json")) as f:
        failed = json.load(f)
    assert list(failed) == [str(broken)] and "gets nothing right" in failed[str(broken)]
