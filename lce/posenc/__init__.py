"""Position encodings, one module per family of methods, registered by name in ``POSENCS``.

Every module of this package is imported here, so adding a method is adding its module (no list to edit).
"""

import importlib
import pkgutil

from lce.posenc.base import POSENCS, PosEnc, SegmentMethod

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["POSENCS", "PosEnc", "SegmentMethod"]
