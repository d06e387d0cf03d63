"""Zero-copy views of numpy arrays and torch CPU tensors for the native core.

The core refuses wrong dtypes, ranks and non-contiguous memory itself; this module only
turns tensors into numpy views (no copy) and refuses what cannot be viewed.
"""

from __future__ import annotations

import numpy as np

_ACCEPTED = ("float32", "float64")


def as_array(x, name: str):
    """Returns `x` as a numpy array sharing its memory; numpy arrays pass through."""
    if isinstance(x, np.ndarray):
        return x
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise TypeError(f"{name} must be on the CPU, got a tensor on {x.device}")
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"{name} must have dtype float32 or float64, got {x.dtype} (convert it explicitly)"
            )
        return x.detach().resolve_neg().numpy()   # a negative-bit view has no numpy view: copied
    raise TypeError(f"{name} must be a numpy array or torch CPU tensor, got {type(x).__name__}")


def as_optional(x, name: str):
    return None if x is None else as_array(x, name)


__all__ = ["as_array", "as_optional"]
