"""Prefect flows (train, ...) and the `dashrl` command line."""

import sys


def main() -> int:
    """The `dashrl` command: flows.cli's `main`, with a Ctrl-C during its imports ending as one at any other moment."""
    try:
        from flows.cli import main as dashrl
    except KeyboardInterrupt:
        return interrupted()
    return dashrl()


def interrupted() -> int:
    print("dashrl: interrupted", file=sys.stderr)
    return 130
