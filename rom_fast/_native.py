"""Loads the native core, after the BLAS/LAPACK it links against.

The extension needs ``libscipy_openblas.so`` from the ``scipy-openblas32`` wheel. Loading it
first with RTLD_GLOBAL lets the dynamic linker resolve the extension's dependency by soname
wherever pip put the two packages (site-packages, user site, --target).
"""

from __future__ import annotations

import ctypes
import os


def _preload_openblas() -> None:
    # OpenBLAS worker threads busy-wait 2^28 cycles (~0.1 s) after each call before sleeping.
    # rom_fast alternates BLAS calls with torch forwards on the same cores, so that spinning
    # stole a core from every forward: 2^4 cycles made SmolLM2 compression 29% faster
    # (bench/README.md). Read once, when the library loads; a user's setting wins.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    try:
        import scipy_openblas32
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ImportError(
            "rom_fast needs the scipy-openblas32 package (BLAS/LAPACK): pip install scipy-openblas32"
        ) from exc
    lib_dir = scipy_openblas32.get_lib_dir()
    try:
        name = scipy_openblas32.get_library(fullname=True)
    except TypeError:  # older wheels (0.3.27) have no fullname: find the library file itself
        name = next(f for f in sorted(os.listdir(lib_dir))
                    if f.startswith("libscipy_openblas") and f.endswith((".so", ".dylib", ".dll")))
    path = os.path.join(lib_dir, name)
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


_preload_openblas()

try:
    from rom_fast import _core  # noqa: E402
except ImportError as exc:
    # The usual cause: Python found the source tree (e.g. run from the repository root) before
    # the installed package, and the source tree has no built extension.
    here = os.path.dirname(os.path.abspath(__file__))
    raise ImportError(
        f"rom_fast's native core (_core) is not built in {here}: this is probably the source tree "
        "shadowing the installed package; run from another directory, or build it in place with "
        "`pip install -e . --no-build-isolation`") from exc

__all__ = ["_core"]
