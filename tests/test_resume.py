"""The rollout store as the run's write-ahead log: after kill -9 at any point and a resume, every MLflow metric
has one value per step, no completed iteration is lost, and the replayed weights equal an uninterrupted run's."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from mlflow.tracking import MlflowClient

from dash_core import loop
from dash_core.config import DashConfig
from dash_core.loop import ResumeError
from dash_core.run import TrainingRun
from flows.cli import main

KILLED_RUN = textwrap.dedent("""
    import json, os, signal, sys, time
    from dash_core import loop
    from dash_core.config import DashConfig
    from dash_core.run import TrainingRun

    config = DashConfig.model_validate(json.loads(sys.argv[1]))
    run = TrainingRun.start(config)
    print(run.run_id, flush=True)
    loop.warm_up(run)
    def kill():
        run.tracker.flush()
        os.kill(os.getpid(), signal.SIGKILL)
""")


def killed_run(config: DashConfig, then: str) -> str:
    """Start a run in a child process, do `then` (Python using `run` and `kill()`), and return its run id."""
    script = KILLED_RUN + textwrap.dedent(then)
    child = subprocess.run([sys.executable, "-c", script, config.model_dump_json()], capture_output=True, text=True, timeout=600)
    assert child.returncode == -9, child.stderr[-3000:]
    return child.stdout.split()[0]


def uninterrupted(config: DashConfig, iterations: int) -> dict[str, torch.Tensor]:
    run = TrainingRun.start(config)
    loop.warm_up(run)
    loop.iterations(run, iterations)
    run.save()
    run.finish()
    return run.policy.state_dict()


def resumed(config: DashConfig, run_id: str, iterations: int) -> TrainingRun:
    run = TrainingRun.resume(config, run_id)
    loop.replay(run)
    loop.iterations(run, iterations)
    run.save()
    run.finish()
    return run


def steps(config: DashConfig, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(config.tracking.uri).get_metric_history(run_id, key))


@pytest.fixture
def config(small_config) -> DashConfig:
    small_config.iterations = 4
    small_config.checkpoint.every = 2
    small_config.algo.tau = 0.0  # every iteration updates the weights
    return small_config


@pytest.mark.parametrize(
    ("when", "then"),
    [
        ("after iteration 3, checkpoint 2", "loop.iterations(run, 3); run.checkpointer.wait(); kill()"),
        ("before the first checkpoint", "run.config.checkpoint.every = 100; loop.iterations(run, 3); kill()"),
        ("writing checkpoint 2", """
            copy = run.store.fs.put_file
            def stall(local, remote, **kwargs):
                copy(local, remote, **kwargs)
                if "iter_000002" in remote:
                    kill()
            run.store.fs.put_file = stall
            loop.iterations(run, 3)
        """),
    ],
)
def test_a_killed_run_resumes_to_the_uninterrupted_weights_logging_each_step_once(config, when, then):
    expected = uninterrupted(config.model_copy(deep=True), 4)
    run_id = killed_run(config, then)
    run = resumed(config, run_id, 4)
    for key in ("reward/mean", "train/loss", "samples/total", "time/sample_s"):  # replay fills in the lost ones
        assert steps(config, run_id, key) == [1, 2, 3, 4], (when, key)
    assert set(steps(config, run_id, "time/replay_learn_s")) <= {1, 2, 3}  # the replay's own, named so
    train_s = [m.value for m in sorted(MlflowClient(config.tracking.uri).get_metric_history(run_id, "time/train_s"), key=lambda m: m.step)]
    assert train_s == sorted(train_s), "time/train_s went backwards"
    assert run.state.samples_total == 4 * 16
    assert all(torch.equal(expected[k], v) for k, v in run.policy.state_dict().items()), when


def test_a_run_killed_during_an_evaluation_evaluates_on_resume(prefect_api, config):
    config.eval.every = 2
    run_id = killed_run(config, """
        run.log(loop.evaluate(run, 0), 0)
        loop.iterations(run, 2)
        kill()
    """)
    args = ["train", "--resume", run_id, "--set", f"tracking.uri={config.tracking.uri}", "--set", f"store.url={config.store.url}"]
    assert main(args) == 0
    assert steps(config, run_id, "reward/mean") == [1, 2, 3, 4]
    assert steps(config, run_id, "eval/arithmetic/accuracy") == [0, 2, 4]


def test_a_lost_checkpoint_folder_is_rebuilt_from_the_rollouts(config):
    expected = uninterrupted(config.model_copy(deep=True), 4)
    run_id = killed_run(config, "loop.iterations(run, 3); run.checkpointer.wait(); kill()")
    shutil.rmtree(os.path.join(config.store.url, run_id, "checkpoints"))
    run = resumed(config, run_id, 4)
    assert steps(config, run_id, "reward/mean") == [1, 2, 3, 4]
    assert all(torch.equal(expected[k], v) for k, v in run.policy.state_dict().items())


def test_history_ahead_of_what_the_store_holds_refuses_to_resume(config, capsys):
    run_id = killed_run(config, "loop.iterations(run, 3); run.checkpointer.wait(); kill()")
    for folder in ("checkpoints", "rollouts"):
        shutil.rmtree(os.path.join(config.store.url, run_id, folder))
    with pytest.raises(ResumeError, match="holds iterations up to 3.*would log iterations 1-3 twice"):
        loop.replay(TrainingRun.resume(config, run_id))
    args = ["train", "--resume", run_id, "--set", f"tracking.uri={config.tracking.uri}", "--set", f"store.url={config.store.url}"]
    assert main(args) == 1
    assert "Restore the run's checkpoints/ and rollouts/ folders" in capsys.readouterr().err
    assert json.loads(json.dumps(steps(config, run_id, "reward/mean"))) == [1, 2, 3]


def test_rollouts_sampled_ahead_are_learned_once_after_a_crash(config):
    """k = 1: a thread samples batch t + 1 while iteration t learns. Killed after iteration 3 (checkpoint 2) with
    batch 4 already stored, the resumed run learns 3 and 4 from the store, then goes on: every iteration once."""
    config.sampler.max_staleness = 1
    config.iterations = 6
    run_id = killed_run(config, """
        class KilledAfter3(loop.Hooks):
            def iteration(self, iteration, metrics):
                if iteration == 3:
                    while not run.store.has_batch(4):  # sampled ahead, never learned
                        time.sleep(0.05)
                    run.checkpointer.wait()
                    kill()
        loop.iterations(run, 6, KilledAfter3())
    """)
    assert steps(config, run_id, "reward/mean") == [1, 2, 3]
    run = resumed(config, run_id, 6)
    for key in ("reward/mean", "train/loss", "samples/total", "train/staleness_mean", "train/is_weight_mean", "train/mismatch_kl"):
        assert steps(config, run_id, key) == [1, 2, 3, 4, 5, 6], key
    staleness = MlflowClient(config.tracking.uri).get_metric_history(run_id, "train/staleness_mean")
    assert {m.value for m in staleness} <= {0.0, 1.0} and run.state.iteration == 6
