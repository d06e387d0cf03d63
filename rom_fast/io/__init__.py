"""The untrusted-input boundary: every byte rom_fast reads from or writes to disk passes here.

A model directory, a downloaded config.json or a resume state is read as untrusted input:
weights come from safetensors files only (nothing is unpickled, no remote code runs), shard
and file names are confined to the model directory (no ``..``, absolute paths or symlinks out
of it), and every size a header or config asks for (header lengths, tensor byte ranges,
hidden sizes, layer counts, ranks) is checked before anything is allocated. Outputs are
written under a temporary name and renamed into place when complete. The modules here import
nothing above them (no plans, planner, pipeline or api): only each other, ``rom_fast.adapters``,
``rom_fast.lowrank``, ``rom_fast.kernels`` and ``rom_fast.util``. This ``__init__`` imports
nothing.
"""
