"""``rom_fast.compress`` and ``rom_fast.load``: the product's main job.

One code path for every source: a model object, a GGUF file and a Hugging Face directory are
all :class:`~rom_fast.io.sources.BlockSource` objects, planned, compressed, written and resumed by
the same loop, one block at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import nn

from rom_fast import distributed, planner, plans
from rom_fast.calibration import CalibrationBatch, calibration_tokens, data_free_note, default_calibration
from rom_fast.io import data
from rom_fast.io.checkpoint import factorized_layers, write_metadata
from rom_fast.lowrank import apply_structure, merge_lowrank
from rom_fast.io.output import OutputShard, ResumableOutput, check_replaceable
from rom_fast.pipeline import (DEFAULT_ANCHOR, NO_TOKENS_ROUTE, CompressionOptions, CompressionReport, LayerRecord,
                              compress_blocks)
from rom_fast.io.sources import BlockSource, load, open_source
from rom_fast.util import check_int as _check_int, peak_rss_bytes, release_freed_memory


@dataclass(frozen=True)
class PlanRequest:
    """The user's plan options, checked together before any work: explicit ``ranks``, a named
    ``recipe``, ``last_k`` with ``budget``, or ``budget`` alone (the rank planner)."""

    budget: Optional[float] = None
    recipe: Optional[str] = None
    ranks: Union[None, str, Path, Dict[str, int]] = None
    last_k: Optional[int] = None
    weighting: str = "fisher"
    planner_samples: int = 128
    planner_grad_samples: int = planner.DEFAULT_GRAD_SAMPLES
    mlp_structure: str = planner.DEFAULT_MLP_STRUCTURE
    structures: str = "all"

    def __post_init__(self):
        if self.ranks is not None and (self.budget is not None or self.recipe is not None or self.last_k is not None):
            raise ValueError("ranks= fixes every layer's rank: give it without budget=, recipe= or last_k=")
        if self.recipe is not None:
            if self.recipe != "paper" and self.recipe not in plans.PAPER_RECIPES:
                raise ValueError(f"unknown recipe {self.recipe!r}; known: paper, {', '.join(plans.PAPER_RECIPES)}")
            if self.recipe != "paper" and self.budget is not None:
                raise ValueError(f"recipe={self.recipe!r} fixes its own budget: give it without budget=")
            if self.last_k is not None:
                raise ValueError("recipe= chooses the blocks itself: give last_k= with budget= instead")
        if self.last_k is not None and self.budget is None:
            raise ValueError("last_k= needs budget= (the fraction of all parameters to keep)")
        if self.budget is not None:
            plans.check_budget(self.budget)
        if self.last_k is not None:
            _check_int("last_k", self.last_k, 1)
        if self.weighting not in planner.WEIGHTINGS:
            raise ValueError(f"weighting must be one of {planner.WEIGHTINGS}, got {self.weighting!r}")
        if self.mlp_structure not in planner.MLP_STRUCTURES:
            raise ValueError(f"mlp_structure must be one of {planner.MLP_STRUCTURES}, got {self.mlp_structure!r}")
        planner.check_structures(self.structures, self.mlp_structure)
        if self.structures == "standard" and not self.uses_planner:
            raise ValueError("structures='standard' is the rank planner's option: give it with budget= alone "
                             "(recipes and last_k= are low-rank; ranks= takes {'ranks': {}, 'neurons': ...})")
        if self.mlp_structure == "neurons" and not self.uses_planner:
            raise ValueError("mlp_structure='neurons' is the rank planner's choice: give it with budget= alone "
                             "(recipes and last_k= are low-rank; ranks= takes {'ranks': ..., 'neurons': ...})")
        _check_int("planner_samples", self.planner_samples, 1)
        _check_int("planner_grad_samples", self.planner_grad_samples, 1)
        if self.ranks is not None and not isinstance(self.ranks, dict):
            object.__setattr__(self, "ranks_file", str(self.ranks))
            object.__setattr__(self, "ranks", plans.read_ranks_file(self.ranks))

    @property
    def uses_planner(self) -> bool:
        return self.ranks is None and self.recipe is None and self.last_k is None

    def to_json(self) -> dict:
        return {"budget": self.budget, "recipe": self.recipe, "ranks": self.ranks, "last_k": self.last_k,
                "weighting": self.weighting if self.uses_planner else None,
                "planner_samples": self.planner_samples if self.uses_planner else None,
                "planner_grad_samples": self.planner_grad_samples if self.uses_planner else None,
                "mlp_structure": self.mlp_structure if self.uses_planner else None,
                # only when set: a run started before the option keeps its fingerprint
                **({"structures": self.structures} if self.structures != "all" else {})}

    def resolve(self, shape: plans.ModelShape, spectra) -> plans.RankPlan:
        """The plan; ``spectra()`` collects the planner's spectra when it is needed."""
        if self.ranks is not None:
            label = f"explicit ranks from {Path(self.ranks_file).name}" if hasattr(self, "ranks_file") \
                else "explicit ranks"
            ranks, neurons = plans.split_plan(self.ranks)
            return plans.explicit_plan(shape, ranks, label, neurons)
        if self.recipe is not None and self.recipe != "paper":
            return plans.paper_recipe(shape, self.recipe)
        budget = 0.8 if self.budget is None else self.budget
        if self.last_k is not None:
            return plans.last_k_plan(shape, budget, self.last_k)
        if self.recipe == "paper":
            return plans.recipe_for_budget(shape, budget)
        plans.check_reachable(shape, budget, self.structures)    # before the planner's pass over the model
        mlp_structure = planner.check_structures(self.structures, self.mlp_structure)
        return planner.planned(shape, budget, spectra(mlp_structure != "lowrank"), self.weighting,
                               mlp_structure, self.structures)


