"""segmented_attention's inference form (one fused SDPA call per segment, merged by log-sum-exp) equals its autograd
form (segment logits merged before one softmax), with padding, restrictions, several blocks and empty rows."""

import pytest
import torch

from lce.attention.sliding_window import SlidingWindowPattern
from lce.core.segments import segmented_attention
from lce.kernels.rope import Rotation
from lce.posenc.dca import DcaGeometry
from lce.posenc.self_extend import self_extend_segments
from lce.posenc.sinks import sink_segments

ROTATION = Rotation(1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
SEGMENTS = {
    "dca": DcaGeometry(16, 12, 4).segments(),
    "self_extend": self_extend_segments(3, 8),
    "sinks": sink_segments(2, 7),  # pairs neither segment selects are hidden: rows see few keys
}


def inputs(dtype=torch.float32, batch=2, length=45):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 4, length, 16, generator=gen).to(dtype)
    k, v = (torch.randn(batch, 2, length, 16, generator=gen).to(dtype) for _ in range(2))
    pos = torch.arange(length)[None].repeat(batch, 1)
    pos[1] -= 6  # left padding of row 1: six keys at negative positions, hidden by the mask
    mask = (pos[:, None, :, None] >= 0) & (pos[:, None, None, :] >= 0)
    return q, k, v, pos, mask


def both_forms(q, k, v, segments, pos, mask, visible=None, block_size=16):
    args = (q, k, v, segments, ROTATION, pos, pos, 0.25, mask, block_size, visible)
    with torch.no_grad():
        merged = segmented_attention(*args)
    with torch.enable_grad():
        merged_free = segmented_attention(*args)  # grad mode on: the merge-before-softmax form
    return merged, merged_free.detach()


@pytest.mark.parametrize("name", list(SEGMENTS))
@pytest.mark.parametrize("window", [None, 9])
def test_inference_form_equals_the_autograd_form(name, window):
    q, k, v, pos, mask = inputs()
    visible = SlidingWindowPattern(window) if window else None
    merged, reference = both_forms(q, k, v, SEGMENTS[name], pos, mask, visible)
    # fp32, same products; only the softmax is normalised per segment and then reweighted (a few ulps).
    torch.testing.assert_close(merged, reference, atol=2e-6, rtol=2e-6)
    assert torch.all(merged[1, :6] == 0)  # pad queries see nothing: exact zeros, never NaN


def test_inference_form_in_bfloat16_stays_within_bfloat16_error():
    q, k, v, pos, mask = inputs()
    exact, _ = both_forms(q.double(), k.double(), v.double(), SEGMENTS["dca"], pos, mask)
    merged, reference = both_forms(q.bfloat16(), k.bfloat16(), v.bfloat16(), SEGMENTS["dca"], pos, mask)
    own_error = (reference.double() - exact).abs().max()
    # The flash-attention rule: at most twice the error PyTorch's own bf16 computation makes, plus a floor.
    assert (merged.double() - exact).abs().max() <= 2 * own_error + 1e-3
