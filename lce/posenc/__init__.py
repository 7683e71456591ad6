"""Position encodings, one module per family of methods, registered by name in ``POSENCS``."""

from lce.posenc.base import POSENCS, PosEnc
from lce.posenc import nope, rope  # noqa: F401  (registers the methods)

__all__ = ["POSENCS", "PosEnc"]
