"""Queries and keys rotated once per position map before the kernels, and the gradients turned back
(``lce.kernels.attention.prerotate``), against autograd through the RoPE reference."""

import torch

from lce.kernels.attention.prerotate import rotated_inputs, unrotated_gradient
from lce.kernels.attention.spec import AttentionSpec
from lce.kernels.attention.triton_common import distinct_maps, segments_disjoint
from lce.kernels.rope.reference import rope_reference
from tests.kernels.attention.cases import SEGMENT_CASES, case_segments, positions, random_qkv, rotary, spec_for


def test_without_segments_the_inputs_are_used_in_place():
    q, k, _ = random_qkv(1, 2, 1, 5, 5, 16)
    q_pos, k_pos = positions(1, 5, 5)
    q_rot, k_rot = rotated_inputs(q, k, AttentionSpec(0.25), q_pos, k_pos)
    assert q_rot.shape == (1, *q.shape) and q_rot.data_ptr() == q.data_ptr() and k_rot.data_ptr() == k.data_ptr()


def test_one_rotation_per_distinct_map():
    spec = spec_for("dca_code", heads=2)
    q_maps, k_maps, _, k_index = distinct_maps(spec.segments)
    assert (len(q_maps), len(k_maps)) == (3, 1) and k_index == [0, 0, 0]  # DCA: three query maps, one key map
    q, k, _ = random_qkv(2, 2, 1, 9, 9, 16, dtype=torch.float64)
    q_pos, k_pos = positions(2, 9, 9, "gaps")
    q_rot, k_rot = rotated_inputs(q, k, spec, q_pos, k_pos)
    rot = spec.rotary
    for slot, m in enumerate(q_maps):
        torch.testing.assert_close(q_rot[slot], rope_reference(q, m(q_pos), rot.inv_freq, rot.attention_scaling,
                                                               rot.style), rtol=0, atol=0)
    assert k_rot.shape[0] == 1


def test_unrotated_gradient_is_the_gradient_through_each_rotation():
    """sum_s R(-m_s)^T g_s equals autograd's gradient of sum_s <R(m_s) x, g_s> (fp64: exact up to rounding)."""
    spec = spec_for("attention_scaling", heads=2)
    spec = AttentionSpec(spec.scale, case_segments("self_extend") + case_segments("dca_code"),
                         rotary(16, 8, style="interleaved", attention_scaling=1.3))
    q_maps, _, q_index, _ = distinct_maps(spec.segments)
    x = torch.randn(2, 3, 11, 16, dtype=torch.float64, requires_grad=True)
    pos, _ = positions(2, 11, 11, "left_pad")
    grads = torch.randn(len(spec.segments), 2, 3, 11, 16, dtype=torch.float64)
    rot = spec.rotary
    total = sum((rope_reference(x, q_maps[m](pos), rot.inv_freq, rot.attention_scaling, rot.style) * g).sum()
                for m, g in zip(q_index, grads))
    (expected,) = torch.autograd.grad(total, x)
    got = unrotated_gradient(grads, pos, q_maps, q_index, spec, torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_the_methods_segments_are_disjoint():
    """The kernels skip the "a later segment owns it" check when no two segments can select a common pair."""
    for case in SEGMENT_CASES:
        assert segments_disjoint(case_segments(case)), case
    assert not segments_disjoint(spec_for("overlapping").segments)
