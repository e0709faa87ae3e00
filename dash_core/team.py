"""The processes of a run (SPMD): every one runs the same loop (`dash_core.loop`) on its share of the work, and
they coordinate only through torch.distributed collectives.

Each process samples, grades and evaluates its contiguous share of the prompt groups (`groups`), writes its part of
each batch to the rollout store, and learns from its share of the batch's kept rows, balanced by tokens (`share`).
Gradients are summed across processes before the one optimizer step, so every process takes the step one process
would take: DDP (the default) keeps the whole model in every process; FSDP2 (`learner.data_parallel: fsdp`) keeps
1/N of the weights, gradients and Adam's state in each, and gathers the whole weights into every process's sampler.
What only one process may do (MLflow, Prefect, checkpoints, the clock) the first one (rank 0) does, and it tells
the others what they must agree on (`agree`).

`dashrl train --learners N` starts N-1 more processes on this machine (`Followers`); torchrun starts the same code
across machines, which finds its rank in the environment. CPU tensors go over gloo, CUDA tensors over NCCL; small
Python values have gloo groups of their own with a long timeout (one for the loop, one for the thread that samples
ahead), since a process may wait on them while the first one evaluates or checkpoints. A run of one process is a
team of one, whose collectives return at once.
"""

from __future__ import annotations

import functools
import gc
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from dash_core.serving import stop_process, unused_port

WAIT = timedelta(days=1)  # how long a process waits for the others at a loop collective
T = TypeVar("T")


@dataclass(frozen=True)
class Team:
    rank: int
    size: int
    local_rank: int
    loop: dist.ProcessGroup | None = None  # the loop's small values (gloo)
    ahead: dist.ProcessGroup | None = None  # the sampling thread's small values (gloo), when rollouts run ahead

    @property
    def leads(self) -> bool:
        return self.rank == 0

    def groups(self, count: int) -> range:
        """This process's contiguous share of `count` prompt groups (advantages need whole groups); in rank order,
        the shares are the groups in order."""
        return range(count * self.rank // self.size, count * (self.rank + 1) // self.size)

    def agree(self, value: T) -> T:
        """The first process's `value`, in every process (the others pass anything, e.g. None)."""
        if self.size == 1:
            return value
        message = [value]
        dist.broadcast_object_list(message, src=0, group=self.loop)
        return message[0]

    def gather(self, value: T, ahead: bool = False) -> list[T]:
        """Every process's `value`, in rank order; `ahead`: called from the thread that samples ahead."""
        if self.size == 1:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value, group=self.ahead if ahead else self.loop)
        return values

    def total(self, sums: list[float], maxima: list[float]) -> tuple[list[float], list[float]]:
        """Sums and maxima over all processes."""
        if self.size == 1:
            return sums, maxima
        added, top = torch.tensor(sums, dtype=torch.float64), torch.tensor(maxima, dtype=torch.float64)
        dist.all_reduce(added, group=self.loop)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.loop)
        return added.tolist(), top.tolist()

    def disband(self) -> None:
        """Every process, at the end, once its learner is gone: after the last message is through, the groups
        close, and what holds them is freed now; freed at interpreter exit, a group's threads can abort it."""
        if self.size == 1:
            return
        dist.barrier(group=self.loop)
        dist.destroy_process_group()
        team.cache_clear()
        gc.collect()

    def align(self, module: torch.nn.Module) -> None:
        """Every process takes the first one's weights and buffers."""
        if self.size > 1:
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def share(self, rows: dict[str, list]) -> dict[str, list]:
        """This process's share of `rows` to learn from: longest first, each to the process with the fewest tokens
        so far, so the shares take about the same compute. Every process computes the same split."""
        if self.size == 1:
            return rows
        lengths = [len(p) + len(c) for p, c in zip(rows["prompt_ids"], rows["completion_ids"], strict=True)]
        load, mine = [0] * self.size, []
        for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
            rank = min(range(self.size), key=lambda r: (load[r], r))
            load[rank] += lengths[i]
            if rank == self.rank:
                mine.append(i)
        mine.sort()
        return {key: [values[i] for i in mine] for key, values in rows.items()}

    def data_parallel(self, module: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
        """DDP: `module` whole in every process, its gradients averaged over the processes in the backward pass
        (weights: the first process's)."""
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)

    def shard(self, module: torch.nn.Module, units: list[torch.nn.Module]) -> None:
        """FSDP2: each of `units` (decoder layers), then the rest of `module`, split across the processes, each
        holding 1/N of the weights, gradients and optimizer state, gathering a unit's weights only while it
        computes; gradients averaged as with DDP."""
        for unit in units:
            fully_shard(unit)
        fully_shard(module)

    def load_full(self, module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """A sharded `module` takes the first process's full `weights` (the others pass {})."""
        set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def gather_weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """A sharded `module`'s full weights, in every process (each samples from a whole copy)."""
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))


SOLO = Team(rank=0, size=1, local_rank=0)


@contextmanager
def summing_gradients(module: torch.nn.Module, now: bool) -> Iterator[None]:
    """Gradients are summed across processes in a backward pass only `now` (a step's last micro-batch): the
    others accumulate locally."""
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(now)
    with module.no_sync() if isinstance(module, DistributedDataParallel) and not now else nullcontext():
        yield


@functools.cache
def team() -> Team:
    """This process's team: several processes when WORLD_SIZE > 1 (set by torchrun or `Followers`), else SOLO."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return SOLO
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:  # the cores are shared by the processes on this machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", size))))
        dist.init_process_group("gloo")
    groups = [dist.new_group(backend="gloo", timeout=WAIT) for _ in range(2)]
    return Team(dist.get_rank(), size, local_rank, *groups)


def local_device(device: torch.device) -> torch.device:
    """Each process on a machine takes its own GPU."""
    if device.type == "cuda" and device.index is None and (member := team()).size > 1:
        return torch.device("cuda", member.local_rank)
    return device


class Followers:
    """The other processes of `dashrl train --learners N` on this machine: the same command line at ranks
    1..N-1, bound to the first process's life. One that dies fails the others' next collective."""

    def __init__(self, learners: int):
        shared = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(unused_port()), "WORLD_SIZE": str(learners),
                  "LOCAL_WORLD_SIZE": str(learners), "DASH_LEADER_PID": str(os.getpid())}  # fmt: skip
        os.environ.update(shared | {"RANK": "0", "LOCAL_RANK": "0"})
        command = [sys.executable, "-m", "flows.cli", *sys.argv[1:]]
        self.processes = {
            rank: subprocess.Popen(command, env=os.environ | {"RANK": str(rank), "LOCAL_RANK": str(rank)})
            for rank in range(1, learners)
        }

    def lost(self, wait_s: float = 2) -> str | None:
        """After the first process failed: which other one had stopped, and how (its own output says why)."""
        for rank, process in self.processes.items():
            try:
                code = process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            return f"process {rank} (pid {process.pid}) stopped ({how})"
        return None

    def close(self, finished: bool) -> None:
        """The others end: after a finished run they finish the loop themselves; after a failure, which may have
        left them inside a collective the first process never joins, they are terminated (they hold nothing to
        save: checkpoints are the first process's)."""
        for process in self.processes.values():
            try:
                process.wait(timeout=60 if finished else 0)
            except subprocess.TimeoutExpired:
                stop_process(process)
