"""Qwen3's per-head q/k norms: a factorized q_proj or k_proj keeps its whole output width,
because the norms act on each head of that output (tests/test_families.py has the guarantees
every family gets)."""

from __future__ import annotations

import copy

import torch

import rom_fast
from rom_fast.lowrank import LowRankLinear

from families import CASES, tiny_model
from reference_rom import reference_compress
from test_families import calibration, probe

RANK = 6


def test_factorized_q_and_k_keep_every_heads_output_for_their_norms():
    """q_proj and k_proj at rank 6 (of 64 and 32 outputs) become W1 W2 with their whole output
    width heads x head_dim (head_dim 16, not hidden / heads = 12); q_norm and k_norm stay as they
    were and normalise, head by head, the full output the factors reproduce; the logits are the
    float64 reference's, which applies the norms to its own full-width factors."""
    case, model = CASES["qwen3"], tiny_model("qwen3")
    cfg = model.config
    assert cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads
    calib = calibration()
    ranks = {f"model.layers.{i}.self_attn.{p}": RANK for i in range(cfg.num_hidden_layers)
             for p in ("q_proj", "k_proj")}
    ours = rom_fast.compress(copy.deepcopy(model), calibration=calib, ranks=ranks, progress=False).model
    ref, _ = reference_compress(copy.deepcopy(model), calib["input_ids"], calib["attention_mask"], ranks,
                                stages=case.stages)
    widths = {"q": cfg.num_attention_heads * cfg.head_dim, "k": cfg.num_key_value_heads * cfg.head_dim}
    for i in range(cfg.num_hidden_layers):
        attn, dense = ours.model.layers[i].self_attn, model.model.layers[i].self_attn
        for p, width in widths.items():
            proj, norm = attn.get_submodule(f"{p}_proj"), attn.get_submodule(f"{p}_norm")
            assert isinstance(proj, LowRankLinear) and proj.rank == RANK
            assert proj.out_features == proj.expand.out_features == width
            assert type(norm) is type(dense.get_submodule(f"{p}_norm"))
            assert torch.equal(norm.weight, dense.get_submodule(f"{p}_norm").weight)
    seen = {}
    attn = ours.model.layers[1].self_attn
    hooks = [attn.q_proj.register_forward_hook(lambda _m, _a, out: seen.__setitem__("q_proj", out)),
             attn.q_norm.register_forward_pre_hook(lambda _m, a: seen.__setitem__("q_norm", a[0]))]
    with torch.no_grad():
        a, b = ours(probe()).logits.double(), ref(probe()).logits.double()
    for h in hooks:
        h.remove()
    # q_norm reads the factors' output, split into its heads, all of it.
    assert torch.equal(seen["q_norm"], seen["q_proj"].view(*seen["q_proj"].shape[:-1], -1, cfg.head_dim))
    assert seen["q_norm"].shape[-2:] == (cfg.num_attention_heads, cfg.head_dim)
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
