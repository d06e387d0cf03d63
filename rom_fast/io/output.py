"""The output directory of a compression: written block by block, resumable, never half-visible.

Everything is built in ``.<name>.partial`` beside ``out`` and renamed to ``out`` only when
complete. The partial directory is also the run's resume state: each finished block's shard,
the next block's input activations, the plan, the calibration tokens and a fingerprint of the
source, options and calibration, in ``rom_fast_state.json``. Each of these files is written
under a temporary name, flushed to disk and renamed, and the state file is updated last, so at
every instant (Ctrl-C, SIGKILL, the OOM killer, power loss) the state names only complete
files. Rerunning the same command continues from the last finished block and gives the same
tensors, bit for bit, as an uninterrupted run (same machine and thread settings: BLAS
reductions may round differently on other ones); a different command on the same ``out`` is
refused, never mixed.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import torch
from safetensors import safe_open

from rom_fast.io.safetensors_index import INDEX_FILE, read_header, write_safetensors

STATE_FILE = "rom_fast_state.json"
STATE_FORMAT = 1
CALIBRATION_FILE = "rom_fast_calibration.safetensors"
SPECTRA_FILE = "rom_fast_spectra.json"
OUTER_FILE = "model-outer.safetensors"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _durable_replace(tmp: Path, final: Path) -> None:
    """Flushes ``tmp`` to disk, gives it the permissions the umask asks for (safetensors
    writes 0600) and renames it to ``final``."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """A failed write (a full disk, a file size limit) names the file it was writing:
    ``write()`` raises a bare "[Errno 28] No space left on device" otherwise."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with naming(tmp):
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        _durable_replace(tmp, path)


