"""Small helpers shared by the io boundary, the block loop, the planner and the API.

Imports nothing of rom_fast, so any module may use it.
"""

from __future__ import annotations

import contextlib
import resource
import time
from typing import Dict

import torch
from torch import nn


def release_freed_memory() -> None:
    """Returns freed heap pages to the OS (glibc keeps them otherwise, and the heap of a long
    streamed run then grows block after block through fragmentation). No-op elsewhere."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def float_array(tensor: torch.Tensor):
    """A weight as a float32/float64 numpy array, sharing its memory unless it is stored
    narrower (a streamed routed unit keeps its checkpoint's dtype: then a widened copy)."""
    t = tensor.detach()
    return (t if t.dtype in (torch.float32, torch.float64) else t.float()).numpy()


def peak_rss_bytes() -> int:
    """This process's peak resident memory. On Linux VmHWM, which starts fresh at exec:
    ru_maxrss of a process started by fork + exec also counts the parent's memory at the fork
    (a 1.8 GiB run read 4.3 GiB when launched from a large pytest process)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux/BSD: KiB


class StageTimer:
    """Accumulates wall time per stage name into a dict (``prefix`` + name)."""

    def __init__(self, seconds: Dict[str, float], prefix: str = ""):
        self.seconds, self.prefix = seconds, prefix

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            key = self.prefix + stage
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0


def positive_int(value) -> bool:
    """Whether ``value`` is an int (not a bool) >= 1: a size or rank read from untrusted JSON."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_int(name: str, value, minimum: int) -> int:
    """``value`` itself if it is an int (not a bool) >= ``minimum``; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() is tie-aware