@dataclass
class CompressionResult:
    """What :func:`compress` returns, for every kind of source.

    ``path``: the output directory (None without ``out``); ``summary``: parameters before and
    after (as saved), kept fraction, timings, peak memory; ``plan`` and ``report`` (per-layer
    ranks, retained energy, routes). ``model`` is the compressed model: the object compressed
    in place for a model in memory; for a streamed directory it is loaded from ``path`` when
    first asked for (the whole model, in float32: for big models use ``rom_fast.evaluate`` on
    ``path``, which runs block by block, or ``rom_fast.load(path, dtype=torch.bfloat16)``).
    """

    path: Optional[Path]
    summary: dict
    plan: plans.RankPlan
    report: CompressionReport
    _model: Optional[nn.Module] = field(default=None, repr=False)

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            if self.path is None:
                raise ValueError("nothing to load: the run had no out= directory")
            self._model = load(self.path)
        return self._model


def _model_card(source: str, plan: plans.RankPlan, calibration: str, n_layers: int,
                before: int, after: int, merged: bool, command: str) -> str:
    kept = f"{after / before:.1%} kept" + (", merged to dense W1·W2" if merged else "")
    return f"""# Compressed with rom_fast (LLM-ROM)

- Source model: `{source}`
- Parameters: {before:,} -> {after:,} ({kept})
- Plan: {plan.description}
- Calibration: {calibration}
- Factorized layers: {n_layers}
- Command: `{command}`

Load it with `rom_fast.load(path)`, or with `transformers.AutoModelForCausalLM.from_pretrained(path)`
after `import rom_fast` (which registers the factorized model classes).
"""


