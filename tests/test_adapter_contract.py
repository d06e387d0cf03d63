"""One contract, every adapter: what the loop and the planner rely on when they reach a block's
layers through the adapter's named roles instead of module names.

A new model family passes this file before anything else: add its tiny config to
tests/families.py.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

from rom_fast.adapters import ADAPTERS, ModelAdapter, adapter_class, adapter_for
from rom_fast.blockwise import capture_block_inputs
from rom_fast.io.sources import ModelSource

from families import CASES, TINY, tiny_model


def test_every_registered_adapter_has_a_contract_case():
    assert set(ADAPTERS) == {case.model_type for case in CASES.values()}


@pytest.fixture(params=sorted(CASES))
def family(request):
    model = tiny_model(request.param)
    return request.param, model, adapter_for(model)


def test_roles_name_the_blocks_linears_and_norms(family):
    name, model, adapter = family
    assert isinstance(adapter, ModelAdapter) and CASES[name].model_type in type(adapter).model_types
    assert [s.role for s in adapter.sublayers] == ["attention", "mlp"]
    block = adapter.blocks()[0]
    leaves = [u for s in adapter.sublayers for u in (s.units or (s,))]     # a routed sublayer: its units
    for sub in leaves:
        assert all(type(block.get_submodule(n)) is nn.Linear for n in sub.linears)
        norms = [sub.norm] + ([sub.post_norm] if sub.post_norm is not None else [])
        assert all(isinstance(block.get_submodule(n), nn.Module) for n in norms)
        # the output linear lives inside the sublayer module, under the name the loop swaps out
        assert block.get_submodule(sub.module).get_submodule(sub.output_in_module) is block.get_submodule(sub.output)
        inputs = {block.get_submodule(n).in_features for n in sub.inputs}
        assert len(inputs) == 1, f"{sub.role}: input linears must read one input (one stage)"
    for sub in adapter.sublayers:
        if sub.units:      # the router is a module of the sublayer and no unit's linear
            assert sub.router.startswith(sub.module + ".") and sub.router not in sub.linears
            assert not sub.inputs and all(u.norm == sub.norm for u in sub.units)
    assert adapter.linear_names() == [n for s in leaves for n in s.linears]
    assert [st.linears for st in adapter.stages] == [lin for s in leaves for lin in (s.inputs, (s.output,))]
    assert adapter.leaf_sublayers == tuple(leaves)
    # the linears that see routed rows only: every unit's, each with its place in the unit
    assert adapter.routed_linears() == {n: (s.module, k) for s in adapter.sublayers for u in s.units
                                        for k, n in enumerate(u.linears)}
    assert bool(adapter.routed_linears()) == any(s.units for s in adapter.sublayers)


def test_linear_shapes_from_config_match_the_modules(family):
    _, model, adapter = family
    shapes = type(adapter).linear_shapes(model.config.to_dict())
    block = adapter.blocks()[1]
    assert shapes == {n: (block.get_submodule(n).out_features, block.get_submodule(n).in_features)
                      for n in adapter.linear_names()}


def test_sublayer_forms_compose_to_the_blocks_forward(family):
    """h + branch(sublayer(norm(h))) over the sublayers, in order, is the block's forward: the
    form the loop advances hidden states with; and block by block, each block called with its
    own captured keyword arguments, the model's own forward."""
    _, model, adapter = family
    ids = torch.randint(0, TINY["vocab_size"], (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    hidden, kwargs = capture_block_inputs(ModelSource(model), ids, mask, batch_size=3)
    assert len(kwargs[0]) == adapter.n_blocks
    h = hidden.clone()
    with torch.no_grad():
        for i, block in enumerate(adapter.blocks()):
            expected = adapter.block_forward(block, h, kwargs[0][i])
            for sub in adapter.sublayers:
                normed = block.get_submodule(sub.norm)(h)
                h = h + adapter.branch_output(block, sub, adapter.sublayer_forward(block, sub, normed, kwargs[0][i]))
            torch.testing.assert_close(h, expected, rtol=0, atol=0)
        reference = model(input_ids=ids, attention_mask=mask).logits
        mine = adapter.logits(h)
    real = mask.bool()
    torch.testing.assert_close(mine[real], reference[real], rtol=1e-5, atol=1e-5)


def test_unit_rows_are_the_rows_of_the_kept_neurons(family):
    """Neuron j's rows of each MLP input linear, as the case names them (separate gate/up: row
    j of each; a fused gate_up: rows j and intermediate + j), and no other rows."""
    name, _, adapter = family
    inter = TINY["intermediate_size"]
    kept = [0, 3, 7, inter - 1]
    for mlp in adapter.mlp_units:          # a routed MLP: each expert
        for linear in mlp.inputs:
            rows = mlp.unit_rows(linear, torch.tensor(kept), inter)
            assert rows.tolist() == CASES[name].neuron_rows(linear, kept, inter)
            assert len(rows) == mlp.rows_per_unit(linear) * len(kept)


def test_unknown_architecture_is_refused_with_the_supported_list():
    supported = ", ".join(sorted({case.model_type for case in CASES.values()}))
    with pytest.raises(ValueError, match=f"unsupported architecture 'gpt2'.*supported: {supported}$"):
        adapter_class("gpt2")
    assert adapter_class("rom_fast_llama") is adapter_class("llama")
