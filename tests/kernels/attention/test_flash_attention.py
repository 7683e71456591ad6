"""The Triton kernels (forward and backward) against the fp64 reference under the flash-attention tolerance rule.

Without CUDA they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on tiny shapes with
32 x 32 tiles (``function.tile_sizes``), so every input spans several query and key tiles and lengths are not
multiples of the tile. Outputs and gradients are allocated NaN-filled, so a tile the kernels forget to write fails.
The interpreter cannot run bf16 dot products (it returns garbage for a plain 16 x 16 ``tl.dot``), so bf16 is tested
on a GPU only (``gpu`` marker), together with real sizes.
"""

import functools

import pytest
import torch

from lce.kernels.attention import flash_attention, function, triton_backward, triton_forward, tuning
from lce.kernels.attention.function import decode_splits, tile_sizes
from lce.kernels.attention.launch import gqa_packing
from lce.kernels.attention.reference import attention_reference
from lce.kernels.attention.schedule import build_schedule
from lce.kernels.attention.spec import AttentionSpec
from lce.posenc.alibi import alibi_slopes
from lce.posenc.dca import DcaGeometry
from lce.posenc.rerope import rerope_segments
from lce.posenc.self_extend import self_extend_segments
from lce.posenc.sinks import sink_segments
from tests.kernels.attention.cases import (
    CASES,
    DEVICE,
    ROPE,
    assert_flash_close,
    on_device,
    positions,
    random_qkv,
    rotary,
    spec_for,
)


