"""pytest-benchmark view of Gram accumulation (run: pytest bench/test_bench_gram.py).

Compare within one run's table: the groups put rom_fast, numpy and torch side by side.
"""

import numpy as np
import pytest
import torch

import rom_fast

TOKENS = 16384


@pytest.fixture(scope="module", params=[576, 1536, 4096])
def x(request):
    return np.random.default_rng(0).standard_normal((TOKENS, request.param))


def test_rom_fast(benchmark, x):
    benchmark.group = f"gram d={x.shape[1]}"

    def run():
        acc = rom_fast.GramAccumulator(x.shape[1])
        acc.update(x)

    benchmark(run)


def test_numpy(benchmark, x):
    benchmark.group = f"gram d={x.shape[1]}"
    benchmark(lambda: x.T @ x)


def test_torch(benchmark, x):
    benchmark.group = f"gram d={x.shape[1]}"
    xt = torch.from_numpy(x)
    benchmark(lambda: xt.T @ xt)
