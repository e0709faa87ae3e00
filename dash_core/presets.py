"""The shipped presets: the files in configs/ that say how to train, which a sweep compares side by side.

A base such as configs/math.yaml says what to train (it names a `task` or a `model`) and is given with `--config`;
every other file there is a preset, a few lines over the base. `Preset` is the choice a sweep's form offers.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from dash_core.config import read_yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
BASE_KEYS = {"task", "model"}  # what to train: a base sets them, a preset never does


def preset_names(folder: Path = CONFIG_DIR) -> list[str]:
    """The presets in `folder`, by name (the file name without .yaml)."""
    return sorted(path.stem for path in folder.glob("*.yaml") if not BASE_KEYS & read_yaml(path).keys())


Preset = StrEnum("Preset", {name: name for name in preset_names()})
Preset.__doc__ = "A preset shipped in configs/."


def preset_path(preset: Preset) -> Path:
    return CONFIG_DIR / f"{preset}.yaml"
