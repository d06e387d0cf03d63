"""Shared test helpers (pytest loads this file in every import mode)."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest
import torch
from safetensors import safe_open

# Test-only helper modules beside this file (families.py, reference_rom.py) import by name.
sys.path.insert(0, str(pathlib.Path(__file__).parent))

# The test set-up's convention (never the product's): the prepared data directory beside the
# checkout, ../shared/data, is the data cache (ROM_FAST_DATA) and what the downloader tests
# serve over 127.0.0.1 (ROM_FAST_DATA_SOURCE), unless the user set them. Set before test
# modules are imported: some decide their skips at import.
_SHARED_DATA = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "data"
if _SHARED_DATA.is_dir():
    for _var in ("ROM_FAST_DATA", "ROM_FAST_DATA_SOURCE"):
        os.environ.setdefault(_var, str(_SHARED_DATA))


def saved_tensors(directory: pathlib.Path) -> dict:
    """Every tensor of a saved checkpoint directory, by name."""
    out = {}
    for f in sorted(pathlib.Path(directory).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


class ResumeCheck:
    """Interrupts a resumable run right after it commits block ``after_block``, reruns it, and
    checks that the rerun continued from the next block and wrote the tensors of an
    uninterrupted run, bit for bit."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def __call__(self, run, out: pathlib.Path, uninterrupted: pathlib.Path, *, after_block: int = 1,
                 before_rerun=None):
        from rom_fast.io.output import ResumableOutput
        commit = ResumableOutput.commit_block

        def commit_then_fail(self, i, *args, **kwargs):
            commit(self, i, *args, **kwargs)
            if i == after_block:
                raise KeyboardInterrupt
        self.monkeypatch.setattr(ResumableOutput, "commit_block", commit_then_fail)
        with pytest.raises(KeyboardInterrupt):
            run(out)
        self.monkeypatch.setattr(ResumableOutput, "commit_block", commit)
        if before_rerun is not None:
            before_rerun()
        resumed = run(out)
        assert resumed.summary["resumed_from_block"] == after_block + 1
        a, b = saved_tensors(out), saved_tensors(uninterrupted)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
        return resumed


@pytest.fixture
def resume_check(monkeypatch) -> ResumeCheck:
    return ResumeCheck(monkeypatch)
