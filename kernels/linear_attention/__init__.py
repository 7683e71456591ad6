"""Chunked causal linear attention: references and the PyTorch chunkwise form (``reference.py``), Triton kernels
(``triton_chunk.py``), autograd function and public op (``function.py``)."""

from lce.kernels.linear_attention.function import linear_attention
from lce.kernels.linear_attention.reference import (
    linear_attention_chunked_ref,
    linear_attention_final_state,
    linear_attention_parallel,
)

__all__ = ["linear_attention", "linear_attention_chunked_ref", "linear_attention_final_state",
           "linear_attention_parallel"]
