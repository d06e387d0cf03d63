"""``rom_fast.compress`` and ``rom_fast.load``: the product's main job."""

from __future__ import annotations

import json
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch
from torch import nn

from rom_fast import planner, plans
from rom_fast.adapters import adapter_for
from rom_fast.calibration import calibration_tokens, default_calibration, default_data_dir
from rom_fast.checkpoint import atomic_directory, load, save_compressed, write_metadata
from rom_fast.lowrank import merge_lowrank
from rom_fast.models import load_model
from rom_fast.pipeline import CompressionOptions, CompressionReport, compress_model
from rom_fast.streaming import ShardWriter, StreamedModel

def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def resolve_plan(model: nn.Module, adapter, budget: Optional[float] = None,
                 recipe: Optional[str] = None, ranks: Union[None, str, Path, Dict[str, int]] = None,
                 last_k: Optional[int] = None, spectra: Optional[Callable[[], dict]] = None,
                 weighting: str = "fisher") -> plans.RankPlan:
    """One plan from the user's options: explicit ranks > named recipe > last_k > budget.

    ``budget`` alone uses the rank planner (:mod:`rom_fast.planner`) with ``spectra()``, which
    collects the dense model's spectra; without it (a streamed model has no weights in memory
    for a backward pass) the paper's recipe at that budget is used. ``recipe="paper"`` asks for
    that recipe explicitly; ``"paper-90|80|50"`` for the paper's own settings.
    """
    chosen = [x is not None for x in (recipe, ranks)]
    if sum(chosen) > 1:
        raise ValueError("give at most one of recipe= and ranks=")
    if ranks is not None:
        if isinstance(ranks, dict):
            return plans.explicit_plan(model, adapter, ranks)
        return plans.ranks_from_file(model, adapter, ranks)
    if recipe is not None and recipe != "paper":
        return plans.paper_recipe(model, adapter, recipe)
    if budget is None:
        budget = 0.8
    if last_k is not None:
        return plans.last_k_plan(model, adapter, budget, last_k)
    if recipe == "paper" or spectra is None:
        return plans.recipe_for_budget(model, adapter, budget)
    return planner.planned(model, adapter, budget, spectra(), weighting)


def _model_card(source: str, plan: plans.RankPlan, calibration: str, report: CompressionReport,
                before: int, after: int, command: str) -> str:
    return f"""# Compressed with rom_fast (LLM-ROM)

- Source model: `{source}`
- Parameters: {before:,} -> {after:,} ({after / before:.1%} kept)
- Plan: {plan.description}
- Calibration: {calibration}
- Factorized layers: {len(report.layers)}
- Command: `{command}`

Load it with `rom_fast.load(path)`, or with `transformers.AutoModelForCausalLM.from_pretrained(path)`
after `import rom_fast` (which registers the factorized model classes).
"""


