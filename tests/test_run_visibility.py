"""Both UIs tell what a dash-train run did: the Prefect flow run holds its lines, a summary artifact and a persisted
result; the MLflow run has a name, tags, system metrics and dataset inputs. Real Prefect (the session's test
server), real MLflow (sqlite)."""

import json
import re
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_UI_URL

from dash_core.config import DashConfig, merge
from dash_core.data import build_task, eval_sets
from dash_core.tracking import dataset_inputs
from flows.train import dash_train


def fast_system_metrics(config):
    """A run of seconds still gets a few system samples."""
    config = config.model_copy(deep=True)
    config.tracking.system_metrics_every_s = 0.2
    return config


def flow_run_record(flow_run_id):
    """What the Prefect API holds for a flow run: its log lines, its artifacts, and its state."""
    APILogWorker.instance().drain()  # logs go to the API in batches, every few seconds
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        state = client.read_flow_run(flow_run_id).state
    return [entry.message for entry in logs], {a.key: a for a in artifacts}, state


def logged_inputs(run):
    """(name, context) -> digest of an MLflow run's dataset inputs."""
    return {
        (i.dataset.name, next(t.value for t in i.tags if t.key == "mlflow.data.context")): i.dataset.digest
        for i in run.inputs.dataset_inputs
    }


def test_the_prefect_run_holds_its_lines_summary_and_result(prefect_api, small_config):
    config = fast_system_metrics(small_config)
    state = dash_train(config=config, return_state=True)
    flow_run_id = state.state_details.flow_run_id
    lines, artifacts, stored_state = flow_run_record(flow_run_id)

    result = stored_state.result()  # read back through the result record the API holds
    assert result == state.result()
    assert json.loads(Path(stored_state.data.storage_key).read_text()) == result  # plain JSON in the result storage
    assert result["iteration"] == 2 and result["samples"] == 2 * 4 * 4
    assert {"reward/mean", "eval/arithmetic/accuracy"} <= set(result["metrics"])

    assert any(line.startswith(f"run {result['run_id']}: rollouts and checkpoints in") for line in lines)
    evaluations = [line for line in lines if line.startswith("eval @ iter")]
    assert [line.split()[3] for line in evaluations] == ["0", "1", "2"]
    assert "arithmetic/accuracy" in evaluations[-1]

    summary = artifacts["dash-train-summary"]
    assert summary.type == "markdown"
    assert f"`{result['run_id']}`" in summary.data
    assert "| held-out metric | start (iter 0) | end (iter 2) | change |" in summary.data
    accuracy = result["metrics"]["eval/arithmetic/accuracy"]
    assert re.search(
        rf"\| eval/arithmetic/accuracy \| \d\.\d{{3}} \| {accuracy:.3f} \| [+-]\d\.\d{{3}} \|", summary.data
    )
    assert "mlflow ui --backend-store-uri sqlite:///" in summary.data


def test_the_mlflow_run_is_named_tagged_and_holds_system_metrics_and_datasets(prefect_api, small_config):
    config = fast_system_metrics(small_config)
    state = dash_train(config=config, return_state=True)
    flow_run_id = str(state.state_details.flow_run_id)
    run = MlflowClient(config.tracking.uri).get_run(state.result()["run_id"])

    assert run.info.run_name == "pg-tiny-arithmetic-seed0"
    tags = run.data.tags
    assert tags["prefect.flow_run_id"] == flow_run_id
    assert tags["prefect.flow_run_url"] == f"{PREFECT_UI_URL.value()}/runs/flow-run/{flow_run_id}"
    assert "prefect.deployment" not in tags  # called directly, not from a deployment
    assert tags["mlflow.source.name"] == "flows/train.py:dash_train"
    assert re.fullmatch("[0-9a-f]{40}", tags["mlflow.source.git.commit"])  # the tests run from a git checkout

    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)

    inputs = logged_inputs(run)
    assert set(inputs) == {("arithmetic-1d-seed0", "train"), ("arithmetic-1d-seed0-heldout", "eval")}
    assert all(re.fullmatch("[0-9a-f]{16}", digest) for digest in inputs.values())


def test_a_resumed_run_compares_its_first_evaluation_with_its_last(prefect_api, small_config):
    config = fast_system_metrics(small_config)
    run_id = dash_train(config=config)["run_id"]
    config.iterations = 4
    state = dash_train(config=config, resume=run_id, return_state=True)
    lines, artifacts, _ = flow_run_record(state.state_details.flow_run_id)

    assert state.result()["run_id"] == run_id
    assert f"resumed run {run_id} at iteration 2" in lines  # dash_core's own line
    summary = artifacts["dash-train-summary"].data
    assert "| held-out metric | start (iter 0) | end (iter 4) | change |" in summary
    client = MlflowClient(config.tracking.uri)
    first = min(client.get_metric_history(run_id, "eval/arithmetic/accuracy"), key=lambda metric: metric.step)
    assert first.step == 0
    assert re.search(rf"\| eval/arithmetic/accuracy \| {first.value:.3f} \|", summary)
    tags = client.get_run(run_id).data.tags
    assert tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)  # the flow run that continued it


def test_datasets_are_named_by_config_or_path_and_digested_from_their_problems(small_config):
    gsm8k = str(Path(__file__).parent / "data" / "gsm8k_train.jsonl")
    extra = {"eval": {"datasets": [{"name": "gsm8k", "path": gsm8k, "size": 3}]}}
    config = DashConfig.model_validate(merge(small_config.model_dump(), extra))

    def inputs():
        task = build_task(config.task, config.seed)
        return {i.dataset.name: i for i in dataset_inputs(config, task, eval_sets(config, task))}

    first = inputs()
    assert set(first) == {"arithmetic-1d-seed0", "arithmetic-1d-seed0-heldout", gsm8k}
    local = first[gsm8k]
    assert (local.dataset.source_type, json.loads(local.dataset.source)) == ("local", {"uri": gsm8k})
    assert json.loads(local.dataset.profile) == {"num_rows": 3}
    assert {t.key: t.value for t in local.tags} == {"mlflow.data.context": "eval", "dash.set": "gsm8k"}
    assert {name: i.dataset.digest for name, i in inputs().items()} == {
        name: i.dataset.digest for name, i in first.items()
    }
