"""Deprecated: moved to ``lce.core.plan`` (the neutral layer below ``lce.posenc`` and ``lce.attention``)."""

from lce.deprecated import renamed

__getattr__ = renamed(__name__, {
    "AttentionPlan": "lce.core.plan.AttentionPlan",
    "FusedAttention": "lce.core.plan.FusedAttention",
    "Kernel": "lce.core.plan.LayerAttention",
    "KeyRanges": "lce.core.plan.KeyRanges",
    "RESTRICTION": "lce.core.plan.RESTRICTION",
    "Restriction": "lce.core.plan.Restriction",
    "fused_attention": "lce.hf.dispatch.fused_attention",
    "key_positions": "lce.core.plan.key_positions",
    "lce_attention_forward": "lce.hf.dispatch.lce_attention_forward",
    "query_positions": "lce.core.plan.query_positions",
    "register": "lce.hf.dispatch.register",
})
