"""Llama-3's rotary scaling and 128k vocabulary need nothing of the LLaMA adapter: the scaled
frequencies are the model's own (captured with every block's keyword arguments) and survive a
checkpoint; the config.json form Llama-3 checkpoints ship (``rope_scaling``) streams too
(tests/test_families.py has the guarantees every family gets, on this case as well)."""

from __future__ import annotations

import copy
import json

import torch

import rom_fast
from transformers import AutoModelForCausalLM

from families import CASES, LLAMA3_ROPE, tiny_model
from test_families import calibration, every_linear, probe, save_dir


def default_frequencies(config) -> torch.Tensor:
    dim = config.head_dim
    return 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))


def test_the_tiny_llama3_scales_its_low_frequencies_and_has_the_128k_vocabulary():
    model = tiny_model("llama3")
    plain, scaled = default_frequencies(model.config), model.model.rotary_emb.inv_freq
    assert model.config.rope_parameters["rope_type"] == "llama3"
    assert torch.equal(scaled[0], plain[0])                            # high frequencies kept
    assert torch.allclose(scaled[-1], plain[-1] / LLAMA3_ROPE["factor"])  # low ones divided by the factor
    assert model.lm_head.weight.shape == (128256, model.config.hidden_size)


def test_llama3_rope_scaling_from_a_hub_config_survives_compression_and_the_checkpoint(tmp_path):
    """A dense directory whose config.json has Llama-3.1's ``rope_scaling`` and top-level
    ``rope_theta`` (as on the Hub) is streamed: the compressed checkpoint keeps the scaling,
    its rotary frequencies are the source's, and its logits are those of the model compressed
    in memory."""
    model = tiny_model("llama3")
    src = save_dir(model, tmp_path / "dense")
    cfg = json.loads((src / "config.json").read_text())
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (src / "config.json").write_text(json.dumps(cfg))
    kw = dict(calibration=calibration(), ranks=every_linear(CASES["llama3"], blocks=[1]), progress=False)
    in_memory = rom_fast.compress(copy.deepcopy(model), **kw).model
    rom_fast.compress(str(src), out=tmp_path / "rom", **kw)
    saved = json.loads((tmp_path / "rom" / "config.json").read_text())
    assert saved["rope_parameters"] == model.config.rope_parameters
    with torch.no_grad():
        expected = in_memory(probe()).logits
        for loaded in (rom_fast.load(tmp_path / "rom"), AutoModelForCausalLM.from_pretrained(tmp_path / "rom")):
            assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
            torch.testing.assert_close(loaded(probe()).logits, expected, atol=1e-5, rtol=1e-5)
