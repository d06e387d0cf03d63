"""GGUF export for llama.cpp: a model made of standard structures as one GGUF file.

A plan of dense layers and kept MLP neurons (``PrunedLinear``) is an ordinary LLaMA-form
network whose blocks differ in width. llama.cpp runs such a network under its ``deci``
architecture (DeciLM / Nemotron-NAS), the one whose loader and graph read every block's width
from the per-layer arrays ``deci.feed_forward_length``, ``deci.attention.head_count`` and
``deci.attention.head_count_kv``. Its ``llama`` architecture accepts those keys as arrays too,
but sizes every block's tensors by the first entry (``hparams.n_ff()``, layer 0), so it is
written only when all blocks have the same widths (a dense model). Both use the same graph:
RMS-normed pre-norm blocks, SwiGLU MLPs, and the rotary embedding on consecutive pairs, for
which q/k rows are permuted from Hugging Face's half-split layout (as convert_hf_to_gguf.py
does). Kept attention heads will slot in through the same widths: a block's head counts are
read from its q/k/v/o shapes.

Low-rank factors (``LowRankLinear``) have no GGUF form and are refused. Tensors are written
as ``--quant`` asks where the ``gguf`` package can quantize them (its numpy quantizers: F32,
F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0; the K-quants it can only read). A quantized type
packs a row in blocks of 32 values, and a pruned ``ffn_down``'s rows are its k kept neurons:
an MLP is padded with zero neurons to whole blocks (zero gate/up rows, zero down columns:
exactly the same outputs); any other matrix whose rows are not whole blocks falls back to F16.
The file is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from rom_fast.lowrank import LowRankLinear
from rom_fast.io.models import smollm2_gguf_path
from rom_fast.io.sources import DirectorySource, block_state, open_source

# The block form llama.cpp's llama/deci graphs compute (plain LLaMA blocks: no post-norms, no
# routed MLPs, SiLU-gated MLPs, one rotary base).
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
# --quant name: (GGML type, general.file_type); only types gguf.quants can write.
QUANT_NAMES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
FALLBACK = "f16"            # for a matrix whose rows do not fill the quant type's blocks


def _ggml(name: str):
    import gguf
    return gguf.GGMLQuantizationType[name.upper()]


def _file_type(name: str) -> int:
    import gguf
    return int(gguf.LlamaFileType.ALL_F32 if name == "f32" else gguf.LlamaFileType[f"MOSTLY_{name.upper()}"])


@dataclass(frozen=True)
class BlockWidths:
    """One block's sizes as llama.cpp reads them per layer."""
    n_ff: int
    n_head: int
    n_head_kv: int


@dataclass(frozen=True)
class TensorSpec:
    """One GGUF tensor: its name, the model's parameter it holds, its shape (rows, columns as
    the model stores it), its GGML type, the head count of a q/k permutation (0: none), and
    whether the parameter may be narrower (an MLP's, padded with zero neurons)."""
    name: str
    key: str
    shape: Tuple[int, ...]
    qtype: str
    permute_heads: int = 0
    pad: bool = False


@dataclass
class ExportResult:
    """What :func:`export_gguf` wrote."""
    path: Path
    arch: str
    quant: str
    widths: List[BlockWidths]
    tensor_types: Dict[str, int]                     # {GGML type: tensors written in it}
    fallbacks: List[str] = field(default_factory=list)   # tensors written in FALLBACK instead
    padded: List[int] = field(default_factory=list)      # blocks whose MLP got zero neurons
    tokenizer: str = ""
    notes: List[str] = field(default_factory=list)


