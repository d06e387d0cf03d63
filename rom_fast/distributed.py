"""Data-parallel compression on torch.distributed: one process per shard of calibration sequences.

Blocks run one after the other (the error-aware order), but inside a block the calibration
sequences are independent and every statistic is a sum over tokens. Each process therefore
runs the blocks on its own shard of sequences (whole micro-batches, dealt round robin, so each
micro-batch is the one a single process would run) and the sums are all-reduced in float64
before they are used:

- each Gram, with its column sum and token count, when it is first read: just before its
  input factor or eigensolve (:class:`ReducedGramAccumulator`); the planner's too;
- the planner's squared output gradients and token counts; the perplexity's NLL sums.

Every process then solves the same reduced eigenproblems (no process idles while another
solves, and nothing but the statistics is sent before a solve); process 0's factors are
broadcast and written over the others' in place, so every process carries, bit for bit, the
factors process 0 writes, even across machines whose BLAS rounds differently. The plan is
broadcast the same way. Only process 0 writes the output; each process keeps its shard's
hidden states in the resume state (:mod:`rom_fast.io.output`).

Launch with ``torchrun --nproc-per-node N -m rom_fast compress ...`` (or any launcher that sets
the torch.distributed environment); :func:`communicator` joins the group. Backend: gloo (the
arithmetic runs on the CPU). A failed process ends the job: torchrun stops the others, and
every collective carries the group's timeout (``ROM_FAST_DIST_TIMEOUT`` seconds, default
1800; it must exceed the longest stretch one process can run alone, e.g. a slow rank's
forward), so no process waits forever.
"""

from __future__ import annotations

import datetime
import os
import pickle
import re
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from rom_fast import kernels

DEFAULT_TIMEOUT_S = 1800
_joined: List[bool] = []     # set when communicator() initialised the group (shutdown() leaves it)
_BLOCK_PREFIX = re.compile(r"\S*?layers\.\d+\.")


def _kind(label: str) -> str:
    """A statistics label without its block, so traffic is summed per stage over blocks."""
    return _BLOCK_PREFIX.sub("", label) or "statistics"