def save_tensors_atomic(path: Path, tensors: Dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with naming(tmp):
        write_safetensors(tmp, tensors, dtype)
        _durable_replace(tmp, path)


def read_tensor_into(path: Path, name: str, out: torch.Tensor) -> None:
    """Reads tensor ``name`` of a safetensors file straight into ``out`` (no second copy in
    memory: the hidden states of a 7B model are a GiB)."""
    info = read_header(path).get(name)
    if info is None or info.shape != tuple(out.shape) or info.torch_dtype != out.dtype or not out.is_contiguous():
        raise ValueError(f"{path}: {name!r} does not match the expected {tuple(out.shape)} {out.dtype}")
    with open(path, "rb") as f:             # read_header checked the offsets against the file
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        begin, _ = header[name]["data_offsets"]
        f.seek(8 + n + begin)
        view = out.view(-1).view(torch.uint8).numpy()
        if f.readinto(memoryview(view)) != view.nbytes:
            raise ValueError(f"{path}: truncated")


def shard_name(name: str, rank: int) -> str:
    """Process ``rank``'s copy of a per-process file of a data-parallel run (process 0's is
    ``name`` itself, so a one-process run's files keep their names)."""
    return name if rank == 0 else name.replace(".safetensors", f".rank{rank}.safetensors")


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def leftovers(out: Path) -> List[Path]:
    """Directories that killed or failed runs for ``out`` left beside it."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir()
                  if p.name.startswith((f".{out.name}.partial", f".{out.name}.old")) and p.is_dir())


def clean(out) -> List[Path]:
    """Removes what interrupted runs left for ``out`` (never ``out`` itself); returns it."""
    removed = leftovers(Path(out))
    for p in removed:
        shutil.rmtree(p)
    return removed


def check_free_space(directory: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OSError(f"{directory}: {what} needs about {needed / 2**30:.2f} GiB of disk, "
                      f"only {free / 2**30:.2f} GiB is free")


def _block_file(i: int) -> str:
    return f"block-{i:05d}.safetensors"


def _hidden_file(i: int) -> str:
    """The saved input hidden states of block i."""
    return f"hidden-{i:05d}.safetensors"


def _params(tensors: Dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


def _differences(a: dict, b: dict) -> List[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def check_replaceable(out: Path, overwrite: bool, source: Optional[Path] = None) -> None:
    """Refuses an output path that must not be written: an existing one without ``overwrite``,
    and even with it anything but a model directory (config.json; an empty directory is fine)
    — ``--out .`` or ``--out ~`` must never delete what is there — or the source itself."""
    out = Path(out)
    if source is not None and out.exists() and Path(source).exists() and out.resolve() == Path(source).resolve():
        raise ValueError(f"--out {out} is the model being compressed; choose another directory")
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if any(out.iterdir()) and not (out / "config.json").is_file():
        raise FileExistsError(f"{out} holds files but is not a model directory (no config.json); "
                              "--overwrite only replaces a model directory: remove it yourself or pick another --out")


class ResumableOutput:
    """The partial output directory and its resume state.

    ``fingerprint`` identifies the run (source, options, calibration): a partial directory
    with another fingerprint is refused. ``restart=True`` discards it instead.

    Data-parallel runs (:mod:`rom_fast.distributed`): this object lives in process 0, which
    writes everything but the other processes' hidden states; ``processes`` says how many
    shards of them there are, and ``synchronize()`` returns once every process has written its
    own (:class:`OutputShard`), before the state names them.
    """

    rank = 0

    def __init__(self, out, fingerprint: dict, command: str, overwrite: bool = False, restart: bool = False,
                 processes: int = 1, synchronize: Optional[Callable[[], None]] = None):
        self.out = Path(out)
        self.partial = self.out.parent / f".{self.out.name}.partial"
        self.fingerprint = json.loads(json.dumps(fingerprint))    # as it reads back from the state
        self.command = command
        self.overwrite = overwrite
        self.processes, self.synchronize = processes, synchronize
        check_replaceable(self.out, overwrite)
        self.state: Optional[dict] = None
        if self.partial.exists() and restart:
            shutil.rmtree(self.partial)
        if self.partial.exists():
            self.state = self._read_state()
            self._check_same_run()
        self._report_leftovers()

    # -- opening ------------------------------------------------------------------------------
    def _check_same_run(self) -> None:
        """Refuses the partial directory of a run with another fingerprint."""
        if self.state.get("fingerprint") == self.fingerprint:
            return
        diff = _differences(self.state.get("fingerprint", {}), self.fingerprint)
        raise ValueError(
            f"{self.out}: an interrupted run of a different command is in {self.partial} "
            f"({self.state.get('blocks_done', 0)} blocks done; it differs in: {', '.join(diff)}; "
            f"started by: {self.state.get('command', '?')}). Rerun that command to resume it, "
            "or pass restart=True / --restart to discard it")

    def _report_leftovers(self) -> None:
        """Names, on stderr, the partial directories other runs for ``out`` left (never removed)."""
        others = [p for p in leftovers(self.out) if p != self.partial]
        if others:
            total = sum(directory_bytes(p) for p in others)
            print(f"rom_fast: {len(others)} leftover(s) of earlier interrupted runs beside {self.out} "
                  f"({total / 2**30:.2f} GiB): {', '.join(p.name for p in others)}; "
                  f"remove them with: rom-fast clean {self.out}", file=sys.stderr)

    def _read_state(self) -> dict:
        path = self.partial / STATE_FILE
        try:
            state = json.loads(path.read_text())
            if state.get("format") != STATE_FORMAT:
                raise ValueError(f"state format {state.get('format')!r}")
            return state
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.partial}: left by an interrupted run but its state is unreadable "
                             f"({exc}); pass restart=True / --restart to discard it, or remove it with: "
                             f"rom-fast clean {self.out}") from None

    # -- a resumed run -------------------------------------------------------------------------
    @property
    def resumed(self) -> bool:
        return self.state is not None

    @property
    def blocks_done(self) -> int:
        return 0 if self.state is None else int(self.state["blocks_done"])

    def calibration(self):
        with safe_open(str(self.partial / CALIBRATION_FILE), framework="pt") as f:
            return f.get_tensor("input_ids"), f.get_tensor("attention_mask")

    def spectra_json(self) -> dict:
        path = self.partial / SPECTRA_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def hidden_path(self) -> Optional[Path]:
        """This process's saved hidden states of the next block, if the state names them."""
        name = None if self.state is None else self.state.get("hidden")
        return None if name is None else self.partial / shard_name(name, self.rank)

    def load_hidden(self, buffer: torch.Tensor) -> None:
        read_tensor_into(self.hidden_path(), "hidden", buffer)

    def block_tensors(self, i: int) -> Dict[str, torch.Tensor]:
        with safe_open(str(self.partial / self.state["blocks"][str(i)]["file"]), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def block_layers(self, i: int) -> dict:
        return self.state["blocks"][str(i)]["layers"]

    # -- a new run ---------------------------------------------------------------------------
    def start(self, plan_json: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              calibration_description: str, spectra: Optional[dict], needed_bytes: int) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        check_free_space(self.out.parent, needed_bytes, f"writing {self.out}")
        self.partial.mkdir()
        save_tensors_atomic(self.partial / CALIBRATION_FILE,
                            {"input_ids": input_ids.contiguous(), "attention_mask": attention_mask.contiguous()})
        if spectra:
            path = self.partial / SPECTRA_FILE
            with naming(path):
                path.write_text(json.dumps(spectra) + "\n")
        self.state = {"format": STATE_FORMAT, "fingerprint": self.fingerprint, "command": self.command,
                      "started": datetime.datetime.now().isoformat(timespec="seconds"),
                      "plan": plan_json, "calibration": calibration_description,
                      "blocks_done": 0, "blocks": {}, "hidden": None, "records": []}
        write_json_atomic(self.partial / STATE_FILE, self.state)

    def commit_block(self, i: int, tensors: Dict[str, torch.Tensor], dtype: torch.dtype, layers: dict,
                     records: List[dict], hidden: Optional[torch.Tensor]) -> None:
        """Block i is finished: its shard (tensors cast to ``dtype`` one at a time), then the
        next block's inputs, then the state."""
        name = _block_file(i)
        save_tensors_atomic(self.partial / name, tensors, dtype)
        previous = self.state.get("hidden")
        hidden_name = None
        if hidden is not None:
            hidden_name = _hidden_file(i + 1)
            save_tensors_atomic(self.partial / hidden_name, {"hidden": hidden})
        if self.synchronize is not None:
            self.synchronize()          # every process's shard is on disk before the state names it
        self._record_block(i, name, layers, _params(tensors), records, hidden_name)
        if previous and previous != hidden_name:
            self._remove_hidden(previous)

    def _record_block(self, i: int, name: str, layers: dict, params: int, records: List[dict],
                      hidden_name: Optional[str]) -> None:
        """Writes the state naming block i's shard and the next block's inputs ``hidden_name``."""
        state = dict(self.state)
        state["blocks"] = dict(state["blocks"], **{str(i): {"file": name, "layers": layers, "params": params}})
        state["blocks_done"] = i + 1
        state["hidden"] = hidden_name
        state["records"] = state["records"] + records
        write_json_atomic(self.partial / STATE_FILE, state)
        self.state = state

    def _remove_hidden(self, name: str) -> None:
        """Deletes every process's shard of the saved hidden states ``name``."""
        for rank in range(self.processes):
            (self.partial / shard_name(name, rank)).unlink(missing_ok=True)

    # -- completion ---------------------------------------------------------------------------
    def finish(self, dense_blocks: Iterable[int], dense_tensors: Callable[[int], Dict[str, torch.Tensor]],
               outer: Dict[str, torch.Tensor], write_metadata: Callable[[Path, int], None]) -> int:
        """Writes the blocks the plan left dense (``dense_tensors(i)``, one at a time), the outer
        tensors and the index, then ``write_metadata(directory, params_saved)`` (config,
        tokenizer, card), and renames the directory into place. Returns the parameters saved."""
        blocks = self._write_dense_blocks(dense_blocks, dense_tensors)
        save_tensors_atomic(self.partial / OUTER_FILE, outer)
        self._write_index(blocks)
        params = sum(e["params"] for e in blocks.values()) + _params(outer)
        with naming(self.partial):          # config, tokenizer and card
            write_metadata(self.partial, params)
        self._remove_resume_files()
        self._move_into_place()
        return params

    def _write_dense_blocks(self, dense_blocks: Iterable[int],
                            dense_tensors: Callable[[int], Dict[str, torch.Tensor]]) -> Dict[str, dict]:
        """Writes the blocks the plan left dense, one at a time; returns every block's entry
        (the state's and theirs)."""
        blocks = dict(self.state["blocks"])
        for i in dense_blocks:
            name = _block_file(i)
            tensors = dense_tensors(i)
            save_tensors_atomic(self.partial / name, tensors)
            blocks[str(i)] = {"file": name, "layers": {}, "params": _params(tensors)}
            del tensors
        return blocks

    def _write_index(self, blocks: Dict[str, dict]) -> None:
        """The safetensors index of the block shards and the outer file, read back from their headers."""
        weight_map, total_bytes = {}, 0
        for entry in sorted(blocks.values(), key=lambda e: e["file"]) + [{"file": OUTER_FILE}]:
            for key, info in read_header(self.partial / entry["file"]).items():
                weight_map[key] = entry["file"]
                total_bytes += info.nbytes
        write_json_atomic(self.partial / INDEX_FILE,
                          {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})

    def _remove_resume_files(self) -> None:
        """Deletes the calibration tokens, the saved hidden states and, last, the state."""
        hidden = self.state.get("hidden")
        for name in [CALIBRATION_FILE] + ([shard_name(hidden, r) for r in range(self.processes)] if hidden else []):
            (self.partial / name).unlink(missing_ok=True)
        (self.partial / STATE_FILE).unlink()
        _fsync_dir(self.partial)

    def _move_into_place(self) -> None:
        """Renames the partial directory to ``out``; a previous ``out`` is moved aside first and
        deleted only once the new one is in place."""
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
            os.replace(self.partial, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.partial, self.out)
        _fsync_dir(self.out.parent)

    def abandon(self) -> None:
        """A run that failed before writing any block leaves nothing behind."""
        if self.partial.exists() and self.blocks_done == 0:
            shutil.rmtree(self.partial, ignore_errors=True)


class OutputShard(ResumableOutput):
    """What a process other than 0 of a data-parallel run keeps of the output: its own shard of
    the hidden states. It reads the state process 0 validated (``state``: its dict, None for
    a new run) and writes nothing else; finishing is process 0's."""

    def __init__(self, out, state: Optional[dict], rank: int, processes: int,
                 synchronize: Callable[[], None]):
        self.out = Path(out)
        self.partial = self.out.parent / f".{self.out.name}.partial"
        self.state = state
        self.rank, self.processes, self.synchronize = rank, processes, synchronize

    def start(self, *args, **kwargs) -> None:
        raise RuntimeError("process 0 starts the output")

    def commit_block(self, i: int, tensors, dtype, layers, records, hidden: Optional[torch.Tensor]) -> None:
        hidden_name = None if hidden is None else _hidden_file(i + 1)
        if hidden is not None:
            save_tensors_atomic(self.partial / shard_name(hidden_name, self.rank), {"hidden": hidden})
        self.synchronize()
        self.state = dict(self.state or {}, blocks_done=i + 1, hidden=hidden_name)

    def finish(self, *args, **kwargs) -> int:
        raise RuntimeError("process 0 finishes the output")

    def abandon(self) -> None:
        pass
