"""One contract, every adapter: what the loop and the planner rely on when they reach a block's
layers through the adapter's named roles instead of module names.

A new model family passes this file before anything else: add its tiny config to FAMILIES.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

from rom_fast.adapters import ADAPTERS, ModelAdapter, adapter_class, adapter_for
from rom_fast.blockwise import capture_block_inputs
from rom_fast.io.sources import ModelSource

TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=112, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, num_hidden_layers=2)
FAMILIES = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
}


def test_every_registered_adapter_has_a_contract_case():
    assert set(ADAPTERS) == set(FAMILIES)


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[request.param](**TINY)).eval()
    return request.param, model, adapter_for(model)


def test_roles_name_the_blocks_linears_and_norms(family):
    name, model, adapter = family
    assert isinstance(adapter, ModelAdapter) and name in type(adapter).model_types
    assert [s.role for s in adapter.sublayers] == ["attention", "mlp"]
    block = adapter.blocks()[0]
    for sub in adapter.sublayers:
        assert all(type(block.get_submodule(n)) is nn.Linear for n in sub.linears)
        assert block.get_submodule(sub.norm) is not None
        # the output linear lives inside the sublayer module, under the name the loop swaps out
        assert block.get_submodule(sub.module).get_submodule(sub.output_in_module) is block.get_submodule(sub.output)
        inputs = {block.get_submodule(n).in_features for n in sub.inputs}
        assert len(inputs) == 1, f"{sub.role}: input linears must read one input (one stage)"
    assert adapter.linear_names() == [n for s in adapter.sublayers for n in s.linears]
    assert [st.linears for st in adapter.stages] == [lin for s in adapter.sublayers
                                                     for lin in (s.inputs, (s.output,))]


def test_linear_shapes_from_config_match_the_modules(family):
    _, model, adapter = family
    shapes = type(adapter).linear_shapes(model.config.to_dict())
    block = adapter.blocks()[1]
    assert shapes == {n: (block.get_submodule(n).out_features, block.get_submodule(n).in_features)
                      for n in adapter.linear_names()}


def test_sublayer_forms_compose_to_the_blocks_forward(family):
    """h + branch(sublayer(norm(h))) over the sublayers, in order, is the block's forward: the
    form the loop advances hidden states with."""
    _, model, adapter = family
    ids = torch.randint(0, TINY["vocab_size"], (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    hidden, kwargs = capture_block_inputs(ModelSource(model), ids, mask, batch_size=3)
    block = adapter.blocks()[0]
    with torch.no_grad():
        expected = adapter.block_forward(block, hidden, kwargs[0])
        h = hidden.clone()
        for sub in adapter.sublayers:
            normed = block.get_submodule(sub.norm)(h)
            h = h + adapter.branch_output(block, sub, adapter.sublayer_forward(block, sub, normed, kwargs[0]))
    torch.testing.assert_close(h, expected, rtol=0, atol=0)


def test_unit_rows_of_separate_projections_are_the_kept_indices(family):
    _, _, adapter = family
    kept = torch.tensor([0, 3, 7])
    for name in adapter.mlp.inputs:
        assert torch.equal(adapter.mlp.unit_rows(name, kept), kept)


def test_unknown_architecture_is_refused_with_the_supported_list():
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*supported: llama, mistral, qwen2"):
        adapter_class("gpt2")
    assert adapter_class("rom_fast_llama") is adapter_class("llama")
