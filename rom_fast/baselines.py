"""Data-free baseline for the paper's comparisons: truncated SVD of each weight.

``W ≈ U_r S_r V_rᵀ`` is the best rank-r fit of ``W`` itself (every input direction weighted
equally), whereas ROM fits ``W X`` on calibration data. Same factor layout, same ranks, so
the two are compared at identical parameter counts.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch
from torch import nn

from rom_fast.lowrank import from_factors, get_module, set_module


@torch.no_grad()
def svd_compress(model: nn.Module, ranks: Dict[str, int]) -> nn.Module:
    """Replaces each linear named in ``ranks`` by its rank-r truncated SVD, in place.

    W1 = U_r S_r (d_out × r), W2 = V_rᵀ (r × d_in), computed in float64; a bias stays on the
    output side unchanged (it is not part of W).
    """
    for name, rank in ranks.items():
        linear = get_module(model, name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is not a dense nn.Linear (already compressed?)")
        if not 1 <= rank <= min(linear.weight.shape):
            raise ValueError(f"rank of {name} must be in [1, {min(linear.weight.shape)}], got {rank}")
        w = linear.weight.detach().double().numpy()
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        b1 = None if linear.bias is None else linear.bias.detach().double().numpy()
        set_module(model, name, from_factors(linear, u[:, :rank] * s[:rank], vt[:rank], b1=b1))
    return model
