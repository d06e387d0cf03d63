"""pytest-benchmark view of Gram accumulation (run: pytest bench/test_bench_gram.py).

Compare within one run's table: the groups put rom_fast (float32 activations in the
pipeline's 1024-row chunks, both precisions), numpy and torch side by side.
"""

import numpy as np
import pytest
import torch

import rom_fast

TOKENS, CHUNK = 16384, 1024


@pytest.fixture(scope="module", params=[576, 1536, 4096])
def x(request):
    return np.random.default_rng(0).standard_normal((TOKENS, request.param), dtype=np.float32)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_rom_fast(benchmark, x, precision):
    benchmark.group = f"gram d={x.shape[1]}"

    def run():
        acc = rom_fast.GramAccumulator(x.shape[1], precision=precision)
        for s in range(0, TOKENS, CHUNK):
            acc.update(x[s:s + CHUNK])

    benchmark(run)


def test_numpy_float32(benchmark, x):
    benchmark.group = f"gram d={x.shape[1]}"
    benchmark(lambda: x.T @ x)


def test_numpy_float64(benchmark, x):
    benchmark.group = f"gram d={x.shape[1]}"
    x64 = x.astype(np.float64)
    benchmark(lambda: x64.T @ x64)


def test_torch_float32(benchmark, x):
    benchmark.group = f"gram d={x.shape[1]}"
    xt = torch.from_numpy(x)
    benchmark(lambda: xt.T @ xt)
