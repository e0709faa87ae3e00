"""The loop's own decisions, on their inputs alone: how far `max_staleness: auto` lets rollouts run ahead."""

from types import SimpleNamespace

from dash_core.config import DashConfig
from dash_core.loop import choose_staleness
from dash_core.run import RunState


def block(idle: float, mismatch: float) -> list[dict[str, float]]:
    """A block's iterations: the learner waited `idle` of each for its batch."""
    return [{"time/wait_s": idle, "time/iteration_s": 1.0, "train/mismatch_kl": mismatch}] * 3


def auto_run(staleness: int) -> SimpleNamespace:
    config = DashConfig.model_validate({"sampler": {"max_staleness": "auto", "max_mismatch_kl": 0.01}})
    return SimpleNamespace(config=config, state=RunState(staleness=staleness), recent=[])


def test_auto_staleness_grows_while_the_learner_waits_and_backs_off_for_good_when_the_mismatch_is_high():
    run = auto_run(1)
    assert choose_staleness(run) == 1  # nothing measured yet
    run.recent = block(idle=0.3, mismatch=0.001)
    assert choose_staleness(run) == 2  # the learner waits, the samples are close to its policy
    run.state.staleness, run.recent = 2, block(idle=0.01, mismatch=0.001)
    assert choose_staleness(run) == 2  # the learner no longer waits: no reason to go further
    run.recent = block(idle=0.3, mismatch=0.05)
    assert choose_staleness(run) == 1 and run.state.staleness_ceiling == 1
    run.state.staleness, run.recent = 1, block(idle=0.3, mismatch=0.0)
    assert choose_staleness(run) == 1  # k = 2 was too far: not again


def test_a_fixed_staleness_is_what_the_config_says():
    run = auto_run(3)
    run.config.sampler.max_staleness = 2
    run.recent = block(idle=0.9, mismatch=0.5)
    assert choose_staleness(run) == 2
