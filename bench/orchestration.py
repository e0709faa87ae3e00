"""The orchestration tax: the same training iterations as a plain loop and through the `dash-train` flow.

    dashrl bench orchestration [--iterations 200 --rounds 2 --threads 1 --prefect ephemeral|server]

Each round runs the embedded default for --iterations iterations (from its cached warm-up) twice, in fresh
processes and alternating order: as `loop.iterations` called directly (a plain loop, with the same MLflow logging), and as
the `dash-train` flow against Prefect's ephemeral server, or against a real `prefect server` started for the
benchmark on loopback (--prefect server). Both report the same `time/iteration_s` (an iteration's whole
wall-clock on the loop, orchestration included). Printed per mode: median, mean, p90 and worst iteration, worst
over median, iterations over 1.5x and 2x the median, Prefect client retries; then the tax: flow / plain - 1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench._shared import QUIET_ENV, embedded_config, finish, spread, warm_policy, worker

MODES = ("plain", "flow")


def run_mode(mode: str, args: argparse.Namespace) -> None:
    """Worker: train, then write the iterations' `time/iteration_s` to --out."""
    config = embedded_config(
        Path(args.workdir), threads=args.threads, iterations=args.iterations, model={"name": args.model},
        warmup={"steps": 0}, eval={"every": 10 * args.iterations, "size": 50, "log_samples": 0},
        tracking={"experiment": f"orchestration-{mode}"},
    )  # fmt: skip
    if mode == "flow":
        from flows.train import dash_train

        run_id = dash_train(config=config)["run_id"]
    else:
        from dash_core import loop
        from dash_core.run import TrainingRun
        from dash_core.timing import steady_heap

        run = TrainingRun.start(config)
        with steady_heap():
            loop.iterations(run, args.iterations)  # the same iterations, without the flow around them
        run.save()
        run.finish()
        run_id = run.run_id
    from mlflow.tracking import MlflowClient

    history = MlflowClient(config.tracking.uri).get_metric_history(run_id, "time/iteration_s")
    times = [m.value for m in sorted(history, key=lambda m: m.step)]
    Path(args.out).write_text(json.dumps({"iteration_s": times}))


def prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    """A real Prefect server on a free loopback port (sqlite in `home`), started as users start one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | QUIET_ENV | {"PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    prefect = Path(sys.executable).with_name("prefect")
    server = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    for _ in range(240):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise RuntimeError("the Prefect server did not become healthy within 2 minutes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="plain/flow pairs, alternating which runs first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves a core to the Prefect server)")
    parser.add_argument("--prefect", choices=["ephemeral", "server"], default="ephemeral")
    parser.add_argument("--workdir", help="folder for the warm-up cache, stores and MLflow (default: a temp folder)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_mode(args.worker, args)

    from rich.console import Console
    from rich.table import Table

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dash-orchestration-"))
    model = warm_policy(workdir, args.threads)
    # The client logs each retry of a request the server answered with "try again" (a stall) at DEBUG.
    server, env = None, {"PREFECT_HOME": str(workdir / "prefect"), "PREFECT_LOGGING_LOGGERS_PREFECT_CLIENT_LEVEL": "DEBUG"}
    if args.prefect == "server":
        server, url = prefect_server(workdir / "prefect-server")
        env["PREFECT_API_URL"] = url
    results: dict[str, list[float]] = {mode: [] for mode in MODES}
    retries = dict.fromkeys(MODES, 0)
    try:
        for round_ in range(args.rounds):
            for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
                out, log = workdir / f"{mode}-{round_}.json", workdir / f"{mode}-{round_}.log"
                options = ["--iterations", str(args.iterations), "--threads", str(args.threads), "--workdir",
                           str(workdir), "--model", model]  # fmt: skip
                with log.open("w") as stderr:
                    result = finish(worker(__file__, mode, out, options, env, stderr), out)
                results[mode] += result["iteration_s"][1:]  # the first iteration also pays one-off warm-ups
                retries[mode] += log.read_text().count("Another attempt will be made")
    finally:
        if server:
            server.terminate()
            server.wait()

    stats = {mode: spread(times) for mode, times in results.items()}
    title = (f"iteration wall-clock (s), embedded default, {args.threads} torch thread(s), Prefect {args.prefect}, "
             f"{args.rounds} x {args.iterations} iterations per mode")  # fmt: skip
    table = Table(title=title)
    for column in ["mode", "median", "mean", "p90", "worst", "worst/median", ">1.5x median", ">2x median", "client retries"]:
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode, s in stats.items():
        table.add_row(mode, f"{s['median']:.4f}", f"{s['mean']:.4f}", f"{s['p90']:.4f}", f"{s['max']:.4f}",
                      f"{s['max/median']:.2f}", str(s["over_1.5x"]), str(s["over_2x"]), str(retries[mode]))  # fmt: skip
    console = Console(width=160)
    console.print(table)
    plain, flow = stats["plain"], stats["flow"]
    console.print(f"orchestration tax: median {flow['median'] / plain['median'] - 1:+.1%}, "
                  f"mean {flow['mean'] / plain['mean'] - 1:+.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