def check_family(config) -> List[str]:
    """Refuses (ValueError) a model whose block llama.cpp's llama/deci graph does not compute;
    returns notes on what it computes differently but equally for short contexts."""
    base = config.model_type[len("rom_fast_"):] if config.model_type.startswith("rom_fast_") else config.model_type
    if base not in SUPPORTED_TYPES:
        raise ValueError(f"GGUF export supports {', '.join(SUPPORTED_TYPES)} models, not {base!r}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"GGUF export needs SiLU-gated MLPs; this model's hidden_act is {config.hidden_act!r}")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"GGUF export writes the default rotary embedding; this model's rope_type is "
                         f"{rope.get('rope_type')!r}")
    notes = []
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        notes.append(f"llama.cpp attends to the whole context: the model's {window}-token sliding window "
                     f"is not applied (identical up to {window} tokens)")
    return notes


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def block_widths(adapter, config) -> List[BlockWidths]:
    """Every block's (n_ff, n_head, n_head_kv) from its modules' shapes (a skeleton's suffice),
    after refusing any structure GGUF cannot hold: a low-rank layer is named, with the fix."""
    hd = head_dim(config)
    attn, mlp = adapter.attention, adapter.mlp
    if attn.post_norm or mlp.post_norm or mlp.units:
        raise ValueError("GGUF export writes plain pre-norm blocks: this family has post-norms or routed MLPs")
    widths = []
    for i, block in enumerate(adapter.blocks()):
        prefix = adapter.block_prefix(i)
        for rel in attn.linears + mlp.linears:
            module = block.get_submodule(rel)
            if isinstance(module, LowRankLinear):
                raise ValueError(f"{prefix}{rel} is a low-rank layer (rank {module.rank}), which GGUF cannot "
                                 "hold: compress with --structures standard (dense layers and kept neurons)")
            if not isinstance(module, nn.Linear):
                raise ValueError(f"{prefix}{rel} is a {type(module).__name__}, not a linear layer GGUF can hold")
        q, k, v, o = (block.get_submodule(n) for n in attn.inputs + (attn.output,))
        gate, up, down = (block.get_submodule(n) for n in mlp.inputs + (mlp.output,))
        n_head, n_kv = q.out_features // hd, k.out_features // hd
        if (q.out_features % hd or k.out_features % hd or v.out_features != k.out_features
                or o.in_features != q.out_features or n_kv == 0 or n_head % n_kv):
            raise ValueError(f"{prefix}: attention of q {q.out_features}, k {k.out_features}, v {v.out_features} "
                             f"rows is not whole heads of {hd} with a whole number of query heads per kv head")
        if not gate.out_features == up.out_features == down.in_features:
            raise ValueError(f"{prefix}: MLP widths differ (gate {gate.out_features}, up {up.out_features}, "
                             f"down reads {down.in_features})")
        widths.append(BlockWidths(down.in_features, n_head, n_kv))
    return widths


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """q/k rows from the half-split rotary layout (Hugging Face: a head's pairs are (j, j + d/2))
    to consecutive pairs (llama.cpp's llama/deci: (2j, 2j + 1)), as convert_hf_to_gguf.py does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- tensors ------------------------------------------------------------------------------------
def tensor_type(shape: Tuple[int, ...], quant: str) -> str:
    """A tensor's GGML type: vectors (norms, biases) in F32, as llama.cpp keeps them; a matrix
    in ``quant`` when its rows fill whole blocks of it, else in FALLBACK."""
    import gguf
    if len(shape) == 1:
        return "f32"
    block = gguf.GGML_QUANT_SIZES[_ggml(quant)][0]
    return quant if shape[-1] % block == 0 else FALLBACK


def tensor_nbytes(shape: Tuple[int, ...], qtype: str) -> int:
    import gguf
    block, size = gguf.GGML_QUANT_SIZES[_ggml(qtype)]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def padded_widths(widths: List[BlockWidths], quant: str) -> List[BlockWidths]:
    """The widths written: each MLP's neurons rounded up to whole blocks of ``quant``."""
    import gguf
    block = gguf.GGML_QUANT_SIZES[_ggml(quant)][0]
    return [BlockWidths(-(-w.n_ff // block) * block, w.n_head, w.n_head_kv) for w in widths]


def _module_specs(gguf_prefix: str, names, block: nn.Module, prefix: str, quant: str, heads,
                  pad_axes=None, width: int = 0) -> List[TensorSpec]:
    """The weight and bias of each module, a parameter's ``pad_axes`` entry (an axis, or None)
    widened to ``width``."""
    out = []
    for (gguf_name, rel), n_head, axis in zip(names, heads, pad_axes or [None] * len(heads)):
        module = block.get_submodule(rel)
        for part in ("weight", "bias"):
            p = getattr(module, part, None)
            if p is not None:
                shape = list(p.shape)
                if axis is not None and axis < len(shape):
                    shape[axis] = width
                out.append(TensorSpec(f"{gguf_prefix}{gguf_name}.{part}", f"{prefix}{rel}.{part}", tuple(shape),
                                      tensor_type(tuple(shape), quant), n_head, pad=pad_axes is not None))
    return out


def tensor_specs(adapter, widths: List[BlockWidths], quant: str) -> List[TensorSpec]:
    """Every GGUF tensor in file order, from the model's module shapes (a skeleton's suffice):
    token_embd, output_norm, output (an untied head), then each block's tensors by role, the
    MLP's at the written width ``widths[i].n_ff`` (see :func:`padded_widths`)."""
    model = adapter.model
    outer = [("token_embd", adapter.embedding_path), ("output_norm", adapter.final_norm_path)]
    if not adapter.tied():
        outer.append(("output", adapter.head_path))
    specs = []
    for gguf_name, path in outer:
        shape = tuple(model.get_submodule(path).weight.shape)
        specs.append(TensorSpec(f"{gguf_name}.weight", f"{path}.weight", shape, tensor_type(shape, quant)))
    attn, mlp = adapter.attention, adapter.mlp
    for i, (block, w) in enumerate(zip(adapter.blocks(), widths)):
        pre, gp = adapter.block_prefix(i), f"blk.{i}."
        specs += _module_specs(gp, [("attn_norm", attn.norm)], block, pre, quant, [0])
        specs += _module_specs(gp, zip(("attn_q", "attn_k", "attn_v", "attn_output"), attn.inputs + (attn.output,)),
                               block, pre, quant, [w.n_head, w.n_head_kv, 0, 0])
        specs += _module_specs(gp, [("ffn_norm", mlp.norm)], block, pre, quant, [0])
        specs += _module_specs(gp, zip(("ffn_gate", "ffn_up", "ffn_down"), mlp.inputs + (mlp.output,)),
                               block, pre, quant, [0, 0, 0], pad_axes=[0, 0, 1], width=w.n_ff)
    return specs


def tensor_data(spec: TensorSpec, tensor: torch.Tensor) -> np.ndarray:
    """The bytes GGUF stores for ``tensor``: float32 values (q/k rows permuted for the rotary
    layout; zeros where the spec is wider: padded neurons), converted to the spec's type."""
    from gguf import quants
    if tuple(tensor.shape) != spec.shape and not (
            spec.pad and tensor.ndim == len(spec.shape) and all(a <= b for a, b in zip(tensor.shape, spec.shape))):
        raise ValueError(f"{spec.key} has shape {list(tensor.shape)}, its module {list(spec.shape)}")
    data = tensor.detach().to(torch.float32).contiguous().numpy()
    if data.shape != spec.shape:
        data = np.pad(data, [(0, b - a) for a, b in zip(data.shape, spec.shape)])
    if spec.permute_heads:
        data = permute_rope(data, spec.permute_heads)
    if spec.qtype == "f32":
        return np.ascontiguousarray(data, dtype=np.float32)
    if spec.qtype == "f16":
        return data.astype(np.float16)
    return quants.quantize(data, _ggml(spec.qtype))


# -- metadata -----------------------------------------------------------------------------------
def architecture(widths: List[BlockWidths]) -> str:
    """``llama`` when every block has the first one's widths, else ``deci`` (per-layer widths)."""
    return "llama" if all(w == widths[0] for w in widths) else "deci"


def write_hparams(writer, config, widths: List[BlockWidths], n_vocab: int, quant: str, name: str) -> None:
    """The architecture's keys; a per-layer width as an array where blocks differ in it (llama.cpp
    reads either form for every architecture), else as one number."""
    import gguf

    def per_layer(values: List[int]):
        return values[0] if len(set(values)) == 1 else values

    hd = head_dim(config)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(len(widths))
    writer.add_feed_forward_length(per_layer([w.n_ff for w in widths]))
    writer.add_head_count(per_layer([w.n_head for w in widths]))
    writer.add_head_count_kv(per_layer([w.n_head_kv for w in widths]))
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def tokenizer_gguf_of(model, config) -> Optional[Path]:
    """The GGUF whose tokenizer the model came with: the model itself ('smollm2', a .gguf), or
    the GGUF source a compressed directory's config.json names, where it is present."""
    names = [model] if isinstance(model, (str, os.PathLike)) else []
    source = (getattr(config, "rom_fast", None) or {}).get("source")
    names += [source] if isinstance(source, str) else []
    for name in names:
        if str(name) == "smollm2":
            try:
                return smollm2_gguf_path()
            except FileNotFoundError:
                continue
        if str(name).lower().endswith(".gguf") and Path(name).is_file():
            return Path(name)
    return None


def copy_tokenizer(writer, path: Path, n_vocab: int) -> None:
    """Every ``tokenizer.*`` key of GGUF ``path``, as stored (strings as their bytes)."""
    from gguf import GGUFReader, GGUFValueType
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable GGUF file ({exc})") from None
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != n_vocab:
        raise ValueError(f"{path}: its tokenizer has {0 if tokens is None else len(tokens.data)} tokens, "
                         f"the model's embedding {n_vocab} rows")
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = f.types[0]
        if kind == GGUFValueType.ARRAY:
            sub = f.types[-1]
            value = [bytes(f.parts[i]) for i in f.data] if sub == GGUFValueType.STRING else f.contents()
            writer.add_key_value(key, value, kind, sub)
        else:
            writer.add_key_value(key, bytes(f.parts[-1]) if kind == GGUFValueType.STRING else f.contents(), kind)


def hf_tokenizer(writer, directory: Path, n_vocab: int, pre: str) -> None:
    """A GPT-2-style byte-level BPE tokenizer from ``tokenizer.json`` (as convert_hf_to_gguf.py
    writes one: special added tokens CONTROL, other added ones USER_DEFINED, ids the
    tokenizer lacks padded as UNUSED ``[PADi]``), its merges and special ids by gguf's
    SpecialVocab, and the pre-tokenizer name ``pre``."""
    import gguf
    path = directory / "tokenizer.json"
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
        model, decoder = tj["model"], tj.get("decoder") or {}
        byte_level = model["type"] == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel"
        vocab, added = dict(model["vocab"]), list(tj.get("added_tokens") or [])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a readable tokenizer.json ({exc})") from None
    if not byte_level:
        raise ValueError(f"{path}: only GPT-2-style byte-level BPE tokenizers are converted; pass the "
                         "tokenizer of a GGUF of this model with --tokenizer-gguf")
    tokens, types = [f"[PAD{i}]" for i in range(n_vocab)], [gguf.TokenType.UNUSED] * n_vocab
    entries = [(t, i, gguf.TokenType.NORMAL) for t, i in vocab.items()] + \
        [(a["content"], a["id"], gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
         for a in added]
    for text, i, kind in entries:
        if not (isinstance(i, int) and 0 <= i < n_vocab and isinstance(text, str)):
            raise ValueError(f"{path}: token {text!r} has id {i!r}, outside the model's {n_vocab} embedding rows")
        tokens[i], types[i] = text, kind
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    try:        # merges, special token ids, add_bos/eos and the chat template, by gguf's reader
        special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=n_vocab)
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ValueError(f"{directory}: its tokenizer files cannot be read ({exc})") from None
    special.add_to_gguf(writer, quiet=True)


def write_tokenizer(writer, model, config, n_vocab: int, tokenizer_gguf, pre: Optional[str],
                    notes: List[str]) -> str:
    """The tokenizer keys: copied from ``tokenizer_gguf``, else from the GGUF the model came
    from, else converted from the directory's tokenizer.json (pre-tokenizer ``pre``, default
    "default"). Returns where they came from."""
    if tokenizer_gguf is not None:
        if not Path(tokenizer_gguf).is_file():
            raise ValueError(f"--tokenizer-gguf {tokenizer_gguf}: no such file")
        gguf_path = Path(tokenizer_gguf)
    else:
        gguf_path = tokenizer_gguf_of(model, config)
    if gguf_path is not None:
        if pre is not None:
            raise ValueError("--tokenizer-pre names the pre-tokenizer of a tokenizer.json converted here; this "
                             f"export copies {gguf_path}'s tokenizer, its pre-tokenizer included")
        copy_tokenizer(writer, gguf_path, n_vocab)
        return f"copied from {gguf_path}"
    directory = Path(model) if isinstance(model, (str, os.PathLike)) and Path(model).is_dir() else None
    if directory is None or not (directory / "tokenizer.json").is_file():
        raise ValueError(f"{model}: no tokenizer.json and no GGUF source to take the tokenizer from; "
                         "pass one with --tokenizer-gguf FILE")
    hf_tokenizer(writer, directory, n_vocab, pre or "default")
    if pre is None:
        notes.append("tokenizer.ggml.pre is 'default': llama.cpp splits text by its default rules; name the "
                     "model's pre-tokenizer with --tokenizer-pre (e.g. smollm, llama-bpe, qwen2) or copy a "
                     "GGUF's tokenizer with --tokenizer-gguf")
    return f"converted from {directory / 'tokenizer.json'}"


def write_tensors(writer, source, specs: List[TensorSpec]) -> None:
    """Every tensor's data in file order, one block in memory at a time."""
    adapter = source.adapter
    outer = source.outer_tensors()
    loaded, state = None, {}
    for spec in specs:
        i = adapter.block_index(spec.key)
        if i is not None and i != loaded:
            if loaded is not None:
                source.release_block(loaded)
            state, loaded = block_state(source.load_block(i), adapter.block_prefix(i)), i
        writer.write_tensor_data(tensor_data(spec, outer[spec.key] if i is None else state[spec.key]))
    if loaded is not None:
        source.release_block(loaded)


def export_gguf(model, path, quant: str = "f32", *, tokenizer_gguf=None, tokenizer_pre: Optional[str] = None,
                overwrite: bool = False) -> ExportResult:
    """Writes ``model`` (what :func:`rom_fast.open_source` opens: a directory written by
    ``rom-fast compress``, checked as untrusted input and streamed block by block; a Hugging
    Face directory; a .gguf file; "smollm2") as GGUF file ``path`` for llama.cpp, matrices in
    ``quant`` (:data:`QUANT_NAMES`). Refuses low-rank layers. See the module docstring."""
    import gguf
    if quant not in QUANT_NAMES:
        raise ValueError(f"--quant must be one of {', '.join(QUANT_NAMES)} (the types the gguf package "
                         f"writes), got {quant!r}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists; pass --overwrite to replace it")
    is_dir = isinstance(model, (str, os.PathLike)) and Path(model).is_dir()
    # A directory is checked and streamed; its tokenizer files are read here, not by transformers.
    source = DirectorySource(Path(model), read_tokenizer=False) if is_dir else open_source(model)
    config = source.config
    notes = check_family(config)
    kept = block_widths(source.adapter, config)
    widths = padded_widths(kept, quant)
    specs = tensor_specs(source.adapter, widths, quant)
    n_vocab = specs[0].shape[0]
    writer = gguf.GGUFWriter(None, architecture(widths))
    write_hparams(writer, config, widths, n_vocab, quant, Path(source.name).name)
    plan = (getattr(config, "rom_fast", None) or {}).get("plan") or {}
    if isinstance(plan.get("description"), str):
        writer.add_description(f"rom_fast: {plan['description']}")
    tokenizer = write_tokenizer(writer, model, config, n_vocab, tokenizer_gguf, tokenizer_pre, notes)
    for s in specs:
        writer.add_tensor_info(s.name, s.shape, np.dtype(np.float32), tensor_nbytes(s.shape, s.qtype),
                               raw_dtype=_ggml(s.qtype))
    partial = path.with_name(f".{path.name}.partial")
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        write_tensors(writer, source, specs)
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    types: Dict[str, int] = {}
    for s in specs:
        types[s.qtype] = types.get(s.qtype, 0) + 1
    fallbacks = [s.name for s in specs if len(s.shape) == 2 and s.qtype != quant]
    padded = [i for i, (a, b) in enumerate(zip(kept, widths)) if a != b]
    return ExportResult(path, writer.arch, quant, widths, types, fallbacks, padded, tokenizer, notes)


__all__ = ["BlockWidths", "ExportResult", "QUANT_NAMES", "SUPPORTED_TYPES", "TensorSpec", "block_widths",
           "check_family", "export_gguf", "permute_rope", "tensor_specs"]
