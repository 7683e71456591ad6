"""Deprecated: moved to ``lce.core.segments`` (the neutral layer below ``lce.posenc`` and ``lce.attention``)."""

from lce.deprecated import renamed

__getattr__ = renamed(__name__, {
    "Piece": "lce.core.staircase.Piece",
    "STAIRCASE_ROWS": "lce.core.staircase.STAIRCASE_ROWS",
    "StaircasePlan": "lce.core.staircase.StaircasePlan",
    "segmented_attention": "lce.core.segments.segmented_attention",
    "selected_spans": "lce.core.staircase.selected_spans",
    "staircase_applies": "lce.core.staircase.staircase_applies",
    "staircase_pieces": "lce.core.staircase.staircase_pieces",
    "staircase_plan": "lce.core.staircase.staircase_plan",
    "staircase_rows": "lce.core.staircase.staircase_rows",
})
