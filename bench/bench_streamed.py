"""The big-model workflow on a LLaMA-7B-shaped directory, as a user runs it: plan, compress
(with the planner), eval, and a run killed with SIGKILL then resumed, each command in its own
process through the installed CLI, with its peak RSS (wait4) and wall time.

  python bench/bench_streamed.py --blocks 4 --n-samples 256 --seq-len 128
  python bench/bench_streamed.py --blocks 4 --n-samples 256 --seq-len 128 --activation-dtype float32
  python bench/bench_streamed.py --blocks 2 --n-samples 512 --seq-len 128 --skip-kill --skip-eval

The directory comes from bench/synth_llama.py (random bf16 weights, real shapes, a locally
trained tokenizer); calibration is the local Wikipedia text tokenized with it. The planner's
time per block is read from the compress summary (planner_* stages) against the compression
stages of the same run. Results go to bench/results/streamed_<blocks>x<n_samples>_<activation dtype>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from synth_llama import write_llama7b_shaped  # noqa: E402

GIB = 2 ** 30


def run(cmd, kill_when=None):
    """(exit status, peak RSS bytes, seconds, stdout) of one command in its own process;
    ``kill_when()`` polled every 0.2 s sends SIGKILL when it turns true."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if kill_when is not None:
        while proc.poll() is None:
            if kill_when():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.2)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, time.perf_counter() - t0, out


def tensors(directory):
    from safetensors import safe_open
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--n-samples", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--budget", type=float, default=0.8)
    p.add_argument("--activation-dtype", default="float16", choices=["float32", "float16", "bfloat16"],
                   help="as the README's big-model commands (default float16)")
    p.add_argument("--workdir", default="/tmp/rom_fast_bench")
    p.add_argument("--skip-kill", action="store_true")
    p.add_argument("--skip-eval", action="store_true")
    a = p.parse_args()

    os.makedirs(a.workdir, exist_ok=True)
    src = str(write_llama7b_shaped(os.path.join(a.workdir, f"llama7b-{a.blocks}"), a.blocks))
    out = os.path.join(a.workdir, f"rom-{a.blocks}")
    for d in (out, out + "-killed"):
        shutil.rmtree(d, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "rom_fast", "clean", out], check=False, capture_output=True)
    subprocess.run([sys.executable, "-m", "rom_fast", "clean", out + "-killed"], check=False, capture_output=True)
    cli = [sys.executable, "-m", "rom_fast"]
    calib = ["--calibration", "wiki", "--seq-len", str(a.seq_len), "--activation-dtype", a.activation_dtype]
    rows = {"blocks": a.blocks, "n_samples": a.n_samples, "seq_len": a.seq_len, "budget": a.budget,
            "activation_dtype": a.activation_dtype,
            "command": "python bench/bench_streamed.py " + " ".join(sys.argv[1:])}

    cmd = cli + ["plan", src, "--budget", str(a.budget), "--n-samples", "128", *calib,
                 "--json", os.path.join(a.workdir, "plan.json")]
    rc, peak, sec, _ = run(cmd)
    rows["plan"] = {"exit": rc, "peak_rss_bytes": peak, "seconds": sec, "command": " ".join(cmd[2:])}
    print(f"plan:     exit {rc}, peak {peak / GIB:.2f} GiB, {sec:.0f} s", flush=True)

    compress = cli + ["compress", src, "--budget", str(a.budget), "--n-samples", str(a.n_samples), *calib,
                      "--eval-windows", "0"]
    rc, peak, sec, _ = run(compress + ["--out", out])
    summary = json.loads(open(os.path.join(out, "config.json")).read())["rom_fast"]["summary"]
    s = summary["seconds"]
    planner_s = sum(v for k, v in s.items() if k.startswith("planner_") and k != "planner_statistics")
    compress_s = sum(s.get(k, 0.0) for k in ("capture", "load", "forward", "statistics", "factorize", "write"))
    rows["compress"] = {"exit": rc, "peak_rss_bytes": peak, "seconds": sec, "summary": summary,
                        "planner_seconds_per_block": planner_s / a.blocks,
                        "compress_seconds_per_block": compress_s / a.blocks,
                        "command": " ".join(compress[2:] + ["--out", out])}
    cfg = json.loads(open(os.path.join(out, "config.json")).read())
    print(f"compress: exit {rc}, peak {peak / GIB:.2f} GiB, {sec:.0f} s; plan kind "
          f"{cfg['rom_fast']['plan']['details']['kind']}; {summary['params_before']:,} -> "
          f"{summary['params_after']:,} ({summary['ratio']:.1%}); per block: planner {planner_s / a.blocks:.1f} s, "
          f"compression {compress_s / a.blocks:.1f} s ({planner_s / compress_s:.0%})", flush=True)

    if not a.skip_eval:
        cmd = cli + ["eval", out, "--max-windows", "8", "--window", "512"]
        rc, peak, sec, text = run(cmd)
        rows["eval"] = {"exit": rc, "peak_rss_bytes": peak, "seconds": sec, "output": text.strip(),
                        "command": " ".join(cmd[2:])}
        print(f"eval:     exit {rc}, peak {peak / GIB:.2f} GiB, {sec:.0f} s: {text.strip()}", flush=True)

    if not a.skip_kill and a.blocks >= 3:
        killed = out + "-killed"
        state = os.path.join(os.path.dirname(killed), f".{os.path.basename(killed)}.partial", "rom_fast_state.json")

        def two_blocks_done():
            try:
                return json.loads(open(state).read())["blocks_done"] >= 2
            except (OSError, ValueError):
                return False

        rc, peak, sec, _ = run(compress + ["--out", killed], kill_when=two_blocks_done)
        done = json.loads(open(state).read())["blocks_done"]
        rc2, peak2, sec2, _ = run(compress + ["--out", killed])
        resumed = json.loads(open(os.path.join(killed, "config.json")).read())["rom_fast"]["summary"]
        x, y = tensors(out), tensors(killed)
        identical = x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)
        rows["kill_resume"] = {"killed_exit": rc, "blocks_done_at_kill": done, "killed_seconds": sec,
                               "resume_exit": rc2, "resume_peak_rss_bytes": peak2, "resume_seconds": sec2,
                               "resumed_from_block": resumed["resumed_from_block"],
                               "bitwise_identical": identical}
        print(f"kill:     SIGKILL at {done} blocks done after {sec:.0f} s; rerun exit {rc2}, {sec2:.0f} s, "
              f"resumed after block {resumed['resumed_from_block']}, peak {peak2 / GIB:.2f} GiB; "
              f"tensors bitwise identical to the uninterrupted run: {identical}", flush=True)

    path = os.path.join(ROOT, "bench", "results", f"streamed_{a.blocks}x{a.n_samples}_{a.activation_dtype}.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=2, default=str)
    print(f"written {path}")


if __name__ == "__main__":
    main()