class Communicator:
    """One process: the shard is every sequence and every reduction is the identity.

    ``traffic`` records, per kind of exchange, ``{"bytes", "seconds", "calls"}`` (seconds
    include waiting for the slowest process).
    """

    size = 1
    rank = 0

    def __init__(self):
        self.traffic: Dict[str, Dict[str, float]] = {}

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # -- sharding -----------------------------------------------------------------------------
    def shard_rows(self, n: int, batch_size: int) -> torch.Tensor:
        """This process's rows of ``n`` sequences: micro-batches j with j % size == rank, in
        order (the last, possibly short, micro-batch is the one one process would run)."""
        n_batches = -(-n // batch_size)
        if n_batches < self.size:
            raise ValueError(f"{n} calibration sequences make {n_batches} micro-batches of {batch_size}, "
                             f"too few for {self.size} processes (each needs one): lower --batch-size, "
                             "raise the sample counts or use fewer processes")
        rows = torch.arange(n)
        return rows if self.size == 1 else torch.cat(list(rows.split(batch_size)[self.rank::self.size]))

    def shard(self, batch_size: int, *tensors: torch.Tensor):
        """The rows of each tensor (same first dimension) that belong to this process."""
        if self.size == 1:
            return tensors
        rows = self.shard_rows(tensors[0].shape[0], batch_size)
        return tuple(t[rows] for t in tensors)

    def shard_list(self, items: list) -> list:
        return items[self.rank::self.size]

    # -- reductions ---------------------------------------------------------------------------
    def gram_accumulator(self, dim: int, label: str = "", **options) -> kernels.GramAccumulator:
        """The accumulator a statistics stage fills (``options``: GramAccumulator's, e.g.
        precision): its Gram, column sum and count are the sums over every process's tokens
        when read."""
        return kernels.GramAccumulator(dim, label, **options)

    def cross_accumulator(self, dim_dense: int, dim_comp: int, label: str = "") -> kernels.CrossGramAccumulator:
        """The dense-anchored cross moment of a stage, summed over every process's tokens when read."""
        return kernels.CrossGramAccumulator(dim_dense, dim_comp, label)

    def all_reduce(self, array: np.ndarray, kind: str) -> np.ndarray:
        """Sums a float64 array over the processes, in place; returns it."""
        return array

    def all_reduce_scalar(self, value: float, kind: str) -> float:
        return float(self.all_reduce(np.array([value], dtype=np.float64), kind)[0])

    def broadcast(self, obj, kind: str):
        """Process 0's ``obj`` (a small picklable object) on every process."""
        return obj

    def broadcast_arrays(self, arrays: List[np.ndarray], kind: str) -> None:
        """Overwrites each array (same shapes and dtypes everywhere) with process 0's, in place."""

    def from_root(self, fn, kind: str):
        """``fn()`` run by process 0 only, its result on every process; an exception on 0 is
        raised on every process (the others would otherwise wait for a result)."""
        return fn()

    def barrier(self, kind: str = "barrier") -> None:
        pass

    def check_all(self, ok: bool, message: str) -> None:
        """Raises ValueError(message) on every process when it is not ``ok`` on any one."""
        if not ok:
            raise ValueError(message)

    def _record(self, kind: str, nbytes: int, seconds: float) -> None:
        t = self.traffic.setdefault(kind, {"bytes": 0, "seconds": 0.0, "calls": 0})
        t["bytes"] += int(nbytes)
        t["seconds"] += seconds
        t["calls"] += 1


class ProcessGroupCommunicator(Communicator):
    """The default torch.distributed process group (gloo; NCCL stages CPU data through the
    rank's GPU)."""

    def __init__(self):
        super().__init__()
        import torch.distributed as dist
        self._dist = dist
        self.size = dist.get_world_size()
        self.rank = dist.get_rank()
        self._device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")

    def _run(self, kind: str, nbytes: int, op):
        t0 = time.perf_counter()
        try:
            result = op()
        except RuntimeError as exc:     # gloo/NCCL errors (DistBackendError is a RuntimeError)
            raise RuntimeError(f"process {self.rank} of {self.size}: {kind}: the exchange failed (another "
                               f"process failed, or the group timed out): {' '.join(str(exc).split())[:300]}") \
                from None
        self._record(kind, nbytes, time.perf_counter() - t0)
        return result

    def _collective(self, tensor: torch.Tensor, kind: str, op) -> None:
        staged = tensor.to(self._device) if self._device.type != "cpu" else tensor
        self._run(kind, tensor.numel() * tensor.element_size(), lambda: op(staged))
        if staged is not tensor:
            tensor.copy_(staged.cpu())

    def gram_accumulator(self, dim: int, label: str = "", **options) -> kernels.GramAccumulator:
        return ReducedGramAccumulator(dim, label, self, **options)

    def cross_accumulator(self, dim_dense: int, dim_comp: int, label: str = "") -> kernels.CrossGramAccumulator:
        return ReducedCrossGramAccumulator(dim_dense, dim_comp, label, self)

    def all_reduce(self, array: np.ndarray, kind: str) -> np.ndarray:
        if array.dtype != np.float64 or not array.flags.c_contiguous:
            raise TypeError("all_reduce needs a C-contiguous float64 array")
        self._collective(torch.from_numpy(array), kind, self._dist.all_reduce)
        return array

    def broadcast(self, obj, kind: str):
        box = [obj if self.is_root else None]
        nbytes = len(pickle.dumps(obj)) if self.is_root else 0
        self._run(kind, nbytes, lambda: self._dist.broadcast_object_list(box, src=0, device=self._device))
        return box[0]

    def broadcast_arrays(self, arrays: List[np.ndarray], kind: str) -> None:
        for a in arrays:
            if not a.flags.c_contiguous or not a.flags.writeable:
                raise TypeError("broadcast_arrays needs writeable C-contiguous arrays")
            self._collective(torch.from_numpy(a), kind, lambda t: self._dist.broadcast(t, src=0))

    def from_root(self, fn, kind: str):
        result, error = None, None
        if self.is_root:
            try:
                result = fn()
            except Exception as exc:   # sent to the others, then raised here as it was
                error = exc
        outcome = self.broadcast(("error", f"{type(error).__name__}: {error}") if error is not None
                                 else ("ok", result), kind)
        if error is not None:
            raise error
        if outcome[0] == "error":
            raise RuntimeError(f"process 0 failed: {outcome[1]}")
        return outcome[1]

    def barrier(self, kind: str = "barrier") -> None:
        self._run(kind, 0, self._dist.barrier)

    def check_all(self, ok: bool, message: str) -> None:
        flags = np.zeros(self.size, dtype=np.float64)
        flags[self.rank] = 0.0 if ok else 1.0
        self.all_reduce(flags, "checks")
        failed = [r for r in range(self.size) if flags[r]]
        if failed:
            raise ValueError(f"{message} (on process{'es' if len(failed) > 1 else ''} "
                             f"{', '.join(map(str, failed))} of {self.size})")


class _ReducedOnRead:
    """What the reduced accumulators share: the first read all-reduces the local sums (a matrix,
    then a vector with the count appended: two exchanges) and keeps them; updating after that,
    or merging, is refused. Every process must read its accumulators in the same order (they
    run the same code)."""

    _comm: Communicator
    _reduced: Optional[tuple] = None

    def _check_open(self) -> None:
        if self._reduced is not None:
            raise RuntimeError(f"{self.label}: updated after its statistics were all-reduced")

    def merge(self, other) -> None:
        raise NotImplementedError("a reduced accumulator holds every process's sums already")

    def _reduce(self, matrix: np.ndarray, vector: np.ndarray, count: int, kind: str) -> tuple:
        matrix = self._comm.all_reduce(matrix, kind)
        tail = self._comm.all_reduce(np.append(vector, float(count)), kind)
        return matrix, tail[:-1].copy(), int(round(tail[-1]))


class ReducedGramAccumulator(_ReducedOnRead, kernels.GramAccumulator):
    """A GramAccumulator whose ``gram``, ``column_sum`` and ``count`` are the sums over every
    process: the first read all-reduces them (float64, one exchange for the Gram and one for
    the column sum and count) and keeps the result; updating after that is refused. Every
    process must read its accumulators in the same order (they run the same code)."""

    def __init__(self, dim: int, label: str, comm: Communicator, **options):
        super().__init__(dim, label, **options)
        self._comm = comm

    def update(self, x) -> None:
        self._check_open()
        super().update(x)

    def _state(self) -> tuple:
        if self._reduced is None:
            # take_gram: the local sums go into the exchange without a copy, and are not needed
            # after it (the accumulator is spent, so a late update is refused by the core too).
            self._reduced = self._reduce(super().take_gram(), super().column_sum, super().count,
                                         _kind(self.label))
        return self._reduced

    @property
    def gram(self) -> np.ndarray:
        """The reduced Gram (shared, not a copy: a d x d float64 matrix is big)."""
        gram = self._state()[0]
        if gram is None:
            raise RuntimeError(f"{self.label}: its reduced Gram was handed over by take_gram()")
        return gram

    def take_gram(self) -> np.ndarray:
        """The reduced Gram, handed over: this accumulator drops its reference (``gram`` then
        raises), so the caller may overwrite it and holds the only copy."""
        gram = self.gram
        _, colsum, count = self._reduced
        self._reduced = (None, colsum, count)
        return gram

    @property
    def column_sum(self) -> np.ndarray:
        return self._state()[1]

    @property
    def count(self) -> int:
        return self._state()[2]

    def centered_gram(self) -> np.ndarray:
        _, colsum, count = self._state()
        return self.gram - np.outer(colsum, colsum) / max(count, 1)


class ReducedCrossGramAccumulator(_ReducedOnRead, kernels.CrossGramAccumulator):
    """A CrossGramAccumulator whose ``cross``, ``dense_column_sum`` and ``count`` are sums over
    every process, all-reduced on first read like :class:`ReducedGramAccumulator`."""

    def __init__(self, dim_dense: int, dim_comp: int, label: str, comm: Communicator):
        super().__init__(dim_dense, dim_comp, label)
        self._comm = comm

    def update(self, x_dense, x_comp) -> None:
        self._check_open()
        super().update(x_dense, x_comp)

    def _state(self) -> tuple:
        if self._reduced is None:
            self._reduced = self._reduce(super().cross, super().dense_column_sum, super().count,
                                         _kind(self.label) + " (anchor)")
        return self._reduced

    @property
    def cross(self) -> np.ndarray:
        return self._state()[0]

    @property
    def dense_column_sum(self) -> np.ndarray:
        return self._state()[1]

    @property
    def count(self) -> int:
        return self._state()[2]


def _timeout_s() -> float:
    raw = os.environ.get("ROM_FAST_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"ROM_FAST_DIST_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return value


def communicator() -> Communicator:
    """The process group this process belongs to: one already initialised by the caller, or
    the one torchrun's environment describes (joined here, gloo), else a single process."""
    import torch.distributed as dist
    if not dist.is_available():
        return Communicator()
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Communicator()
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=_timeout_s()))
        _joined.append(True)
    return ProcessGroupCommunicator() if dist.get_world_size() > 1 else Communicator()


def shutdown() -> None:
    """Leaves the process group :func:`communicator` joined (one a caller set up is theirs)."""
    import torch.distributed as dist
    if _joined and dist.is_initialized():
        dist.destroy_process_group()
    _joined.clear()


def traffic_summary(comm: Communicator) -> dict:
    """What the summary records of a run's exchanges (nothing for one process)."""
    if comm.size == 1:
        return {}
    return {"processes": comm.size,
            "traffic": {k: dict(v, seconds=round(v["seconds"], 4)) for k, v in sorted(comm.traffic.items())}}
