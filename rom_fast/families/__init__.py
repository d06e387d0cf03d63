"""Model families: one module per family, each defining and registering its adapter
(:func:`rom_fast.adapters.register`). Every module in this package is imported here, so
adding a family is adding its module (and its tiny case in tests/families.py).
"""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
