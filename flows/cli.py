"""`dashrl`: the command line. Configs are resolved and validated here, before Prefect or torch start any work."""

from __future__ import annotations

import argparse
import os
import sys

import yaml

from dash_core.config import ConfigError, DashConfig, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dashrl", description="DASH: on-policy RL post-training for reasoning.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a policy (the embedded default needs no GPU and no network)")
    train.add_argument("--config", help="YAML preset, e.g. configs/dash.yaml")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config value, e.g. --set algo.tau=0.2 (repeatable)")
    train.add_argument("--model", help="shorthand for --set model.name=MODEL (hub id or local directory)")
    train.add_argument("--resume", metavar="RUN_ID", help="continue an MLflow run from its last checkpoint")
    return parser


def resolve_train_config(args: argparse.Namespace) -> DashConfig:
    overrides = list(args.overrides) + ([f"model.name={args.model}"] if args.model else [])
    config = load_config(args.config, overrides)
    if args.resume:
        from dash_core.tracking import run_config

        base = yaml.safe_load(run_config(config.tracking, args.resume))
        config = load_config(args.config, overrides, base=base)
    return config


def _quiet_defaults() -> None:
    """Per-task INFO lines would bury the progress display; users can still set these themselves."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = resolve_train_config(args)
    except ConfigError as exc:
        print(f"dashrl: {exc}", file=sys.stderr)
        return 2
    _quiet_defaults()
    from dash_core.learner import NonFiniteLossError
    from dash_core.run import EverythingFilteredError
    from flows.train import dash_train

    try:
        dash_train(config=config, resume=args.resume)
    except (ConfigError, NonFiniteLossError, EverythingFilteredError, OSError) as exc:
        print(f"dashrl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dashrl: interrupted; the last iteration's weights were checkpointed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
