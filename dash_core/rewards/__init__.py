"""Rewards: the graders (math answers, sandboxed code tests) and `grading`, which sends each completion to its
problem kind's grader."""
