"""The nightly benchmark on this machine: the `dash-bench` flow that CI's nightly deployment runs, with its table
of figures and verdict printed; exits 1 when a figure regressed.

    dashrl bench nightly [--profile quick|full] [--tracking-uri URI] [--experiment dash-nightly] [--update-baseline]

--update-baseline makes this night's figures the committed baseline of the profile on this machine
(bench/baseline.json), regressions or not: after a change that makes a figure worse on purpose, or to add a machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import get_args

from rich.console import Console
from rich.markdown import Markdown

from bench import _history, _profiles
from flows.nightly import dash_bench
from flows.prefect_api import prefect_api
from tasks.nightly import RegressionError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=get_args(_profiles.ProfileName), default="full")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)"
    )
    parser.add_argument("--experiment", default="dash-nightly")
    parser.add_argument("--baseline", type=Path, default=_history.BASELINE, help="baseline figures (JSON)")
    parser.add_argument("--update-baseline", action="store_true", help="write this night's figures to --baseline")
    args = parser.parse_args()

    start = time.perf_counter()
    with prefect_api():
        try:
            report = dash_bench(profile=args.profile, tracking_uri=args.tracking_uri, experiment=args.experiment,
                                baseline=str(args.baseline))  # fmt: skip
        except RegressionError as exc:
            report = exc.report
    console = Console(width=160)
    console.print(Markdown(report["summary"]))
    console.print(
        f"the {args.profile} profile took {time.perf_counter() - start:.0f} s (the flow, with its Prefect server)"
    )
    if args.update_baseline:
        _history.write_baseline(args.baseline, args.profile, report["figures"])
        console.print(f"baseline of {args.profile} on this machine written to {args.baseline}")
    sys.exit(1 if report["regressions"] and not args.update_baseline else 0)


if __name__ == "__main__":
    main()