def _directory_tokenizer(path: Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None


def compress(model, calibration=None, budget: Optional[float] = None, *, recipe: Optional[str] = None,
             ranks=None, last_k: Optional[int] = None, out=None, tokenizer=None,
             n_samples: int = 512, seq_len: int = 128, seed: Optional[int] = 0,
             centered: bool = False, batch_size: int = 8, merge: bool = False,
             overwrite: bool = False, progress: bool = True, command: Optional[str] = None,
             return_model: bool = True, planner_samples: int = 128,
             activation_dtype: Union[str, torch.dtype] = "float32"):
    """Compresses a LLaMA-family model by reduced order modelling and returns it.

    A model object passed in is compressed in place (copy it first to keep the dense one).

    model: a transformers model object, a Hugging Face directory, a ``.gguf`` file, or
        ``"smollm2"`` (the embedded SmolLM2-135M-Instruct). A directory compressed to ``out`` is
        streamed: one block in memory at a time, written to ``out`` as soon as it is done.
    calibration: see :func:`rom_fast.calibration.calibration_tokens` (text/jsonl file, list of
        strings, token ids, ``"combination"``, ``"wiki"``, ``"c4"``, ``"shakespeare"``,
        ``"generated"``). Default: ``"wiki"`` when the local data is present, else
        ``"generated"`` (data-free: sampled from the model).
    budget: fraction of all parameters to keep (default 0.8), allocated by the rank planner
        (spectra and output sensitivities of every layer from ``planner_samples`` calibration
        sequences, :mod:`rom_fast.planner`); or ``recipe="paper"`` (the paper's last-k recipe
        at that budget), ``recipe="paper-80"`` etc. (its own settings), ``last_k=`` with
        ``budget=``, or ``ranks=`` (a dict or JSON file of per-layer ranks). A streamed
        directory uses the paper's recipe unless ranks are given.
    out: if given, the compressed model is written there (atomically) and can be reloaded with
        :func:`rom_fast.load`. ``merge=True`` writes dense ``W1 W2`` weights instead.
    return_model: with a streamed directory, ``False`` skips reloading the result (returns None)
        so memory stays bounded by one block.
    activation_dtype: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``: the precision the
        calibration activations are stored in between layers (arithmetic stays float32). float16
        halves the largest buffers (1 GiB each for a 7B model at 512 x 128 tokens) at ~0.1%
        perplexity on SmolLM2-135M.
    """
    options = CompressionOptions(centered=centered, batch_size=batch_size, activation_dtype=activation_dtype)
    t0 = time.perf_counter()
    source = str(model) if isinstance(model, (str, Path)) else type(model).__name__
    streamed = None
    if isinstance(model, (str, Path)) and Path(model).is_dir() and out is not None and not merge:
        streamed = StreamedModel(model)
        model, tok = streamed.model, tokenizer or _directory_tokenizer(Path(source))
    else:
        model, tok = load_model(model, tokenizer=tokenizer)
    model.eval()
    adapter = adapter_for(model)
    if calibration is None:
        calibration = default_calibration()
        if calibration == "generated":
            print("rom_fast: no calibration data given and none found under "
                  f"{default_data_dir()}; sampling calibration text from the model itself",
                  file=sys.stderr)
    if tok is None and not isinstance(calibration, (torch.Tensor, dict, tuple)):
        raise ValueError("a tokenizer is needed to tokenize the calibration data: pass tokenizer=")
    calib = calibration_tokens(calibration, tok, n_samples=n_samples, seq_len=seq_len, seed=seed,
                               model=model)
    collected = {}

    def spectra():
        collected.update(planner.collect_spectra(
            model, adapter, calib.input_ids[:planner_samples], calib.attention_mask[:planner_samples],
            batch_size=batch_size, progress=progress))
        return collected

    plan = resolve_plan(model, adapter, budget, recipe, ranks, last_k,
                        spectra=None if streamed is not None else spectra)
    before = plans.total_params(model)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(adapter.blocks()), desc="rom_fast blocks", unit="block")

    def tick(done, total):
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    command = command or " ".join(shlex.quote(a) for a in sys.argv)

    def finish(report: CompressionReport):
        if bar is not None:
            bar.close()
        after = plans.total_params(model)
        report.seconds["total"] = time.perf_counter() - t0
        summary = {
            "params_before": before, "params_after": after, "ratio": after / before,
            "seconds": dict(report.seconds), "peak_rss_bytes": peak_rss_bytes(),
            "calibration": calib.description, "n_tokens": int(calib.attention_mask.sum()),
            "centered": centered, "streamed": streamed is not None,
            "activation_dtype": str(options.activation_dtype).replace("torch.", ""),
        }
        metadata = {"plan": plan.to_json(), "summary": summary, "command": command, "source": source,
                    "layer_energy": {r.name: r.retained_energy for r in report.layers},
                    "spectra": {n: sp.to_json() for n, sp in collected.items()}}
        card = _model_card(source, plan, calib.description, report, before, after, command)
        return summary, metadata, card

    if streamed is not None:
        with atomic_directory(out, overwrite) as tmp:
            writer = ShardWriter(tmp)

            def load_block(i):
                if i == 0:   # the first block's inputs are captured: the embedding is not needed
                    streamed.release_embedding()
                streamed.load_block(i)

            report = compress_model(model, adapter, calib.input_ids, calib.attention_mask, plan.ranks, options,
                                    progress=tick, block_loader=load_block,
                                    block_done=lambda i: writer.add(streamed.release_block(i), flush=True))
            last = max((int(n.split(".")[2]) for n in plan.ranks), default=-1)
            for i in range(last + 1, streamed.n_blocks):   # never loaded: copied straight through
                writer.add(streamed.raw_block(i))
            writer.add(streamed.outer_state())
            writer.finish()
            summary, metadata, card = finish(report)
            write_metadata(tmp, model, tok, metadata, card)
        if not return_model:
            return None
        result = load(out)
        result.rom_fast_summary, result.rom_fast_report, result.rom_fast_plan = summary, report, plan
        return result

    report = compress_model(model, adapter, calib.input_ids, calib.attention_mask, plan.ranks, options,
                            progress=tick)
    summary, metadata, card = finish(report)
    model.rom_fast_summary = summary
    model.rom_fast_report = report
    model.rom_fast_plan = plan
    if merge:
        merge_lowrank(model)
    if out is not None:
        save_compressed(model, tok, out, metadata, card, merged=merge, overwrite=overwrite)
    return model
