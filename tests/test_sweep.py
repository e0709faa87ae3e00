"""Sweeps: the typed form a deployment shows, checks that fail before any run, in-process sweeps over presets and
seeds (Prefect subflows, one MLflow experiment, the report and its plots). Fanned-out sweeps against a real server
and worker are in test_deployments.py."""

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.exceptions import ParameterTypeError
from prefect.utilities.callables import parameter_schema

from dash_core.config import ConfigError
from dash_core.presets import preset_names
from flows.cli import main
from flows.sweep import dash_sweep

PRESETS = ["dash", "grpo", "no_gf", "kl", "no_kl", "ppo_multi", "ppo_mini", "sft_h", "sft_m"]  # the paper's
PLOTS = [
    "reward_vs_wallclock.png", "accuracy_vs_wallclock.png", "length_vs_iteration.png",
    "abs_advantage_vs_iteration.png", "forward_backward_time.png", "pass_at_k.png",
]  # fmt: skip


def children_of_sweep(client: MlflowClient, experiment: str) -> tuple:
    """The sweep's parent run and its child runs by run name."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    (parent,) = client.search_runs([experiment_id], "tags.`dash.kind` = 'sweep'")
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, {c.info.run_name: c for c in children}


def table_rows(table: str) -> dict[str, list[str]]:
    """The rows of the report's first table by their first cell."""
    first = table.split("\n\n## Runs")[0]
    rows = [line.strip("| ").split(" | ") for line in first.splitlines() if line.startswith("| ")]
    return {row[0]: row for row in rows[1:]}


def test_the_deployment_form_is_typed_and_described():
    schema = parameter_schema(dash_sweep).model_dump_for_openapi()
    fields, definitions = schema["properties"], schema["definitions"]
    assert list(fields)[:6] == ["presets", "seeds", "budget_minutes", "budget_samples", "base", "fan_out"]
    assert schema["required"] == ["presets"]
    assert [name for name, field in fields.items() if not field.get("description")] == []

    assert fields["presets"]["type"] == "array" and fields["presets"]["minItems"] == 1
    assert definitions[fields["presets"]["items"]["$ref"].rsplit("/", 1)[1]]["enum"] == sorted([*PRESETS, "dash_async"])
    assert "math" not in preset_names()  # a base names a task or model; it is given with configs, not as a preset
    assert fields["seeds"]["items"] == {"type": "integer"} and fields["seeds"]["default"] == [0]
    assert fields["fan_out"]["type"] == "boolean" and fields["fan_out"]["default"] is False
    assert fields["train_deployment"]["default"] == "dash-train/default"
    assert {"type": "number", "exclusiveMinimum": 0} in fields["budget_minutes"]["anyOf"]

    assert fields["base"]["$ref"] == "#/definitions/DashConfig"
    config = definitions["DashConfig"]
    assert {"iterations", "seed", "model", "task", "sampler", "algo", "tracking"} <= set(config["properties"])
    assert config["additionalProperties"] is False
    assert "gradient filter" in definitions["AlgoConfig"]["properties"]["tau"]["description"]
    assert dash_sweep.parameters.model_dump_for_openapi() == schema


def test_unknown_preset_fails_before_any_run(prefect_api, small_config, capsys):
    with pytest.raises(ParameterTypeError, match=r"presets.1: Input should be 'dash', 'dash_async', 'grpo'"):
        dash_sweep(presets=["dash", "dahs"], base=small_config, experiment="bad")
    with pytest.raises(SystemExit):
        main(["sweep", "--presets", "dash,dahs", "--set", f"tracking.uri={small_config.tracking.uri}", "--name", "bad"])
    assert "unknown preset 'dahs' (choose from dash, dash_async, grpo" in capsys.readouterr().err
    assert MlflowClient(small_config.tracking.uri).get_experiment_by_name("bad") is None


def test_fan_out_refuses_before_any_run(prefect_api, small_config, capsys):
    with pytest.raises(ConfigError, match="give budget_minutes or budget_samples"):
        dash_sweep(presets=["dash", "grpo"], base=small_config, fan_out=True, experiment="fan")
    tracking = ["--set", f"tracking.uri={small_config.tracking.uri}", "--name", "fan"]
    assert main(["sweep", "--presets", "dash", "--fan-out", *tracking]) == 1
    assert "give budget_minutes or budget_samples" in capsys.readouterr().err

    with pytest.raises(ConfigError, match=r"sft_m learns from algo.teacher 'sweep:dash'.*fan_out off"):
        dash_sweep(presets=["dash", "sft_m"], base=small_config, fan_out=True, budget_samples=64, experiment="fan")
    secret = small_config.model_copy(deep=True)
    secret.store.storage_options = {"secret": "s"}
    with pytest.raises(ConfigError, match="credentials, which fan_out would send as flow-run parameters"):
        dash_sweep(presets=["dash"], base=secret, fan_out=True, budget_samples=64, experiment="fan")
    nowhere = {"fan_out": True, "budget_samples": 64, "train_deployment": "dash-train/nowhere", "experiment": "fan"}
    with pytest.raises(ConfigError, match="no deployment 'dash-train/nowhere'"):
        dash_sweep(presets=["dash"], base=small_config, **nowhere)
    assert MlflowClient(small_config.tracking.uri).get_experiment_by_name("fan") is None


