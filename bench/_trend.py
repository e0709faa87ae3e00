"""The nightly trend plot: each figure over the nights, tonight marked, with the baseline and its noise band."""

from __future__ import annotations

import math
from datetime import datetime

import matplotlib

matplotlib.use("Agg")  # no display on workers and CI

import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from bench._history import Night  # noqa: E402
from bench._regression import FIGURES, Verdict  # noqa: E402


def trend_plot(nights: list[Night], tonight: datetime, verdicts: list[Verdict], title: str) -> Figure:
    """A panel per figure: earlier nights as a line, tonight as a dot (red when out of band), the baseline dashed
    with its band shaded."""
    columns = 3
    rows = math.ceil(len(verdicts) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3 * rows), squeeze=False)
    for ax, verdict in zip(axes.flat, verdicts):
        band = FIGURES[verdict.figure]
        points = [(night.started, night.figures[verdict.figure]) for night in nights if verdict.figure in night.figures]
        if points:
            ax.plot(*zip(*points), marker=".", color="tab:blue", label="earlier nights")
        if verdict.value is not None:
            ax.plot(
                [tonight], [verdict.value], "o", color="tab:red" if verdict.regression else "tab:green", label="tonight"
            )
        if verdict.baseline is not None:
            low, high = sorted([verdict.baseline / (1 + band.tolerance), verdict.baseline * (1 + band.tolerance)])
            bad = low if band.higher_is_better else high
            ax.axhline(verdict.baseline, linestyle="--", color="gray", label="baseline")
            ax.axhspan(min(bad, verdict.baseline), max(bad, verdict.baseline), color="gray", alpha=0.15)
        ax.set_title(f"{verdict.figure} ({'higher' if band.higher_is_better else 'lower'} is better)", fontsize=9)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax.xaxis.get_major_locator()))
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(verdicts) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    return figure