def _tokens_key(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (input_ids, attention_mask):
        t = t.to(torch.int64).contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _perplexity(model, tokenizer, windows: int, progress: bool, comm=None) -> Optional[float]:
    """WikiText-2 perplexity on the first ``windows`` 512-token windows, None without data."""
    from rom_fast.evaluate import PERPLEXITY_FILE, wikitext2_perplexity
    if tokenizer is None:
        print("rom_fast: perplexity skipped: the model has no tokenizer", file=sys.stderr)
        return None
    try:
        path, = data.require([PERPLEXITY_FILE])
    except FileNotFoundError as exc:      # one line: the file and the command that fetches it
        print(f"rom_fast: perplexity skipped: {exc}", file=sys.stderr)
        return None
    if progress:
        print(f"rom_fast: WikiText-2 perplexity on {windows} windows of 512 tokens", file=sys.stderr)
    try:
        return wikitext2_perplexity(model, tokenizer, path=str(path), window=512, max_windows=windows,
                                    progress=progress, comm=comm)["perplexity"]
    finally:
        release_freed_memory()     # logits and tokenizer buffers, before the next phase


def _restore_block(source: BlockSource, i: int, output: ResumableOutput) -> None:
    """A resumed run's finished block back into an in-memory model, from its saved shard."""
    block = source.adapter.blocks()[i]
    prefix = source.adapter.block_prefix(i)
    layers = {n[len(prefix):]: spec for n, spec in output.block_layers(i).items()}
    dtype = next(block.parameters()).dtype
    apply_structure(block, layers, dtype=dtype)
    state = {k[len(prefix):]: v.to(dtype) for k, v in output.block_tensors(i).items()}
    block.load_state_dict(state, strict=True)


def _open_output(comm, out: Path, fingerprint: dict, command: str, overwrite: bool,
                 restart: bool) -> ResumableOutput:
    """The resumable output: process 0 opens (validates, restarts, resumes) it; in a
    data-parallel run the other processes get their shard of it from the state process 0
    read. The fingerprint then names the process count: each saved hidden state is a shard's."""
    if comm.size == 1:
        return ResumableOutput(out, fingerprint, command, overwrite=overwrite, restart=restart)
    fingerprint = dict(fingerprint, processes=comm.size)
    synchronize = lambda: comm.barrier("output")   # noqa: E731
    opened = {}

    def open_root():
        opened["output"] = ResumableOutput(out, fingerprint, command, overwrite=overwrite, restart=restart,
                                           processes=comm.size, synchronize=synchronize)
        return opened["output"].state

    state = comm.from_root(open_root, "output")
    if comm.is_root:
        output = opened["output"]
    else:
        output = OutputShard(out, state, comm.rank, comm.size, synchronize)
    if output.resumed:
        path = output.hidden_path()
        comm.check_all(path is None or path.is_file(),
                       f"{output.partial}: a process's saved hidden states are missing "
                       "(--out must be on storage every process sees)")
    return output


def refuse_merged_neurons(merge: bool, mlp_structure: Optional[str] = None,
                          plan: Optional[plans.RankPlan] = None) -> None:
    """The one owner of the merge-versus-neurons rule: a merged checkpoint is the base
    architecture, whose MLPs all keep ``intermediate_size`` neurons. Called before any work
    with the requested ``mlp_structure``, and with the ``plan`` once it is known."""
    if not merge:
        return
    if mlp_structure == "neurons":
        raise ValueError("merge=True writes a plain checkpoint of the base architecture, whose MLPs all have "
                         "intermediate_size neurons: mlp_structure='neurons' cannot be merged")
    if plan is not None and plan.neurons:
        raise ValueError("merge=True writes a plain checkpoint of the base architecture, whose MLPs all "
                         f"have intermediate_size neurons; this plan keeps fewer in {len(plan.neurons)} "
                         "MLPs: save it factorized, or plan with mlp_structure='lowrank'")


class CompressionRun:
    """One :func:`compress` call as named steps, run in this order by :func:`compress`:
    :meth:`open_inputs` (source, calibration tokens), :meth:`open_output` (its
    :meth:`fingerprint`; validates, restarts or resumes ``out``), :meth:`evaluate_before`,
    :meth:`plan_or_resume`, :meth:`compress_blocks` (each finished block committed by
    :meth:`block_done`), :meth:`commit` (summary, metadata, the output renamed into place),
    :meth:`evaluate_after`, then :meth:`result`. :func:`plan` runs :meth:`open_source` and
    :meth:`make_plan` alone.

    Built from compress's arguments, which are all checked here, before any work."""

    def __init__(self, model, calibration=None, budget: Optional[float] = None, *, recipe: Optional[str] = None,
                 ranks=None, last_k: Optional[int] = None, out=None, tokenizer=None,
                 n_samples: int = 512, seq_len: int = 128, seed: Optional[int] = 0,
                 centered: bool = False, batch_size: int = 8, merge: bool = False,
                 overwrite: bool = False, restart: bool = False, progress: bool = True,
                 command: Optional[str] = None, planner_samples: int = 128,
                 planner_grad_samples: int = planner.DEFAULT_GRAD_SAMPLES, weighting: str = "fisher",
                 activation_dtype: Union[str, torch.dtype] = "float32",
                 eval_windows: int = 0, anchor: float = DEFAULT_ANCHOR, ridge: float = 1e-3,
                 gram_precision: str = "auto", mlp_structure: str = planner.DEFAULT_MLP_STRUCTURE,
                 structures: str = "all"):
        self.t0 = time.perf_counter()
        self.options = CompressionOptions(centered=centered, batch_size=_check_int("batch_size", batch_size, 1),
                                          activation_dtype=activation_dtype, anchor=float(anchor),
                                          ridge=float(ridge), gram_precision=gram_precision)
        if merge and mlp_structure == "auto" and structures == "all":
            mlp_structure = "lowrank"     # a merged checkpoint is the base architecture: one MLP width
        if merge and structures == "standard":
            raise ValueError("merge=True writes the base architecture, whose MLPs all have intermediate_size "
                             "neurons; structures='standard' plans keep fewer: save it unmerged")
        refuse_merged_neurons(merge, mlp_structure)
        self.request = PlanRequest(budget, recipe, ranks, last_k, weighting, planner_samples, planner_grad_samples,
                                   mlp_structure, structures)
        self.n_samples = _check_int("n_samples", n_samples, 1)
        self.seq_len = _check_int("seq_len", seq_len, 2)
        self.eval_windows = _check_int("eval_windows", eval_windows, 0)
        self.comm = distributed.communicator()
        self.progress = progress and self.comm.is_root       # one process draws the bars
        self.out = None if out is None else Path(out)
        if self.out is not None:
            check_replaceable(self.out, overwrite, model if isinstance(model, (str, os.PathLike)) else None)
        self.model, self.tokenizer, self.calibration, self.seed = model, tokenizer, calibration, seed
        self.centered, self.merge, self.overwrite, self.restart = centered, merge, overwrite, restart
        self.command = command or " ".join(shlex.quote(a) for a in sys.argv)
        self.source: Optional[BlockSource] = None
        self.tok = None
        self.generated: Optional[bool] = None      # known once the calibration is read
        self.calib: Optional[CalibrationBatch] = None
        self.input_ids = self.attention_mask = self.description = None
        self.output: Optional[ResumableOutput] = None
        self.plan: Optional[plans.RankPlan] = None
        self.report = CompressionReport()
        self.spectra_json: dict = {}
        self.perplexity: dict = {}
        self.summary: dict = {}
        self.layers: dict = {}
        self.result_model: Optional[nn.Module] = None
        self.bar = None

    # -- inputs and calibration ------------------------------------------------------------

    def open_inputs(self) -> None:
        """The source and the calibration tokens given (for "generated", sampled later: tokens())."""
        self.open_source()
        self.read_calibration()

    def open_source(self) -> None:
        self.source = open_source(self.model, self.tokenizer)
        self.tok = self.source.tokenizer
        if self.merge and any(sub.units for sub in self.source.adapter.sublayers):
            raise ValueError("merge=True writes a plain checkpoint of the base architecture, which does not read "
                             f"{type(self.source.adapter).__name__}'s per-expert layers: compress without merge")

    def read_calibration(self) -> None:
        calibration = self.calibration
        if calibration is None:
            calibration = default_calibration()
            if calibration == "generated":
                print(data_free_note(self.eval_windows > 0), file=sys.stderr)
        self.generated = isinstance(calibration, str) and calibration == "generated"
        if not self.generated:
            if self.tok is None and not isinstance(calibration, (torch.Tensor, dict, tuple, CalibrationBatch)):
                raise ValueError("a tokenizer is needed to tokenize the calibration data: pass tokenizer=")
            self.calib = calibration_tokens(calibration, self.tok, n_samples=self.n_samples, seq_len=self.seq_len,
                                            seed=self.seed)
            release_freed_memory()     # the tokenizer's buffers for a whole corpus

    def tokens(self) -> None:
        """A fresh run's calibration tokens (sampled from the model for "generated"), process 0's
        on every process, in ``input_ids``, ``attention_mask``, ``description``."""
        if self.input_ids is not None:
            return
        if self.generated is None:
            self.read_calibration()
        calib = self.calib
        if calib is None:
            calib = calibration_tokens("generated", self.tok, n_samples=self.n_samples, seq_len=self.seq_len,
                                       seed=self.seed, model=self.source)
        calib = self.comm.broadcast(calib, "calibration")        # process 0's tokens on every process
        self.input_ids, self.attention_mask, self.description = \
            calib.input_ids, calib.attention_mask, calib.description

    # -- fingerprint and output ------------------------------------------------------------

    def fingerprint(self) -> dict:
        """What a resumed run must share with the interrupted one."""
        options = self.options
        return {
            "source": self.source.fingerprint(),
            "calibration": f"generated:{self.n_samples}:{self.seq_len}:{self.seed}" if self.generated
            else _tokens_key(self.calib.input_ids, self.calib.attention_mask),
            "plan": self.request.to_json(),
            "options": {"centered": self.centered, "batch_size": options.batch_size, "merge": self.merge,
                        "activation_dtype": str(options.activation_dtype), "eigen_method": options.eigen_method,
                        "gram_precision": options.gram_precision,
                        **({"anchor": options.anchor, "ridge": options.ridge} if options.anchor else {})},
        }

    def open_output(self) -> None:
        if self.out is not None:
            self.output = _open_output(self.comm, self.out, self.fingerprint(), self.command, self.overwrite,
                                       self.restart)

    # -- plan or resume --------------------------------------------------------------------

    @functools.cached_property
    def shape(self) -> plans.ModelShape:
        return plans.ModelShape.of_source(self.source)

    @property
    def last_block(self) -> int:
        return max((self.shape.block_of[n] for n in self.plan.modules()), default=-1)

    def plan_or_resume(self) -> None:
        """The interrupted run's tokens and plan, or a fresh run's (then the output started)."""
        self.shape                  # the model's shape is read first, as it always was
        output = self.output
        if output is not None and output.resumed:
            self.input_ids, self.attention_mask = output.calibration()
            self.description = output.state["calibration"]
            self.plan = plans.RankPlan(**output.state["plan"])
            self.spectra_json = output.spectra_json()
            if self.comm.is_root:
                print(f"rom_fast: resuming the interrupted run in {output.partial}: "
                      f"{output.blocks_done} of {self.last_block + 1} blocks done", file=sys.stderr)
            return
        self.tokens()
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        self.plan = self.make_plan()[0]
        if output is not None:
            self.start_output()

    def make_plan(self):
        """``(plan, spectra)``: the request resolved (process 0's plan, bit for bit, on every
        process), with the planner's spectra when it ran (else None)."""
        collected = []

        def spectra(neuron_curves: bool = False):
            self.tokens()
            k = min(self.request.planner_samples, self.input_ids.shape[0])
            collected.append(planner.collect_spectra(
                self.source, self.input_ids[:k], self.attention_mask[:k], batch_size=self.options.batch_size,
                progress=self.progress, activation_dtype=self.options.activation_dtype,
                workdir=str(self.out.parent) if self.out is not None else None, seconds=self.report.seconds,
                grad_samples=self.request.planner_grad_samples, comm=self.comm, neuron_curves=neuron_curves,
                gram_precision=self.options.gram_precision))
            self.spectra_json.update({n: sp.to_json() for n, sp in collected[0].items()})
            return collected[0]

        plan = self.comm.broadcast(self.request.resolve(self.shape, spectra), "plan")
        refuse_merged_neurons(self.merge, plan=plan)
        return plan, (collected[0] if collected else None)

    def start_output(self) -> None:
        """The fresh run's plan, tokens and spectra saved in the output, after a free-space check."""
        output, shape, options, source = self.output, self.shape, self.options, self.source
        kept = self.plan.details.get("kept_params", shape.total_params) if not self.merge else shape.total_params
        hidden_bytes = self.input_ids.numel() * source.config.hidden_size * \
            torch.empty(0, dtype=options.activation_dtype).element_size() * (2 if options.anchor else 1)
        weight_bytes = source.param_count * torch.empty(0, dtype=source.storage_dtype).element_size()
        needed = int(weight_bytes * kept / shape.total_params) + 2 * hidden_bytes
        output.state = self.comm.from_root(
            lambda: output.start(self.plan.to_json(), self.input_ids, self.attention_mask, self.description,
                                 self.spectra_json, needed_bytes=needed) or output.state, "output")
        self.comm.check_all(output.partial.is_dir(), f"{output.partial} is not visible here: "
                            "--out must be on storage every process sees")

    # -- blocks ----------------------------------------------------------------------------

    def compress_blocks(self) -> None:
        output, source = self.output, self.source
        self.start = output.blocks_done if output is not None else 0
        if output is not None and not source.streamed:
            for i in range(self.start):
                _restore_block(source, i, output)
        if output is not None:
            self.report.layers.extend(LayerRecord(**r) for r in output.state["records"])
        if self.progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.last_block + 1, initial=self.start, desc="rom_fast blocks", unit="block")
        try:
            compress_blocks(source, self.input_ids, self.attention_mask, self.plan.ranks, self.options,
                            progress=self.tick, neurons=self.plan.neurons, block_done=self.block_done,
                            start_block=self.start, report=self.report, comm=self.comm,
                            start_hidden=output.load_hidden if output is not None and self.start > 0 else None)
        except BaseException:
            if output is not None:
                output.abandon()
            raise
        finally:
            if self.bar is not None:
                self.bar.close()

    def tick(self, done, total) -> None:
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()

    def block_done(self, i: int, block: nn.Module, hidden: torch.Tensor) -> None:
        """Block ``i`` finished: merged if asked, committed to the output, released."""
        if self.merge:
            merge_lowrank(block)
        if self.output is not None:
            prefix = self.source.adapter.block_prefix(i)
            records = [dataclasses.asdict(r) for r in self.report.layers if r.name.startswith(prefix)]
            self.output.commit_block(i, self.source.block_tensors(i), self.source.block_dtype(i),
                                     factorized_layers(block, prefix), records,
                                     hidden if i < self.last_block else None)
        # A streamed block is dropped once written; without `out` it stays (it is the result).
        # release_block also narrows a half-precision in-memory model's block back.
        if self.output is not None or not self.source.streamed:
            self.source.release_block(i)

    # -- commit, summary and metadata ------------------------------------------------------

    def commit(self) -> None:
        """The summary; with ``out``, the metadata written and the output renamed into place."""
        output, source, comm = self.output, self.source, self.comm
        self.summary = {
            "params_before": source.param_count,
            "calibration": self.description, "n_tokens": int(self.attention_mask.sum()),
            "centered": self.centered, "streamed": source.streamed, "merged": self.merge,
            "activation_dtype": str(self.options.activation_dtype).replace("torch.", ""),
            "plan_ratio": self.plan.details.get("ratio"),
            "resumed_from_block": self.start,
        }
        if self.perplexity:
            self.summary["perplexity"] = self.perplexity
        left_dense = [r.name for r in self.report.layers if r.route == NO_TOKENS_ROUTE]
        if left_dense:      # routed units no calibration token reached: the plan's setting not applied
            self.summary["left_dense_no_tokens"] = left_dense
        if output is None:
            self.result_model = source.finished_model()
            self.finish_summary(plans.total_params(self.result_model))
            return
        self.layers = {n: spec for i in range(self.last_block + 1) for n, spec in output.block_layers(i).items()} \
            if comm.is_root else {}
        self.generation_config = getattr(source.model, "generation_config", None)
        params_after = comm.from_root(lambda: output.finish(range(self.last_block + 1, source.n_blocks),
                                                            source.original_block_tensors,
                                                            source.outer_tensors(), self.write_metadata), "output")
        if not comm.is_root:
            self.finish_summary(params_after)
        if not source.streamed:
            self.result_model = source.model

    def finish_summary(self, params_after: int) -> dict:
        summary = self.summary
        summary["params_after"] = params_after
        summary["ratio"] = params_after / summary["params_before"]
        summary["seconds"] = dict(self.report.seconds, total=time.perf_counter() - self.t0)
        summary["peak_rss_bytes"] = peak_rss_bytes()
        summary.update(distributed.traffic_summary(self.comm))
        return summary

    def write_metadata(self, directory: Path, params_after: int) -> None:
        """config.json's rom_fast section, the model card and the tokenizer, into ``directory``."""
        self.finish_summary(params_after)
        source, plan = self.source, self.plan
        meta = {"plan": plan.to_json(), "summary": self.summary, "command": self.command, "source": source.name,
                "layer_energy": {r.name: r.retained_energy for r in self.report.layers},
                "spectra": self.spectra_json}
        card = _model_card(source.name, plan, self.description, len(self.layers), source.param_count,
                           params_after, self.merge, self.command)
        write_metadata(directory, source.config, self.tok, meta, card, self.layers, self.merge,
                       self.generation_config)

    # -- evaluation ------------------------------------------------------------------------

    def evaluate_before(self) -> None:
        if self.eval_windows:
            self.perplexity["before"] = _perplexity(self.source, self.tok, self.eval_windows, self.progress,
                                                    self.comm)

    def evaluate_after(self) -> None:
        if self.perplexity and self.perplexity["before"] is not None:
            after = self.result_model if self.result_model is not None else open_source(self.out, self.tok)
            self.perplexity["after"] = _perplexity(after, self.tok, self.eval_windows, self.progress, self.comm)
            self.summary.update(distributed.traffic_summary(self.comm))

    def result(self) -> CompressionResult:
        return CompressionResult(self.out, self.summary, self.plan, self.report, self.result_model)


