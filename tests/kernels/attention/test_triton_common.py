"""Pieces of ``triton_common`` that compiled runs depend on beyond what the kernel-vs-reference tests exercise:
tile offsets in int64 (an int32 product wraps at long contexts, far beyond the tiny test shapes) and the segment
table built once per spec and device (building it copies a host list to the GPU, a stream synchronisation per call).
"""

import pytest
import torch
import triton
import triton.language as tl

from lce.kernels.attention.spec import AttentionSpec
from lce.kernels.attention.triton_common import SEG_FIELDS, segment_table, tile_offsets
from lce.posenc.dca import DcaGeometry
from tests.kernels.attention.cases import DEVICE, rotary


@triton.jit
def offsets_kernel(out_ptr, row0, row_stride, BLOCK: tl.constexpr):
    """``out [BLOCK, BLOCK]`` = ``tile_offsets`` of rows ``row0 + [0, BLOCK)`` and columns ``[0, BLOCK)``."""
    local = tl.arange(0, BLOCK)
    tl.store(out_ptr + local[:, None] * BLOCK + local[None, :], tile_offsets(row0 + local, local, row_stride))


# Rows of the [B, Tq, H, Dv] output are H * Dv apart: 32 heads x 128 cross 2^31 at row 2^19 (512k tokens), 64 x 128 at
# 1M tokens pass 2^33. Row indices and strides both fit int32 (so Triton passes them as int32), their products do not.
@pytest.mark.parametrize("row0,row_stride", [(2**19 - 8, 32 * 128), (2**20, 64 * 128)],
                         ids=["512k-32x128", "1M-64x128"])
def test_tile_offsets_do_not_wrap_past_2_31(row0, row_stride):
    out = torch.zeros(16, 16, dtype=torch.int64, device=DEVICE)
    offsets_kernel[(1,)](out, row0, row_stride, BLOCK=16)
    expected = torch.arange(row0, row0 + 16)[:, None] * row_stride + torch.arange(16)[None, :]
    assert expected.max() >= 2**31  # the case is one an int32 product would get wrong
    assert torch.equal(out.cpu(), expected)


def test_segment_table_is_built_once_per_spec_and_device():
    """Equal segments share one table (specs are rebuilt per layer and call); other segments get their own."""
    table = segment_table(AttentionSpec(0.25, DcaGeometry(16, 8, 2).segments(), rotary(16)), DEVICE)
    assert table.shape == (3, SEG_FIELDS) and table.dtype == torch.int32 and table.device.type == DEVICE.type
    assert segment_table(AttentionSpec(0.5, DcaGeometry(16, 8, 2).segments(), rotary(16)), DEVICE) is table
    assert segment_table(AttentionSpec(0.25, DcaGeometry(16, 8, 3).segments(), rotary(16)), DEVICE) is not table
