"""The peer benchmark's DASH side at toy size, end to end (TRL is an optional extra, not a test dependency): a
worker process trains through `dashrl train`, the parent watches its CPU, and the report prints."""

import runpy
from pathlib import Path

from helpers import TINY

from dash_core.models import load_policy, save_model

BENCH = Path(__file__).parents[1] / "bench"


def test_vs_trl_measures_the_dash_side(tmp_path, capsys):
    vs_trl = runpy.run_path(str(BENCH / "vs_trl.py"))
    options = ["--systems", "dash", "--pairs", "1", "--max-steps", "3", "--budget-s", "600", "--prompts", "8",
               "--group", "4", "--eval-size", "20", "--eval-n", "2"]  # fmt: skip
    args = vs_trl["build_parser"]().parse_args(options)
    args.model = save_model(*load_policy(TINY), tmp_path / "policy")
    runs = vs_trl["compare"](["dash"], args, tmp_path)
    (record,) = runs["dash"]
    assert len(record["steps"]) == 3
    assert all(step["cycle_s"] >= step["generate_s"] + step["learn_s"] > 0 for step in record["steps"])
    assert record["loop_start"] < record["loop_end"] and record["cpu_s"] > 0
    assert 0 <= record["heldout"]["greedy"] <= 1 and 0 <= record["heldout"]["sampled"] <= 1
    vs_trl["report"](runs, ["dash"], args)
    out = capsys.readouterr().out
    assert "dash mean" in out and "training reward per step" in out