def nan_filled(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(triton_forward, "allocate", nan_filled)
    monkeypatch.setattr(triton_backward, "allocate", nan_filled)


def check(spec, batch=2, heads=2, kv_heads=1, tq=45, tk=45, dim=16, dim_v=None, layout="gaps",
          dtype=torch.float32, seed=0):
    q, k, v = (t.to(DEVICE) for t in random_qkv(batch, heads, kv_heads, tq, tk, dim, dim_v, dtype=dtype, seed=seed))
    q_pos, k_pos = (t.to(DEVICE) for t in positions(batch, tq, tk, layout))
    spec = on_device(spec)
    assert_flash_close(functools.partial(flash_attention, spec=spec, q_pos=q_pos, k_pos=k_pos, backend="triton"),
                       functools.partial(attention_reference, spec=spec, q_pos=q_pos, k_pos=k_pos), q, k, v, seed)


@pytest.mark.parametrize("case", CASES)
def test_every_method_and_modifier(case):
    """Positions with gaps (not contiguous) and GQA (2 query heads per KV head), 45 tokens in 32-token tiles."""
    check(spec_for(case, heads=2))


@pytest.mark.parametrize("case", ["causal", "alibi", "window_sinks", "dca_code", "self_extend", "sinks"])
def test_negative_key_positions(case):
    """Left padding: row b starts at position -3b, so its first keys have negative positions."""
    check(spec_for(case, heads=2), layout="left_pad")


@pytest.mark.parametrize("case", ["causal", "window", "dca_paper", "rerope", "dca_window_alibi"])
def test_queries_at_the_end_of_a_longer_cache(case):
    """Tq < Tk: the queries are the last 13 of 70 keys (prefill after a cached prefix)."""
    check(spec_for(case, heads=2), tq=13, tk=70, layout="contiguous")


@pytest.mark.parametrize("heads,kv_heads", [(3, 3), (6, 2)], ids=["mha", "gqa3"])
def test_head_groupings(heads, kv_heads):
    check(spec_for("dca_code", heads=heads), batch=1, heads=heads, kv_heads=kv_heads, tq=20, tk=33)


@pytest.mark.parametrize("dim,dim_v,rotary_dim", [(24, 40, 16), (64, 64, 64), (128, 128, 64), (32, 16, 8),
                                                   (256, 256, 128)],
                         ids=["odd_dims", "d64", "d128_partial", "dv_smaller", "d256_dk_dv_apart"])
def test_head_dims_that_are_not_tile_widths(dim, dim_v, rotary_dim):
    spec = AttentionSpec(dim ** -0.5, self_extend_segments(3, 4), rotary(dim, rotary_dim))
    check(spec, batch=1, dim=dim, dim_v=dim_v, tq=33, tk=33)


@pytest.mark.parametrize("case", ["causal", "dca_code", "window_sinks"])
def test_fp16(case):
    """fp16 runs faithfully in the interpreter (NumPy has float16), under the 2x-PyTorch rule."""
    check(spec_for(case, heads=2), dtype=torch.float16)


@pytest.mark.parametrize("tq", [1, 3])
@pytest.mark.parametrize("case", ["causal", "dca_code", "window_sinks", "alibi"])
def test_decode_splits_the_keys(case, tq):
    """Flash-decoding: one query tile against 100 keys in 4 key tiles, split across programs and combined."""
    batch, heads = 2, 2
    assert decode_splits(1, -(-100 // tile_sizes(tq, DEVICE)[1]), batch * heads, DEVICE) > 1
    check(spec_for(case, heads=heads), batch=batch, heads=heads, tq=tq, tk=100, layout="left_pad")


@pytest.mark.parametrize("case", ["causal", "alibi", "logn", "dca_code", "dca_paper",
                                  "self_extend", "rerope", "rope"])
def test_full_tiles_run_without_a_mask(case):
    """100 contiguous tokens in 32-token tiles: the tiles below the diagonal (and, for segments, those inside one
    segment's band) are listed as full and run the unmasked loop; the result is still exact."""
    spec = spec_for(case, heads=2, length=100)
    q_pos, k_pos = positions(1, 100, 100, "contiguous")
    block_m, block_n = tile_sizes(100, DEVICE)
    assert int(build_schedule(spec, q_pos, k_pos, block_m, block_n).kv_full.sum()) > 0
    check(spec, batch=1, tq=100, tk=100, layout="contiguous")


@pytest.mark.parametrize("heads,kv_heads,tq", [(6, 2, 2), (4, 1, 1), (8, 2, 4)], ids=["g3_t2", "g4_t1", "g4_t4"])
@pytest.mark.parametrize("case", ["causal", "alibi", "dca_code", "window_sinks"])
def test_decode_packs_the_query_heads_of_a_kv_group(case, heads, kv_heads, tq):
    """Decode with GQA: the query rows of the heads sharing a KV head form one tile (each key tile read once per KV
    head), split across programs over the visible tiles and merged by the Triton combine kernel."""
    assert gqa_packing(tq, heads // kv_heads, torch.device(DEVICE)) is not None
    check(spec_for(case, heads=heads), batch=2, heads=heads, kv_heads=kv_heads, tq=tq, tk=100, layout="left_pad")


def test_sliding_window_over_many_tiles():
    """A window of 7 over 130 tokens (5 tiles): most key tiles are skipped, the visited ones are exact."""
    check(AttentionSpec(0.25, window=7, sink_tokens=2), batch=1, tq=130, tk=130, layout="contiguous")


def test_rows_without_visible_keys_are_zero_and_gradients_finite():
    """Queries before every key (and a sinks spec whose recent window misses them) attend nothing: output 0, no NaN
    in any gradient."""
    q, k, v = (t.to(DEVICE).requires_grad_() for t in random_qkv(2, 2, 1, 40, 40, 16))
    q_pos, k_pos = (t.to(DEVICE) for t in positions(2, 40, 40))
    k_pos = k_pos + 35  # queries 0..34 precede every key
    out = flash_attention(q, k, v, on_device(spec_for("sinks", heads=2)), q_pos, k_pos, backend="triton")
    assert (out[:, :35] == 0).all() and (out[:, 35:] != 0).any(dim=-1).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[:, :, :35] == 0).all()


def test_backward_is_deterministic():
    q, k, v = (t.to(DEVICE).requires_grad_() for t in random_qkv(1, 2, 1, 40, 40, 16))
    q_pos, k_pos = (t.to(DEVICE) for t in positions(1, 40, 40))
    spec = on_device(spec_for("self_extend", heads=2))
    grads = []
    for _ in range(2):
        out = flash_attention(q, k, v, spec, q_pos, k_pos, backend="triton")
        grads.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_reference_backend_runs_the_reference_under_autograd():
    q, k, v = random_qkv(2, 4, 2, 9, 9, 16, requires_grad=True)
    q_pos, k_pos = positions(2, 9, 9)
    spec = spec_for("rerope")
    out = flash_attention(q, k, v, spec, q_pos, k_pos, backend="ref")
    torch.testing.assert_close(out, attention_reference(q, k, v, spec, q_pos, k_pos), rtol=0, atol=0)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# Real sizes on a GPU (bf16 included; the interpreter cannot run bf16 dots), with each method's published
# parameters scaled to a 2k-4k context.
def real_spec(case: str, heads: int, dim: int) -> AttentionSpec:
    scale, rope = dim ** -0.5, rotary(dim)
    specs = {
        "causal": lambda: AttentionSpec(scale),
        "alibi_logn": lambda: AttentionSpec(scale, alibi_slopes=alibi_slopes(heads), logn_length=1024),
        "window_sinks": lambda: AttentionSpec(scale, window=256, sink_tokens=4),
        "block_sparse": lambda: spec_for("block_sparse", heads, dim, length=4096),
        "dca_code": lambda: AttentionSpec(scale, DcaGeometry(1024, 768, 128).segments(), rope),
        "dca_paper": lambda: AttentionSpec(scale, DcaGeometry(1024, 768, 128, "paper").segments(), rope),
        "self_extend": lambda: AttentionSpec(scale, self_extend_segments(8, 256), rope),
        "rerope_logn": lambda: AttentionSpec(scale, rerope_segments(512), rope, logn_length=1024),
        "sinks": lambda: AttentionSpec(scale, sink_segments(4, 508), rope),
        "partial_interleaved": lambda: AttentionSpec(scale, ROPE, rotary(dim, dim // 2, style="interleaved",
                                                                                   attention_scaling=1.1)),
    }
    return on_device(specs[case]())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["causal", "alibi_logn", "window_sinks", "block_sparse", "dca_code", "dca_paper",
                                  "self_extend", "rerope_logn", "sinks", "partial_interleaved"])
def test_real_sizes_on_gpu(case, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    length, dim, heads = 2048, 128, 8
    spec = real_spec(case, heads, dim)
    q, k, v = (t.cuda() for t in random_qkv(1, heads, 2, length, length, dim, dtype=dtype))
    q_pos, k_pos = (t.cuda() for t in positions(1, length, length, "contiguous"))
    assert_flash_close(functools.partial(flash_attention, spec=spec, q_pos=q_pos, k_pos=k_pos, backend="triton"),
                       functools.partial(attention_reference, spec=spec, q_pos=q_pos, k_pos=k_pos), q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["causal", "dca_code", "window_sinks", "sinks"])
def test_decode_on_gpu(case):
    """One query (and a 4k cache, left-padded rows) split across programs (flash-decoding)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    spec = real_spec(case, 8, 128)
    q, k, v = (t.cuda() for t in random_qkv(2, 8, 2, 1, 4096, 128, dtype=torch.bfloat16))
    q_pos, k_pos = (t.cuda() for t in positions(2, 1, 4096, "left_pad"))
    assert_flash_close(functools.partial(flash_attention, spec=spec, q_pos=q_pos, k_pos=k_pos, backend="triton"),
                       functools.partial(attention_reference, spec=spec, q_pos=q_pos, k_pos=k_pos), q, k, v)


GPU_SHAPES = [(tuning.TileConfig(64, 64, 4, 3), {"dq": (64, 64), "dk_dv": (32, 64)}),  # bf16/fp16 up to d128
              (tuning.TileConfig(64, 32, 8, 3), {"dq": (64, 32), "dk_dv": (16, 64)}),  # bf16/fp16 at d256
              (tuning.TileConfig(128, 64, 8, 3), {"dq": (64, 64), "dk_dv": (32, 64)}),  # the tuner's candidates
              (tuning.TileConfig(128, 128, 8, 2), {"dq": (64, 64), "dk_dv": (32, 64)})]


@pytest.mark.parametrize("shapes", GPU_SHAPES, ids=["default", "d256", "128x64", "128x128"])
@pytest.mark.parametrize("case", ["causal", "dca_window_alibi", "block_sparse", "overlapping"])
def test_the_tile_shapes_a_gpu_runs(monkeypatch, case, shapes):
    """The tile shapes a GPU launches (``launch.tile_sizes``, ``launch.backward_tiles``, the tuner's candidates) at
    small sizes in the interpreter: 150 tokens span several of each tile, full ones included."""
    forward, backward = shapes
    monkeypatch.setattr(function, "forward_tiles", lambda *args: (forward, False))
    monkeypatch.setattr(function, "backward_tiles", lambda *args: backward)
    check(spec_for(case, heads=2, length=150), batch=1, tq=150, tk=150, layout="contiguous")
