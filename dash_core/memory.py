"""Peak memory of a block of work: what auto-sizing and the learner benchmark measure."""

from __future__ import annotations

import threading
from typing import Any

import psutil
import torch


class PeakMemory:
    """The most memory the process holds above its size when the block starts: the allocator's peak on CUDA, the
    resident size sampled every 5 ms on CPU (torch's CPU allocations are invisible to Python's tracers)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            process = psutil.Process()
            self.start = process.memory_info().rss

            def watch() -> None:
                while not self._stop.wait(0.005):
                    self.peak = max(self.peak, process.memory_info().rss - self.start)

            self._thread = threading.Thread(target=watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self._stop.set()
            self._thread.join()


def available_bytes(device: torch.device | str) -> int:
    """Memory a new allocation can still get: free device memory on CUDA, available RAM on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available
