"""The untrusted-input boundary: every byte rom_fast reads from or writes to disk passes here.

A model directory, a downloaded config.json or a resume state is read as untrusted input:
weights come from safetensors files only (nothing is unpickled, no remote code runs), shard
and file names are confined to the model directory (no ``..``, absolute paths or symlinks out
of it), and every size a header or config asks for (header lengths, tensor byte ranges,
hidden sizes, layer counts, ranks) is checked before anything is allocated. Outputs are
written under a temporary name and renamed into place only when complete.

The layering is one-way, each module importing only those listed before it, at top level:
:mod:`~rom_fast.io.safetensors_index` (the format, header checks, ``CheckpointError``),
:mod:`~rom_fast.io.output` (the resumable output directory and its file names),
:mod:`~rom_fast.io.units` (a streamed block's routed units, read when needed and kept narrow),
:mod:`~rom_fast.io.models` (GGUF files and the embedded SmolLM2),
:mod:`~rom_fast.io.checkpoint` (config.json checks, the ``rom_fast_<base>`` classes, the
metadata written), then :mod:`~rom_fast.io.sources` (block sources, ``open_source`` and
``load``, which need both a checked config and a streamed skeleton). Nothing here imports a
module above it (plans, planner, pipeline, api, cli...): only ``rom_fast.adapters``,
``rom_fast.lowrank``, ``rom_fast.kernels`` and ``rom_fast.util``. Beside them,
:mod:`~rom_fast.io.data` (the evaluation/calibration data: cache directory, manifest of public
files with sizes and sha256, downloader) uses the standard library only. This ``__init__``
imports nothing.
"""
