"""Parked units: the experts of a streamed block, read one at a time and kept narrow.

A routed sublayer holds most of a mixture-of-experts block (Mixtral-8x7B: 1.41 of its 1.45 B
parameters, 5.6 GB in float32), more than the memory bound allows. A streamed source therefore
*parks* each unit of a routed sublayer (:attr:`Sublayer.units`): its weights stay in the
checkpoint until the unit is first needed (:func:`materialize`, or its first forward), then in
the checkpoint's storage dtype; each forward of the unit widens its weights to float32 for
that call only. Compressed layers built inside a parked unit take its storage dtype (the one
they are written in), so a block's finished units cost what its output shard does.

A unit stored in float32 is only loaded lazily: nothing is widened, and the results are those
of a block loaded whole.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Dict, Iterator, List, Tuple

import torch
from torch import nn

from rom_fast.io.safetensors_index import CheckpointError

COMPUTE_DTYPE = torch.float32

# {parked unit module: the function giving its stored tensors by relative name}
_LOADERS: "weakref.WeakKeyDictionary[nn.Module, Callable[[], Dict[str, torch.Tensor]]]" = \
    weakref.WeakKeyDictionary()


def park(module: nn.Module, load: Callable[[], Dict[str, torch.Tensor]]) -> list:
    """Parks ``module`` (its parameters on the meta device until needed): ``load()`` gives its
    stored tensors (names relative to the module, storage dtype). Returns the hook handles
    (:func:`unpark` removes them)."""
    _LOADERS[module] = load
    stash: List[List[Tuple[nn.Module, str, nn.Parameter]]] = []

    def widen(mod, _args):
        _load_into(mod, load)
        stash.append(_converted(mod, COMPUTE_DTYPE))

    def narrow(_mod, _args, _out):
        if stash:
            _restore(stash.pop())
    # Closures, not bound methods: a deep copy of the block (a dense view) shares them and
    # loads its own copy of the weights into its own modules.
    return [module.register_forward_pre_hook(widen), module.register_forward_hook(narrow, always_call=True)]


def unpark(module: nn.Module, handles: list) -> None:
    for h in handles:
        h.remove()
    _LOADERS.pop(module, None)


def materialize(module: nn.Module) -> None:
    """Reads a parked unit's weights (in their storage dtype) if it is still on the meta
    device; a module that is not parked is left as it is."""
    load = _LOADERS.get(module)
    if load is not None:
        _load_into(module, load)


@contextlib.contextmanager
def widened(module: nn.Module) -> Iterator[None]:
    """Inside, a parked module's weights are float32 (one conversion for many forwards; its
    own forwards then convert nothing); a module that is not parked is left as it is."""
    load = _LOADERS.get(module)
    if load is None:
        yield
        return
    _load_into(module, load)
    replaced = _converted(module, COMPUTE_DTYPE)
    try:
        yield
    finally:
        _restore(replaced)


def settle(module: nn.Module, handles: list, dtype: torch.dtype = COMPUTE_DTYPE) -> None:
    """Unparks ``module`` for good: its weights read, converted to ``dtype``, its hooks removed."""
    materialize(module)
    unpark(module, handles)
    _converted(module, dtype)


def _load_into(module: nn.Module, load: Callable[[], Dict[str, torch.Tensor]]) -> None:
    if not any(p.device.type == "meta" for p in module.parameters()):
        return
    with torch.inference_mode(False):      # ordinary parameters, as a whole loaded block's
        state = load()
        missing = [n for n, _ in module.named_parameters() if n not in state]
        if missing:
            raise CheckpointError(f"the checkpoint lacks {missing[0]} of a routed unit (and {len(missing) - 1} more)")
        module.load_state_dict(state, strict=False, assign=True)


def _restore(replaced: List[Tuple[nn.Module, str, nn.Parameter]]) -> None:
    for parent, leaf, stored in replaced:
        parent._parameters[leaf] = stored


def _converted(module: nn.Module, dtype: torch.dtype) -> List[Tuple[nn.Module, str, nn.Parameter]]:
    """Replaces every parameter of ``module`` not in ``dtype`` by a converted copy; returns
    ``(parent, name, original)`` of each replaced one."""
    replaced = []
    with torch.inference_mode(False), torch.no_grad():
        for parent in module.modules():
            for leaf, p in list(parent._parameters.items()):
                if p is not None and p.dtype != dtype:
                    parent._parameters[leaf] = nn.Parameter(p.to(dtype), requires_grad=p.requires_grad)
                    replaced.append((parent, leaf, p))
    return replaced


__all__ = ["park", "unpark", "materialize", "widened", "settle"]