def test_a_sweep_teacher_must_be_in_the_sweep(prefect_api, small_config):
    with pytest.raises(ConfigError, match="sft_m learns from .*'sweep:dash'.* dash is not among the presets"):
        dash_sweep(presets=["sft_m"], base=small_config, experiment="orphan")
    assert MlflowClient(small_config.tracking.uri).get_experiment_by_name("orphan") is None


def test_seeds_run_every_preset_once_each_and_the_report_gives_mean_and_spread(prefect_api, small_config, tmp_path):
    base = small_config.model_copy(update={"iterations": 1})
    budget = {"budget_samples": 16, "experiment": "seeds", "report_dir": str(tmp_path)}
    dash_sweep(presets=["dash", "sft_h"], seeds=[0, 1], base=base, **budget)

    client = MlflowClient(small_config.tracking.uri)
    parent, runs = children_of_sweep(client, "seeds")
    assert sorted(runs) == ["dash-seed0", "dash-seed1", "sft_h-seed0", "sft_h-seed1"]
    assert all(run.info.status == "FINISHED" for run in runs.values())
    assert {name: run.data.params["seed"] for name, run in runs.items()} == {name: name[-1] for name in runs}
    assert {run.data.params["budget_samples"] for run in runs.values()} == {"16"}
    assert parent.data.params["seeds"] == "0,1" and parent.data.params["fan_out"] == "False"

    report = (tmp_path / "seeds" / "report.md").read_text()
    rows = table_rows(report)
    assert set(rows) == {"dash", "sft_h"}
    assert rows["dash"][1:3] == ["2", "finished"]
    accuracy = rows["dash"][3]  # arithmetic greedy accuracy over the two seeds
    assert " ± " in accuracy, report
    values = [runs[f"dash-seed{seed}"].data.metrics["eval/arithmetic/accuracy"] for seed in (0, 1)]
    assert float(accuracy.split(" ± ")[0]) == pytest.approx(sum(values) / 2, abs=1e-3)
    assert "## Runs" in report and "| dash-seed1 | 1 | finished |" in report


def test_sweep_over_all_presets_reports_every_one(prefect_api, small_config, tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(small_config.model_dump(mode="json")))
    overrides = ["eval.n=2", "eval.ks=[1,2]", "algo.ppo_steps=2"]
    where = {"experiment": "tiny", "report_dir": str(tmp_path / "reports")}
    folder = dash_sweep(presets=PRESETS, configs=[str(base)], overrides=overrides, **where)

    table = (tmp_path / "reports" / "tiny" / "report.md").read_text()
    assert sorted(table_rows(table)) == sorted(PRESETS)
    assert "## Runs" not in table  # one seed: one row per preset is every run
    assert "arithmetic pass@2" in table
    for plot in PLOTS:
        assert (tmp_path / "reports" / "tiny" / plot).stat().st_size > 1000, plot

    client = MlflowClient(small_config.tracking.uri)
    parent, by_name = children_of_sweep(client, "tiny")
    assert sorted(by_name) == sorted(f"{p}-seed0" for p in PRESETS)
    assert sorted(c.data.tags["dash.preset"] for c in by_name.values()) == sorted(f"{p}-seed0" for p in PRESETS)
    assert all(c.info.status == "FINISHED" for c in by_name.values())
    by_preset = {name.removesuffix("-seed0"): c for name, c in by_name.items()}
    assert by_preset["dash"].data.params["iterations"] == "2"  # dash runs as configured; the others get its time
    assert float(by_preset["grpo"].data.params["budget_minutes"]) > 0
    assert "train/kl" in by_preset["kl"].data.metrics and "train/kl" not in by_preset["dash"].data.metrics
    assert "train/clip_fraction" in by_preset["ppo_multi"].data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert artifacts >= {f"report/{p}" for p in ["report.md", *PLOTS]}

    # The report rebuilds from MLflow alone.
    out = tmp_path / "rebuilt"
    assert main(["report", "--experiment", "tiny", "--tracking-uri", small_config.tracking.uri, "--out", str(out)]) == 0
    assert (out / "tiny" / "report.md").read_text().splitlines()[2:] == table.splitlines()[2:]
    assert folder == str(tmp_path / "reports" / "tiny")


def test_a_failing_preset_is_reported_and_the_sweep_goes_on(prefect_api, small_config, tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(small_config.model_dump(mode="json")))
    broken = tmp_path / "broken.yaml"  # random weights get no reward: nothing is kept and dash stops at once;
    broken.write_text("warmup:\n  steps: 0\nalgo:\n  max_empty_iterations: 1\n")  # sft_h learns from human solutions
    configs = [str(base), str(broken)]
    dash_sweep(presets=["sft_h", "dash"], configs=configs, experiment="partial", report_dir=str(tmp_path))
    table = (tmp_path / "partial" / "report.md").read_text()
    assert "| sft_h | 1 | finished |" in table and "| dash | 1 | failed |" in table
    client = MlflowClient(small_config.tracking.uri)
    parent, _ = children_of_sweep(client, "partial")
    with open(client.download_artifacts(parent.info.run_id, "failed_presets.json")) as f:
        failed = json.load(f)
    assert list(failed) == ["dash-seed0"] and "gets nothing right" in failed["dash-seed0"]
