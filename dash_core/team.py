"""Data-parallel learners: N processes learn each batch together; the first (rank 0, the leader) also runs the flow
(sampling, rewards, the rollout store, tracking, checkpoints, the samplers' weights).

The others (followers, `dash_core.follower`) only learn. The leader tells them each learner call that changes
weights (`tell`); they make the same call, and every process learns from its share of the step's kept rows, read
from the rollout store and balanced by tokens (`share`). The gradients are summed across processes before the one
optimizer step, so every process takes the same step: DDP (the default) keeps the whole model in every process;
FSDP2 (`learner.data_parallel: fsdp`) keeps 1/N of the weights, gradients and Adam's state in each, for a model
whose training state does not fit one device. Either way the weights are those one process would hold, up to the
order of float additions.

`dashrl train --learners N` starts N-1 followers on this machine (`Followers`); torchrun starts the same code
across machines, which finds its rank in the environment. CPU tensors go over gloo, CUDA tensors over NCCL; the
commands have a gloo group of their own with a long timeout, since followers wait on them while the leader samples
and evaluates.
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
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from dash_core.serving import stop_process, unused_port

COMMAND_TIMEOUT = timedelta(days=1)  # a follower waits this long for the leader's next command


@dataclass
class Team:
    rank: int
    size: int
    local_rank: int
    commands: dist.ProcessGroup

    @property
    def leads(self) -> bool:
        return self.rank == 0

    def tell(self, command: str, *args: Any) -> None:
        """The leader: every follower makes this call (a `Learner` method name) with these arguments."""
        dist.broadcast_object_list([command, args], src=0, group=self.commands)

    def hear(self) -> tuple[str, tuple]:
        """A follower: the leader's next command."""
        message: list[Any] = [None, None]
        dist.broadcast_object_list(message, src=0, group=self.commands)
        return message[0], message[1]

    def disband(self) -> None:
        """Every process, at the end, once its learner is gone: after the last message is through, the groups
        close, and what holds them is freed now; freed at interpreter exit, a group's threads can abort it."""
        dist.barrier(group=self.commands)
        dist.destroy_process_group()
        team.cache_clear()
        gc.collect()

    def align(self, module: torch.nn.Module) -> None:
        """Every process takes the leader's weights and buffers."""
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)

    def share(self, rows: dict[str, list]) -> dict[str, list]:
        """This process's share of `rows`: longest first, each to the process with the fewest tokens so far, so
        the shares take about the same compute. Every process computes the same split."""
        lengths = [len(p) + len(c) for p, c in zip(rows["prompt_ids"], rows["completion_ids"], strict=True)]
        load, mine = [0] * self.size, []
        for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
            rank = min(range(self.size), key=lambda r: (load[r], r))
            load[rank] += lengths[i]
            if rank == self.rank:
                mine.append(i)
        mine.sort()
        return {key: [values[i] for i in mine] for key, values in rows.items()}

    def total(self, sums: list[float], maxima: list[float]) -> tuple[list[float], list[float]]:
        """Sums and maxima over all processes."""
        added, top = torch.tensor(sums, dtype=torch.float64), torch.tensor(maxima, dtype=torch.float64)
        dist.all_reduce(added, group=self.commands)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.commands)
        return added.tolist(), top.tolist()

    def data_parallel(self, module: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
        """DDP: `module` whole in every process, its gradients averaged over the processes in the backward pass
        (weights: the leader's)."""
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)

    def shard(self, module: torch.nn.Module, units: list[torch.nn.Module]) -> None:
        """FSDP2: each of `units` (decoder layers), then the rest of `module`, split across the processes, each
        holding 1/N of the weights, gradients and optimizer state, gathering a unit's weights only while it
        computes; gradients averaged as with DDP."""
        for unit in units:
            fully_shard(unit)
        fully_shard(module)

    def load_full(self, module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """A sharded `module` takes the leader's full `weights` (followers pass {})."""
        set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def gather(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """A sharded `module`'s full weights, on the leader's CPU ({} elsewhere)."""
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextmanager
def summing_gradients(module: torch.nn.Module, now: bool) -> Iterator[None]:
    """Gradients are summed across processes in a backward pass only `now` (a step's last micro-batch): the
    others accumulate locally."""
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(now)
    with module.no_sync() if isinstance(module, DistributedDataParallel) and not now else nullcontext():
        yield


@functools.cache
def team() -> Team | None:
    """This process's team when it is one of several learners (WORLD_SIZE > 1, set by torchrun or `Followers`)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:  # the cores are shared by the processes on this machine
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", size))))
        dist.init_process_group("gloo")
    return Team(dist.get_rank(), size, local_rank, dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT))


def local_device(device: torch.device) -> torch.device:
    """Each learner process on a machine takes its own GPU."""
    if device.type == "cuda" and device.index is None and (member := team()):
        return torch.device("cuda", member.local_rank)
    return device


class Followers:
    """The follower processes of `dashrl train --learners N` on this machine: the same command line at ranks
    1..N-1, bound to the leader's life. A follower that dies fails the leader's next command or gradient sum."""

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
        """After the leader failed: which follower had stopped, and how (its own output says why)."""
        for rank, process in self.processes.items():
            try:
                code = process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            return f"learner process {rank} (pid {process.pid}) stopped ({how})"
        return None

    def close(self, finished: bool) -> None:
        """The followers end: told to stop after a finished run; after a failure, which may have left them inside
        a collective the leader never joined, terminated (they hold nothing to save)."""
        if finished:
            dismiss()
        for process in self.processes.values():
            try:
                process.wait(timeout=10 if finished else 0)
            except subprocess.TimeoutExpired:
                stop_process(process)


def dismiss() -> None:
    """The leader, at the end of a finished run: the followers stop."""
    if dist.is_initialized() and dist.get_rank() == 0 and (member := team()):
        member.tell("stop")
        member.disband()
