"""Sequence packing with explicit document boundaries: which document each token is in, its position inside that
document, and the attention mask that keeps documents apart.

The training stream joins documents with ``eos``; a block cut from it may hold the end of one document, whole
documents and the start of another. With ``train.pack_documents`` every token attends only to earlier tokens of its
own document and its position id restarts at 0 where its document starts in the block. The mask is built here and
passed to the model as a 4-D tensor: transformers is never left to infer boundaries from jumps in the position ids
(its ``find_packed_sequence_indices``, which runs when no mask is given and would also cut a PoSE sequence at its
position skip).

``eos`` belongs to the document it ends. The prediction made at an ``eos`` (the first token of the next document,
from a context the mask has just cut off) is not scored.
"""

from __future__ import annotations

import torch

from lce.errors import ConfigError

#: Attention implementations that take a 4-D ``[B, 1, Tq, Tk]`` mask: boolean (True = may attend) for SDPA and
#: lce's own functions (registered with transformers' SDPA mask), additive float for eager.
FOUR_D_MASK_IMPLEMENTATIONS = ("sdpa", "eager")


def document_ids(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Index of the document each input token belongs to ``[B, T] -> [B, T]`` int64, 0 for each row's first.

    An ``eos`` closes its document: the token after it starts the next one.
    """
    ends = (inputs == eos_id).long()
    return torch.cumsum(ends, dim=1) - ends


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document ``[B, T] -> [B, T]`` int64 (0 at every document start)."""
    t = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.cummax(torch.where(starts, t, torch.zeros_like(t)), dim=1).values
    return t - first


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """bool ``[B, 1, T, T]``: query ``i`` may attend key ``j`` iff ``j <= i`` and both are in the same document."""
    t = torch.arange(doc_ids.shape[1], device=doc_ids.device)
    causal = t[None, :] <= t[:, None]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]


def mask_for(allowed: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4-D mask ``allowed`` (bool ``[B, 1, T, T]``) in the format ``attn_implementation`` expects.

    Raises:
        ConfigError: the implementation takes no 4-D mask (flash attention reads boundaries from sequence lengths).
    """
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    if attn_implementation in FOUR_D_MASK_IMPLEMENTATIONS or attn_implementation.startswith("lce_"):
        return allowed
    raise ConfigError(
        f"train.pack_documents: the model's attention implementation {attn_implementation!r} takes no 4-D attention "
        f"mask; load it with attn_implementation sdpa or eager (or any lce posenc/attention), or set "
        "train.pack_documents=false"
    )
