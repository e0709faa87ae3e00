"""Bad input gets one clear line, checked before anything is created: no MLflow run, no store folder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import dash_core.rewards.code.sandbox as sandbox
from dash_core.config import TrackingConfig, load_config
from dash_core.preflight import check_run
from dash_core.rewards.code import allow_weak_sandbox, run_tests
from dash_core.run import _with_sandbox
from dash_core.tracking import Tracker
from flows.cli import main

DATA = Path(__file__).parent / "data"


def bad_jsonl(tmp_path: Path) -> str:
    path = tmp_path / "broken.jsonl"
    good = (DATA / "gsm8k_train.jsonl").read_text().splitlines()
    path.write_text("\n".join([good[0], good[1], '{"question": "no closing brace"', good[2]]) + "\n")
    return str(path)


def missing_field(tmp_path: Path) -> str:
    path = tmp_path / "fields.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n" + json.dumps({"question": "no answer"}) + "\n")
    return str(path)


def gsm8k_task(path: str) -> list[str]:
    held_out = json.dumps([{"name": "gsm8k", "path": str(DATA / "gsm8k_train.jsonl")}])
    return ["--set", "task.name=gsm8k", "--set", f"task.path={path}", "--set", f"eval.datasets={held_out}"]


CASES = {
    "missing model path": (lambda tmp: ["--model", "/nonexistent/model"], "model.name '/nonexistent/model': no such directory"),
    "directory that is no model": (lambda tmp: ["--model", str(tmp)], "is a directory without config.json"),
    "missing task.path": (lambda tmp: gsm8k_task("/nonexistent/gsm8k.jsonl"), "dataset file not found: /nonexistent/gsm8k.jsonl"),
    "malformed jsonl": (lambda tmp: gsm8k_task(bad_jsonl(tmp)), "broken.jsonl:3: not a JSON object"),
    "row without a field": (lambda tmp: gsm8k_task(missing_field(tmp)), "fields.jsonl:2: a 'gsm8k' row with a missing or malformed field 'answer'"),
    "unwritable store": (lambda tmp: ["--set", "store.url=/proc/dash_runs"], "store.url '/proc/dash_runs' is not writable"),
    "sqlite in a missing folder": (lambda tmp: ["--set", f"tracking.uri=sqlite:///{tmp}/no/such/mlflow.db"], "does not exist; create it"),
    "unwritable sqlite": (lambda tmp: ["--set", "tracking.uri=sqlite:////proc/mlflow.db"], "cannot write the database /proc/mlflow.db"),
    "cuda without a GPU": (lambda tmp: ["--set", "model.device=cuda"], "torch sees no CUDA device on this machine"),
    "unreachable tracking server": (lambda tmp: ["--set", "tracking.uri=http://127.0.0.1:9"], "MLflow tracking server http://127.0.0.1:9 is not reachable"),
    "unknown tracking scheme": (lambda tmp: ["--set", "tracking.uri=foo://bar"], "MLflow has no tracking store for the scheme 'foo'"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_leaves_nothing_behind(case, tmp_path, capsys):
    args, message = CASES[case]
    (tmp_path / "empty").mkdir()
    store, db = tmp_path / "store", tmp_path / "mlflow.db"
    defaults = ["--set", f"store.url={store}", "--set", f"tracking.uri=sqlite:///{db}"]
    assert main(["train", *defaults, *args(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not store.exists() or not any(store.iterdir())
    assert not db.exists() or not MlflowClient(f"sqlite:///{db}").search_runs(["0"])
    assert not (tmp_path / "empty" / "no").exists()  # a sqlite URI never creates its folder


def test_runs_started_at_once_in_a_fresh_folder_share_one_database(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    script = "import sys; from dash_core.config import TrackingConfig; from dash_core.tracking import Tracker; " \
             "t = Tracker.new_run(TrackingConfig(uri=sys.argv[1]), None, {}); t.log_metrics({'x': 1.0}, 0); t.finish()"
    starts = [subprocess.Popen([sys.executable, "-c", script, uri], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for process in starts:
        assert process.wait(timeout=300) == 0, process.stderr.read()[-2000:]
    tracker = Tracker.new_run(TrackingConfig(uri=uri), None, {})  # and the database still works afterwards
    tracker.finish()
    assert len(MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("dash").experiment_id])) == 4


@pytest.fixture
def no_bubblewrap(monkeypatch):
    """A machine without bwrap, as a fresh one is."""
    sandbox._bwrap_probe.cache_clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    yield
    monkeypatch.undo()
    allow_weak_sandbox(False)
    sandbox._bwrap_probe.cache_clear()


def test_a_code_run_without_bubblewrap_refuses_to_start_unless_the_weak_sandbox_is_chosen(no_bubblewrap, tmp_path, capsys):
    store, db = tmp_path / "store", tmp_path / "mlflow.db"
    where = ["--set", f"store.url={store}", "--set", f"tracking.uri=sqlite:///{db}"]
    mbpp = ["--set", "task.name=mbpp", "--set", f"task.path={DATA / 'mbpp.jsonl'}", "--set", "task.split=train",
            "--set", "eval.datasets=" + json.dumps([{"name": "mbpp", "path": str(DATA / "mbpp.jsonl")}])]  # fmt: skip
    for command in (["train", *where, *mbpp], ["eval", "--dataset", "mbpp", "--data-path", str(DATA / "mbpp.jsonl"), *where]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "reward.sandbox=bubblewrap: bubblewrap (bwrap) is not installed" in err and len(err.strip().splitlines()) == 1, err
        assert "apt-get install bubblewrap" in err and "reward.sandbox=weak" in err
        assert not store.exists() and not db.exists()

    assert check_run(load_config(None, [f"store.url={store}"])) is not None  # arithmetic runs no code: nothing to isolate
    weak = load_config(None, [f"store.url={store}", "reward.sandbox=weak", *mbpp[1::2]])
    data = check_run(weak)
    assert _with_sandbox({"dash.kind": "train"}, weak, data) == {"dash.kind": "train", "dash.sandbox": "weak"}
    assert run_tests("def add(a, b):\n    return a + b\n", "assert add(1, 2) == 3\n").passed  # the weaker sandbox runs it


def test_resuming_an_unknown_run_is_one_line_and_creates_no_database(tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    assert main(["train", "--resume", "0123456789abcdef", "--set", f"tracking.uri=sqlite:///{db}"]) == 2
    err = capsys.readouterr().err
    assert f"the tracking database {db} does not exist" in err and len(err.strip().splitlines()) == 1, err
    assert not db.exists() and not (tmp_path / "mlflow.db.lock").exists()
