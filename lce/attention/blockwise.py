"""Deprecated: moved to ``lce.core.blockwise`` (the neutral layer below ``lce.posenc`` and ``lce.attention``)."""

from lce.deprecated import renamed

__getattr__ = renamed(__name__, {
    "Columns": "lce.core.blockwise.Columns",
    "SparseVariant": "lce.attention.sparse.SparseVariant",
    "allowed_pairs": "lce.core.blockwise.allowed_pairs",
    "blockwise_attention": "lce.core.blockwise.blockwise_attention",
    "blockwise_kernel": "lce.hf.dispatch.BlockwiseAttention",
    "key_columns": "lce.core.blockwise.key_columns",
    "masked_attention_eager": "lce.core.blockwise.masked_attention_eager",
    "merge_ranges": "lce.core.blockwise.merge_ranges",
})
