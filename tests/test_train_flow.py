"""The dash-train flow end to end: real Prefect (ephemeral test server), real MLflow (sqlite), real store."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dash_core.learner import Learner, NonFiniteLossError
from dash_core.loop import EverythingFilteredError
from dash_core.run import TrainingRun
from dash_core.store import RunStore
from flows.cli import main
from flows.train import dash_train

ITERATION_METRICS = [
    "reward/mean", "reward/std", "train/kept_fraction", "train/abs_adv_mean", "train/loss", "train/grad_norm",
    "gen/length_mean", "time/sample_s", "time/reward_s", "time/learn_s", "time/sync_s", "time/iteration_s",
    "logprob_gap/mean", "logprob_gap/max", "samples/total",
]  # fmt: skip
EVAL_METRICS = ["eval/arithmetic/accuracy", "eval/arithmetic/sampled_accuracy", "eval/arithmetic/length_mean"]


def steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def cli_args(config):
    return ["--set", f"tracking.uri={config.tracking.uri}", "--set", f"store.url={config.store.url}"]


def test_two_iterations_log_every_metric_and_keep_rollouts(prefect_api, small_config):
    run_id = dash_train(config=small_config)["run_id"]
    client = MlflowClient(small_config.tracking.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["algo.tau"] == "0.1" and run.data.params["sampler.group_size"] == "4"
    for key in ITERATION_METRICS:
        assert steps(client, run_id, key) == [1, 2], key
    for key in EVAL_METRICS:
        assert steps(client, run_id, key) == [0, 1, 2], key
    assert client.get_metric_history(run_id, "samples/total")[-1].value == 2 * 4 * 4
    assert client.get_metric_history(run_id, "logprob_gap/max")[-1].value < 1e-3
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "samples/arithmetic")}
    assert {"config.yaml", "samples/arithmetic/eval_iter_000000.jsonl", "samples/arithmetic/eval_iter_000002.jsonl"} <= artifacts

    store = RunStore(small_config.store.url, run_id)
    for iteration in (1, 2):
        table = store.read_batch(iteration)
        assert table.num_rows == 16
        assert set(table.column_names) >= {"prompt", "completion", "reward", "advantage", "kept", "sampler_logprobs"}
        assert store.manifest(iteration).kept == sum(table.column("kept").to_pylist())
    assert store.read_json("checkpoints/latest.json")["iteration"] == 2


def test_resume_continues_the_same_run(prefect_api, small_config):
    run_id = dash_train(config=small_config)["run_id"]
    assert main(["train", "--resume", run_id, "--set", "iterations=4", *cli_args(small_config)]) == 0
    client = MlflowClient(small_config.tracking.uri)
    assert steps(client, run_id, "reward/mean") == [1, 2, 3, 4]
    assert [m.value for m in client.get_metric_history(run_id, "samples/total")] == [16, 32, 48, 64]
    assert steps(client, run_id, "eval/arithmetic/accuracy") == [0, 1, 2, 3, 4]
    assert RunStore(small_config.store.url, run_id).manifest(4).rows == 16
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_crashed_run_checkpoints_what_it_learned_and_resumes(prefect_api, small_config):
    # From random weights every reward is 0: nothing is kept, and the run stops after 3 such iterations.
    config = small_config.model_copy(deep=True)
    config.warmup.steps = 0
    config.iterations = 10
    config.checkpoint.every = 100
    config.algo.max_empty_iterations = 3
    with pytest.raises(EverythingFilteredError, match="lower learner.lr"):
        dash_train(config=config)
    client = MlflowClient(config.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.info.status == "FAILED"
    store = RunStore(config.store.url, run.info.run_id)
    assert store.read_json("checkpoints/latest.json")["iteration"] == 2
    resumed = ["--set", "algo.max_empty_iterations=50", "--set", "iterations=4"]
    assert main(["train", "--resume", run.info.run_id, *resumed, *cli_args(config)]) == 0
    assert steps(client, run.info.run_id, "reward/mean") == [1, 2, 3, 4]


@pytest.mark.parametrize(("failing_step", "saved"), [(3, 1), (4, None)])
def test_a_failure_mid_update_never_checkpoints_a_half_step(prefect_api, small_config, monkeypatch, failing_step, saved):
    # ppo_multi takes 2 optimizer steps per iteration; iteration 2's steps are calls 3 and 4 of Learner.step.
    # Failing at call 3 leaves iteration 1's clean weights (saved); at call 4 a step of iteration 2 is already in them.
    config = small_config.model_copy(deep=True)
    config.iterations, config.checkpoint.every = 3, 100
    config.algo.rule, config.algo.ppo_steps, config.algo.tau = "ppo_multi", 2, 0.0
    calls = []
    real_step = Learner.step

    def step(learner, chunks, stand_in=None):
        if learner.algo.rule != "ppo_multi":  # the warm-up's supervised steps
            return real_step(learner, chunks, stand_in)
        calls.append(1)
        if len(calls) == failing_step:
            raise NonFiniteLossError("injected non-finite loss")
        return real_step(learner, chunks, stand_in)

    monkeypatch.setattr(Learner, "step", step)
    with pytest.raises(NonFiniteLossError):
        dash_train(config=config)
    client = MlflowClient(config.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.info.status == "FAILED"
    store = RunStore(config.store.url, run.info.run_id)
    latest = store.read_json("checkpoints/latest.json")["iteration"] if store.exists("checkpoints/latest.json") else None
    assert latest == saved
    assert steps(client, run.info.run_id, "samples/total") == [1]


def test_resume_takes_the_configs_learning_rate(prefect_api, small_config):
    run_id = dash_train(config=small_config)["run_id"]
    config = small_config.model_copy(deep=True)
    config.learner.lr = 1e-7
    run = TrainingRun.resume(config, run_id)
    run.finish()
    assert {group["lr"] for group in run.learner.optimizer.param_groups} == {1e-7}
    assert run.state.samples_total == 2 * 4 * 4 and run.state.iteration == 2


def test_cli_rejects_bad_config_before_any_work(capsys, tmp_path):
    assert main(["train", "--set", "no.such.key=1"]) == 2
    assert "no: unknown key" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampler: [\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err
    sft_m = Path(__file__).parents[1] / "configs" / "sft_m.yaml"  # its teacher only exists inside a sweep
    assert main(["train", "--config", str(sft_m)]) == 2
    assert "outside a sweep set algo.teacher" in capsys.readouterr().err


def test_unknown_run_id_is_explained(capsys, tmp_path):
    assert main(["train", "--resume", "0123abcd", "--set", f"tracking.uri=sqlite:///{tmp_path}/m.db"]) == 2
    assert "cannot resume run '0123abcd'" in capsys.readouterr().err


def test_rollouts_and_checkpoints_can_live_in_s3(prefect_api, small_config, s3_options, s3_bucket):
    config = small_config.model_copy(deep=True)
    config.store.url = f"s3://{s3_bucket}/runs"
    config.store.storage_options = s3_options
    run_id = dash_train(config=config)["run_id"]
    store = RunStore(config.store.url, run_id, s3_options)
    assert store.read_batch(2).num_rows == 16
    assert store.exists("checkpoints/iter_000002/model.safetensors")
    assert store.read_json("checkpoints/latest.json") == {"iteration": 2, "path": "checkpoints/iter_000002"}


def test_periodic_evaluation_covers_out_of_distribution_sets(prefect_api, small_config):
    config = small_config.model_copy(deep=True)
    config.iterations = 1
    config.eval.datasets = [{"name": "gsm8k", "path": str(Path(__file__).parent / "data" / "gsm8k_train.jsonl"), "size": 3}]
    config = type(config).model_validate(config.model_dump())
    run_id = dash_train(config=config)["run_id"]
    client = MlflowClient(config.tracking.uri)
    for name in ("arithmetic", "gsm8k"):
        assert steps(client, run_id, f"eval/{name}/sampled_accuracy") == [0, 1]
