"""One process of a data-parallel compression, for tests/test_distributed.py and
tests/test_families.py.

Run with the torch.distributed environment torchrun would set (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT); a WORLD_SIZE of 1 runs one plain process. Arguments: a JSON object of
rom_fast.compress keyword arguments plus "model" (a directory, or "tiny" for the in-memory
tiny LLaMA), "dump" (a directory for this process's results) and optionally "crash_after"
(this process raises once it has saved block N's hidden states: a process dying mid-run); or a
JSON list of such objects, run one after the other in one process group. Calibration token ids
are drawn from the model's own vocabulary.
"""

import json
import os
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import rom_fast
from rom_fast.io import output as output_module

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=160, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def tiny_model(blocks=4):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**TINY, num_hidden_layers=blocks, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).eval()


def calibration(n=40, seq=24, vocab=TINY["vocab_size"]):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    mask[29, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run(args: dict) -> None:
    rank = int(os.environ.get("RANK", "0"))
    dump = Path(args.pop("dump"))
    crash_after = args.pop("crash_after", None)
    model = args.pop("model")
    vocab = TINY["vocab_size"]
    if model == "tiny":
        model = tiny_model()
    else:   # a directory of another tiny model: token ids it has
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    if crash_after is not None and rank == 1:
        commit = output_module.OutputShard.commit_block

        def commit_then_die(self, i, *a, **kw):
            commit(self, i, *a, **kw)
            if i == crash_after:
                raise RuntimeError("simulated failure of process 1")
        output_module.OutputShard.commit_block = commit_then_die
    calib = calibration(vocab=vocab)
    result = rom_fast.compress(model, calibration=calib, n_samples=40, seq_len=24, progress=False, **args)
    test_ids = torch.randint(0, vocab, (3, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = result.model(test_ids).logits
    state = {k: v.clone() for k, v in result.model.state_dict().items() if "rotary" not in k and k != "lm_head.weight"}
    state["logits"] = logits.contiguous()
    dump.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dump / f"rank{rank}.safetensors"))
    if rank == 0:
        (dump / "result.json").write_text(json.dumps({"ranks": result.plan.ranks, "summary": result.summary},
                                                     default=str))



def main():
    jobs = json.loads(sys.argv[1])
    if isinstance(jobs, dict):
        run(jobs)
        return
    # A list: every run in one process group this process sets up (and rom_fast leaves alone),
    # so many tiny models pay the processes' start-up once.
    import datetime
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        timeout = float(os.environ.get("ROM_FAST_DIST_TIMEOUT", "60"))
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    try:
        for job in jobs:
            run(job)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
