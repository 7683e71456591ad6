"""Attention over selected key blocks (the core of MoBA, NSA's selected branch and Quest-style top-k): the readable
reference and the two PyTorch forms, key-block-major and masked (``reference.py``), Triton kernels
(``triton_selected.py``), public op (``function.py``)."""

from lce.kernels.selected_attention.function import selected_attention
from lce.kernels.selected_attention.reference import (
    selected_attention_chunked,
    selected_attention_masked,
    selected_attention_reference,
    selection_mask,
)

__all__ = ["selected_attention", "selected_attention_chunked", "selected_attention_masked",
           "selected_attention_reference", "selection_mask"]