def compress(model, calibration=None, budget: Optional[float] = None, *, recipe: Optional[str] = None,
             ranks=None, last_k: Optional[int] = None, out=None, tokenizer=None,
             n_samples: int = 512, seq_len: int = 128, seed: Optional[int] = 0,
             centered: bool = False, batch_size: int = 8, merge: bool = False,
             overwrite: bool = False, restart: bool = False, progress: bool = True,
             command: Optional[str] = None, planner_samples: int = 128,
             planner_grad_samples: int = planner.DEFAULT_GRAD_SAMPLES, weighting: str = "fisher",
             activation_dtype: Union[str, torch.dtype] = "float32",
             eval_windows: int = 0, anchor: float = DEFAULT_ANCHOR, ridge: float = 1e-3,
             gram_precision: str = "auto",
             mlp_structure: str = planner.DEFAULT_MLP_STRUCTURE, structures: str = "all") -> CompressionResult:
    """Compresses a LLaMA-family model by reduced order modelling, one block at a time.

    model: a transformers model object (compressed in place: copy it first to keep the dense
        one), a Hugging Face safetensors directory (streamed: one block in memory at a time), a
        ``.gguf`` file, ``"smollm2"`` (the embedded SmolLM2-135M-Instruct), or a
        :class:`~rom_fast.io.sources.BlockSource`.
    calibration: see :func:`rom_fast.calibration.calibration_tokens` (text/jsonl file, list of
        strings, token ids, ``"combination"``, ``"wiki"``, ``"c4"``, ``"shakespeare"``,
        ``"generated"``). Default: ``"wiki"`` when the local data is present, else
        ``"generated"`` (data-free: sampled from the model, block by block).
    budget: fraction of all parameters to keep (default 0.8), allocated by the rank planner
        (spectra of every layer from ``planner_samples`` calibration sequences, output
        sensitivities from the first ``planner_grad_samples`` of them, collected block by
        block: :mod:`rom_fast.planner`), for every kind of source. Or ``recipe="paper"`` (the paper's last-k recipe at ``budget``),
        ``recipe="paper-80"`` etc. (its own settings), ``last_k=`` with ``budget=``, or
        ``ranks=`` (a dict or JSON file of per-layer ranks, or ``{"ranks": ..., "neurons": {MLP
        name: kept neurons}}``). Conflicting options are refused.
    mlp_structure: how the planner may compress each MLP: ``"auto"`` (whichever of low-rank
        linears or whole kept neurons its curves say loses less), ``"lowrank"`` or
        ``"neurons"`` (whole neurons kept: gate/up keep those rows, down_proj is refitted).
        With ``merge=True`` "auto" plans low-rank layers only (a merged checkpoint has the base
        architecture's single MLP width).
    structures: ``"all"`` (default: every structure, as ``mlp_structure`` allows) or
        ``"standard"``: the planner uses only dense layers and kept MLP neurons (attention stays
        dense), what a plain runtime with per-layer widths runs: such a model exports to GGUF for
        llama.cpp (``rom-fast export``). Planner only; not with ``merge=True``.
    out: the output directory, written block by block as a Hugging Face checkpoint (in the
        source's precision) under ``.<out>.partial`` and renamed into place when complete.
        An interrupted run (Ctrl-C, kill, power loss) continues from its last finished block
        when the same call is made again; ``restart=True`` discards it instead.
        ``merge=True`` writes dense ``W1 W2`` weights instead of the two factors.
    activation_dtype: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``: the precision the
        calibration activations are stored in between layers (arithmetic stays float32).
    anchor: dense-anchored targets (0: the paper's objective, each layer's own output on the
        compressed path's inputs; alpha > 0 also fits the dense model's output at the same
        tokens with weight alpha; ``float("inf")``: only the dense output). ``ridge``
        regularises the regression it needs (a fraction of the mean input eigenvalue).
    gram_precision: ``"auto"`` (float32 blocks accumulated in float64 for Grams of at least
        1536 columns, where they are ~1.6-1.9x faster; exact float64 below), ``"float32"`` or
        ``"float64"``.
    eval_windows: if > 0, WikiText-2 perplexity on that many 512-token windows before and after
        (block by block for a streamed source), in ``summary["perplexity"]``; skipped with a
        message when the data is missing.

    Under torchrun (or in a torch.distributed process group the caller set up) every process
    calls this with the same arguments and works on its shard of the calibration sequences
    (:mod:`rom_fast.distributed`); results equal one process's to float64 rounding, and only
    process 0 writes ``out``.

    Returns a :class:`CompressionResult`: ``.model`` (in memory, or loaded lazily from ``out``
    for a streamed directory), ``.path``, ``.summary``, ``.plan``, ``.report``.
    """
    run = CompressionRun(model, calibration, budget, recipe=recipe, ranks=ranks, last_k=last_k, out=out,
                         tokenizer=tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed, centered=centered,
                         batch_size=batch_size, merge=merge, overwrite=overwrite, restart=restart,
                         progress=progress, command=command, planner_samples=planner_samples,
                         planner_grad_samples=planner_grad_samples, weighting=weighting,
                         activation_dtype=activation_dtype, eval_windows=eval_windows, anchor=anchor, ridge=ridge,
                         gram_precision=gram_precision, mlp_structure=mlp_structure, structures=structures)
    run.open_inputs()
    run.open_output()
    run.evaluate_before()
    run.plan_or_resume()
    run.compress_blocks()
    run.commit()
    run.evaluate_after()
    return run.result()


