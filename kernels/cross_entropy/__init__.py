"""Fused linear + cross-entropy: per-token NLL from hidden states and the logit head, never ``N x V`` logits.

``head.py`` the logit head as data, ``reference.py`` the chunked plain-PyTorch reference,
``triton_linear_cross_entropy.py`` the chunked Triton path (cuBLAS matmuls around a kernel that takes the loss and
the logits' gradient in the forward pass), ``function.py`` the autograd function and the public
``linear_cross_entropy``.
"""

from lce.kernels.cross_entropy.function import linear_cross_entropy
from lce.kernels.cross_entropy.head import LogitHead
from lce.kernels.cross_entropy.reference import IGNORE_INDEX, linear_cross_entropy_ref

__all__ = ["IGNORE_INDEX", "LogitHead", "linear_cross_entropy", "linear_cross_entropy_ref"]
