"""The nightly regression check: each figure of a night against the median of earlier nights and against the
committed baseline, within the figure's noise band. Pure (numbers in, verdicts and Markdown out), so it is tested
on plain numbers; bench/_history.py fetches the references.

A band is a tolerance in the figure's bad direction, counted as "slower": a time may grow to (1 + tolerance) x its
reference, a rate may fall to 1 / (1 + tolerance) of it. So a tolerance of 0.3 flags a night 40% slower whichever
way a figure counts. A median needs MIN_NIGHTS earlier nights (one quiet or busy night is no reference); with
fewer, the baseline is the only reference. A figure that references have but the night lacks is a regression too:
a benchmark that stopped measuring it, or a backend that is gone.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

MIN_NIGHTS = 3


@dataclass(frozen=True)
class Band:
    higher_is_better: bool
    tolerance: float
    what: str


# Throughput and times get 30% (a shared 2-core box is that noisy; 40% slower is still caught). Ratios of two
# timings taken back to back are steadier. Accuracies of a seeded run move only when the code does, and a grader
# that stops agreeing with the expected rewards is broken however fast it is.
FIGURES: dict[str, Band] = {
    "iteration/speedup": Band(True, 0.25, "small-batch / preemptive iteration time"),
    "iteration/preemptive_s": Band(False, 0.3, "s per iteration, preemptive sampling"),
    "iteration/small_batch_s": Band(False, 0.3, "s per iteration, one sampling call per micro-batch"),
    "sampling/transformers_tokens_per_s": Band(True, 0.3, "tokens/s, transformers backend, one large call"),
    "sampling/vllm_tokens_per_s": Band(True, 0.3, "tokens/s, in-process vLLM, one large call"),
    "learner/tokens_per_s": Band(True, 0.3, "tokens/s through forward + backward + optimizer step"),
    "grader/math_answers_per_s": Band(True, 0.3, "MATH-500 answers graded per s"),
    "grader/math_as_expected": Band(True, 0.0, "fraction of math rewards as expected"),
    "sandbox/programs_per_s": Band(True, 0.3, "MBPP+ programs judged per s in the sandbox"),
    "sandbox/as_expected": Band(True, 0.0, "fraction of code rewards as expected"),
    "sync/transformers_full_s": Band(False, 0.3, "s per full weight sync, transformers private copy (tiny model)"),
    "sync/transformers_lora_s": Band(False, 0.3, "s per LoRA adapter sync, transformers private copy"),
    "sync/vllm_full_s": Band(False, 0.3, "s per full weight sync, in-process vLLM (tiny model)"),
    "sync/vllm_lora_s": Band(False, 0.3, "s per LoRA adapter sync, in-process vLLM"),
    "sync/transformers_lora_bytes_share": Band(False, 0.05, "adapter bytes / full bytes per sync, transformers"),
    "sync/vllm_lora_bytes_share": Band(False, 0.05, "adapter bytes / full bytes per sync, in-process vLLM"),
    "curve/train_s_to_gain": Band(False, 0.3, "training s to the profile's gain in held-out sampled accuracy"),
    "curve/iterations_to_gain": Band(False, 0.25, "iterations to that gain"),
    "curve/final_sampled_accuracy": Band(True, 0.05, "held-out sampled accuracy at the end"),
    "curve/final_greedy_accuracy": Band(True, 0.05, "held-out greedy accuracy at the end"),
}


@dataclass(frozen=True)
class Verdict:
    """One figure of the night and its references; `worse` names the references it fell out of band against,
    with how many times worse it is (1.4 = 40% slower)."""

    figure: str
    value: float | None  # None: the night did not measure it
    median: float | None  # of the earlier nights; None with fewer than MIN_NIGHTS
    nights: int
    baseline: float | None
    worse: dict[str, float] = field(default_factory=dict)
    better: bool = False  # out of band on the good side of the baseline: time to update it

    @property
    def regression(self) -> bool:
        return self.value is None or bool(self.worse)


def slowdown(band: Band, value: float, reference: float) -> float:
    """How many times worse `value` is than `reference` (below 1: better)."""
    if band.higher_is_better:
        return reference / value if value > 0 else math.inf
    return value / reference if reference > 0 else math.inf


def judge(tonight: dict[str, float], earlier: list[dict[str, float]], baseline: dict[str, float]) -> list[Verdict]:
    """A verdict per figure that the night, an earlier night or the baseline has, in FIGURES' order."""
    names = set(tonight) | set(baseline) | {name for night in earlier for name in night}
    if unknown := sorted(names - set(FIGURES)):
        raise ValueError(f"figures without a noise band: {', '.join(unknown)} (add them to FIGURES in {__name__})")
    verdicts = []
    for name in (name for name in FIGURES if name in names):
        band, value = FIGURES[name], tonight.get(name)
        history = [night[name] for night in earlier if name in night]
        median = statistics.median(history) if len(history) >= MIN_NIGHTS else None
        references = {"median": median, "baseline": baseline.get(name)}
        worse = {}
        if value is not None:
            worse = {
                ref: s
                for ref, x in references.items()
                if x is not None and (s := slowdown(band, value, x)) > 1 + band.tolerance
            }
        better = (
            value is not None and name in baseline and slowdown(band, value, baseline[name]) < 1 / (1 + band.tolerance)
        )
        verdicts.append(Verdict(name, value, median, len(history), baseline.get(name), worse, better))
    return verdicts


def summary(verdicts: list[Verdict], title: str, context: list[str]) -> str:
    """The night as Markdown: a line per `context` item, the table of figures, and the regressions named."""
    regressions = [v for v in verdicts if v.regression]
    head = f"## {title}: " + (f"{len(regressions)} regression(s)" if regressions else "no regression")
    lines = [head, "", *(f"- {item}" for item in context), ""]
    lines += [
        "| figure | tonight | median of earlier nights | baseline | band | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        band = FIGURES[v.figure]
        median = f"{_number(v.median)} ({v.nights})" if v.median is not None else f"- ({v.nights})"
        limit = f"{'↑' if band.higher_is_better else '↓'} {band.tolerance:.0%}"
        lines.append(
            f"| `{v.figure}` ({band.what}) | {_number(v.value)} | {median} | {_number(v.baseline)} | {limit} | {_verdict(v)} |"
        )
    lines += ["", "Band: ↑ higher is better, ↓ lower is better; the % is how much slower (worse) a night may be than",
              f"each reference. Medians need {MIN_NIGHTS} earlier nights of the same profile on the same machine."]  # fmt: skip
    if regressions:
        lines += ["", "**Outside the band:** " + ", ".join(f"`{v.figure}`" for v in regressions)]
    return "\n".join(lines) + "\n"


def _verdict(v: Verdict) -> str:
    if v.value is None:
        return "**REGRESSION**: not measured"
    if v.worse:
        return "**REGRESSION**: " + ", ".join(f"{s - 1:.0%} worse than the {ref}" for ref, s in v.worse.items())
    if v.better:
        return "better than the baseline (update it?)"
    return "ok" if v.median is not None or v.baseline is not None else "new (no reference yet)"


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