@dataclass
class PlanResult:
    """What :func:`plan` returns. ``plan``: the :class:`~rom_fast.plans.RankPlan` compress would
    use (``ranks``, ``neurons``, ``description``, ``details``; ``compress(..., ranks=
    dict(plan.to_json(), neurons=plan.neurons))`` applies it); ``spectra``: the planner's
    per-layer :class:`~rom_fast.planner.LayerSpectrum` objects, in block order, when it ran (None
    for ``ranks=``, ``recipe=`` or ``last_k=`` plans); ``shape``: the model's
    :class:`~rom_fast.plans.ModelShape` (for :func:`rom_fast.planner.plot_plan`)."""

    plan: plans.RankPlan
    spectra: Optional[Dict[str, "planner.LayerSpectrum"]]
    shape: plans.ModelShape


def plan(model, calibration=None, budget: Optional[float] = None, *, recipe: Optional[str] = None,
         ranks=None, last_k: Optional[int] = None, tokenizer=None, n_samples: int = 512, seq_len: int = 128,
         seed: Optional[int] = 0, batch_size: int = 8, progress: bool = True, planner_samples: int = 128,
         planner_grad_samples: int = planner.DEFAULT_GRAD_SAMPLES, weighting: str = "fisher",
         activation_dtype: Union[str, torch.dtype] = "float32",
         mlp_structure: str = planner.DEFAULT_MLP_STRUCTURE, structures: str = "all") -> PlanResult:
    """The plan :func:`compress` would make with the same arguments, without compressing.

    Arguments as for :func:`compress` (the same checks and refusals, by the same code: one
    :class:`CompressionRun` stopped after its plan). The calibration tokens are read, or
    sampled for ``"generated"``, only when the rank planner runs, after the budget is found
    reachable; the planner's spectra come from the first ``planner_samples`` of the
    ``n_samples`` sequences, as in compress. Nothing is written. Returns a :class:`PlanResult`.
    """
    run = CompressionRun(model, calibration, budget, recipe=recipe, ranks=ranks, last_k=last_k,
                         tokenizer=tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed,
                         batch_size=batch_size, progress=progress, planner_samples=planner_samples,
                         planner_grad_samples=planner_grad_samples, weighting=weighting,
                         activation_dtype=activation_dtype, mlp_structure=mlp_structure, structures=structures)
    run.open_source()
    result, spectra = run.make_plan()
    return PlanResult(result, spectra, run.shape)
