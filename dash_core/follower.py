"""A follower learner (rank > 0 of a `Team`): it builds the leader's policy and learner, then makes each learner
call the leader tells it, until told to stop. It never samples, tracks or checkpoints; the leader does."""

from __future__ import annotations

import logging
import os
import signal

from dash_core.config import DashConfig
from dash_core.learner import Learner, NonFiniteLossError
from dash_core.models import load_policy
from dash_core.serving import die_with_parent
from dash_core.team import Team

log = logging.getLogger(__name__)


def start(team: Team, config: DashConfig) -> None:
    """The leader, before it builds its learner: the followers build theirs from the same config."""
    team.tell("start", config.model_dump())


def follow(team: Team) -> None:
    """The follower's whole life: build, then mirror the leader's learner calls. A terminal's Ctrl-C is the
    leader's to handle: it keeps what is learned, then tells the followers to stop."""
    if "DASH_LEADER_PID" in os.environ and not die_with_parent(int(os.environ["DASH_LEADER_PID"])):
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    command, (fields,) = team.hear()
    assert command == "start", command
    config = DashConfig.model_validate(fields)
    policy, tokenizer = load_policy(config.model, config.seed)
    learner = Learner(policy, config.learner, config.algo, tokenizer.pad_token_id, team=team)
    while (message := team.hear())[0] != "stop":
        command, args = message
        try:
            getattr(learner, command)(*args)
        except NonFiniteLossError:  # every process sees the same loss: the leader reports it and ends the run
            log.debug("rank %d: the step was not taken", team.rank)
    del learner, policy
    team.disband()
