"""lce's block-wise masked attention: parity with a dense reference whose mask is written from each pattern's
definition (forward and backward, odd lengths, GQA 4:2, blocks that do not divide T, decode shapes, padding,
soft-capping), the block map (views, skipped keys), the restriction mechanism's refusal of kernels without
``visible``, and linear memory and work in T (forward and training)."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lce.attention.block_sparse import BlockSparsePattern
from lce.attention.dilated import DilatedPattern
from lce.attention.local_global import LocalGlobalPattern
from lce.attention.s2_attn import ShiftedGroups
from lce.attention.sliding_window import SlidingWindowPattern
from lce.core.blockwise import blockwise_attention, key_columns, masked_attention_eager, merge_ranges


def dense_attention(q, k, v, mask, scaling, softcap=None):
    """Plain softmax attention: ``mask [B or 1, H or 1, Tq, Tk]`` (True = may attend) materialised, KV heads
    repeated; rows with no visible key are 0."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return (probs @ v).transpose(1, 2)


def block_sparse_definition(pattern: BlockSparsePattern):
    """Visibility from the per-block key lists (python sets, not the tensor predicate under test);
    ``i [Tq, 1]``, ``j [1, Tk]``."""
    size = pattern.block_size

    def visible(i, j):
        rows = {}
        for q in i[:, 0].tolist():
            blocks = set(pattern.key_blocks(q // size)) if q >= 0 else set()
            rows[q] = [k >= 0 and k // size in blocks for k in j[0].tolist()]
        return torch.tensor([rows[q] for q in i[:, 0].tolist()])

    return visible


BLOCK_SPARSE = BlockSparsePattern(block_size=3, window_blocks=2, global_blocks=1, random_blocks=2, seed=5)

# (restriction, its definition on broadcast positions i [..., Tq, 1], j [..., 1, Tk]; [H, Tq, Tk] when per head)
PATTERNS = {
    "sliding_window": (SlidingWindowPattern(window=5, sink_tokens=2), lambda i, j: (i - j < 5) | ((j >= 0) & (j < 2))),
    "local_global": (LocalGlobalPattern(window=4, global_tokens=(0, 9, 30)),
                     lambda i, j: (i - j < 4) | (j == 0) | (j == 9) | (j == 30) | (i == 0) | (i == 9) | (i == 30)),
    "block_sparse": (BLOCK_SPARSE, block_sparse_definition(BLOCK_SPARSE)),
    "dilated": (DilatedPattern(window=4, dilation=3), lambda i, j: ((i - j) % 3 == 0) & (i - j < 12)),
    "s2_groups": (ShiftedGroups(group_size=8, heads=4),
                  lambda i, j: torch.stack([i // 8 == j // 8] * 2 + [(i - 4) // 8 == (j - 4) // 8] * 2, dim=-3)),
}


def definition_mask(definition, q_pos, k_pos):
    """``[B, 1 or H, Tq, Tk]``: causal and visible by the pattern's definition, pair by pair."""
    masks = []
    for qp, kp in zip(q_pos, k_pos):
        i, j = qp[:, None], kp[None, :]
        pattern = definition(i, j)
        masks.append((j <= i) & pattern if pattern.dim() == 3 else ((j <= i) & pattern)[None])
    return torch.stack(masks)


def random_qkv(batch=2, heads=4, kv_heads=2, tq=37, tk=37, dim=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tq, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, tk, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, tk, dim, generator=g, dtype=dtype)
    return q, k, v


def assert_grads_match(out, ref, inputs):
    upstream = torch.randn_like(ref)
    grads = torch.autograd.grad(out, inputs, upstream)
    ref_grads = torch.autograd.grad(ref, inputs, upstream)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, r, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("block", [8, 64], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_blockwise_matches_definition_forward_and_backward(name, block):
    """37 tokens, GQA 4:2, query blocks of 8 (not dividing 37) and of 64 (one block): float64, so the only
    difference is summation order."""
    pattern, definition = PATTERNS[name]
    q, k, v = (t.requires_grad_() for t in random_qkv())
    pos = torch.arange(37)[None].expand(2, -1)
    mask = definition_mask(definition, pos, pos)
    out = blockwise_attention(q, k, v, pos, pos, 0.3, visible=pattern, block_size=block)
    ref = dense_attention(q, k, v, mask, 0.3)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(masked_attention_eager(q, k, v, pos, pos, 0.3, visible=pattern), ref)
    assert_grads_match(out, ref, (q, k, v))


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_decode_shapes_and_padding(name):
    """5 queries over 37 cached keys, rows offset by left padding (negative key positions, a padding mask with
    fully hidden rows): block-wise == dense, gradients finite."""
    pattern, definition = PATTERNS[name]
    q, k, v = (t.requires_grad_() for t in random_qkv(tq=5, tk=37))
    last = torch.tensor([[36], [30]])  # row 1 has 6 left pads
    k_pos = last - 36 + torch.arange(37)
    q_pos = k_pos[:, -5:]
    padding = (k_pos >= 0)[:, None, None, :].expand(2, 1, 5, 37).clone()
    padding[1, 0, 0] = False  # one query that may see nothing
    out = blockwise_attention(q, k, v, q_pos, k_pos, 0.3, padding, visible=pattern, block_size=2)
    ref = dense_attention(q, k, v, definition_mask(definition, q_pos, k_pos) & padding, 0.3)
    torch.testing.assert_close(out, ref)
    assert out[1, 0].abs().max() == 0
    assert_grads_match(out, ref, (q, k, v))


def test_softcap_in_float32():
    q, k, v = random_qkv(dtype=torch.float32)
    pos = torch.arange(37)[None].expand(2, -1)
    pattern, definition = PATTERNS["sliding_window"]
    out = blockwise_attention(q, k, v, pos, pos, 0.3, visible=pattern, block_size=6, softcap=2.0)
    ref = dense_attention(q, k, v, definition_mask(definition, pos, pos), 0.3, softcap=2.0)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)  # fp32 summation order


def test_unrestricted_blockwise_is_causal_sdpa():
    q, k, v = random_qkv()
    pos = torch.arange(37)[None].expand(2, -1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(blockwise_attention(q, k, v, pos, pos, 0.3, block_size=7), ref.transpose(1, 2))
    window = SlidingWindowPattern(window=37)
    torch.testing.assert_close(blockwise_attention(q, k, v, pos, pos, 0.3, visible=window, block_size=7),
                               ref.transpose(1, 2))


def test_block_map_skips_keys_and_slices_without_copying():
    k_pos = torch.arange(1000)[None]
    window = SlidingWindowPattern(window=50)
    assert key_columns(window, torch.arange(500, 532)[None], k_pos) == slice(451, 532)
    assert key_columns(SlidingWindowPattern(window=50, sink_tokens=4), torch.arange(500, 532)[None], k_pos).tolist() \
        == [0, 1, 2, 3, *range(451, 532)]
    assert key_columns(None, torch.arange(10, 20)[None], k_pos) == slice(0, 20)
    sparse = BlockSparsePattern(block_size=32, window_blocks=1, global_blocks=0, random_blocks=2, seed=0)
    columns = key_columns(sparse, torch.arange(640, 672)[None], k_pos)
    blocks = sorted({int(c) // 32 for c in columns})
    assert len(columns) == 3 * 32 and blocks[-1] == 20 and len(blocks) == 3
    assert merge_ranges([(5, 9), (0, 3), (8, 12), (3, 4), (20, 20)]) == [(0, 4), (5, 12)]


class PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages created inside the mode (forward and backward ops alike): a storage
    counts from the op that creates it until the last tensor viewing it is freed."""

    def __init__(self):
        super().__init__()
        self.storages = {}  # data_ptr -> [live tensors, bytes]
        self.live = self.peak = 0

    def _release(self, key):
        entry = self.storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= self.storages.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self.storages:
                    self.storages[key][0] += 1
                else:
                    self.storages[key] = [1, storage.nbytes()]
                    self.live += storage.nbytes()
                weakref.finalize(t, self._release, key)
        self.peak = max(self.peak, self.live)
        return out


class ScoredPairs(TorchDispatchMode):
    """Elements of every matmul output (scores and weighted values: the work of a block kernel), and the (query, key)
    pairs of every fused SDPA call (which forms its scores inside)."""

    def __init__(self):
        super().__init__()
        self.pairs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.bmm.default, torch.ops.aten.mm.default):
            self.pairs += out.numel()
        elif "scaled_dot_product" in func.name():
            query, key = args[0], args[1]
            self.pairs += query.numel() // query.shape[-1] * key.shape[-2]
        return out


def measure(kernel, length, train):
    q, k, v = random_qkv(batch=1, heads=4, kv_heads=2, tq=length, tk=length, dim=16, dtype=torch.float32)
    for t in (q, k, v):
        t.requires_grad_(train)
    pos = torch.arange(length)[None]
    with PeakMemory() as mode:
        with torch.set_grad_enabled(train):
            out = kernel(q, k, v, pos)
            if train:
                out.sum().backward()
        del out
    return mode.peak


SPARSE_KERNELS = {
    "sliding_window": lambda q, k, v, pos: blockwise_attention(q, k, v, pos, pos, 0.25,
                                                               visible=SlidingWindowPattern(64), block_size=64),
    "block_sparse": lambda q, k, v, pos: blockwise_attention(
        q, k, v, pos, pos, 0.25, visible=BlockSparsePattern(32, window_blocks=2, global_blocks=1, random_blocks=2),
        block_size=64),
}


@pytest.mark.parametrize("train", [False, True], ids=["forward", "training"])
@pytest.mark.parametrize("name", sorted(SPARSE_KERNELS))
def test_peak_memory_grows_linearly(name, train):
    """Peak live memory (every op of the forward, and of the backward when training) at 4T is at most 5x that at T."""
    small, large = measure(SPARSE_KERNELS[name], 256, train), measure(SPARSE_KERNELS[name], 1024, train)
    assert large <= 5 * small, f"peak {large} bytes at T=1024 vs {small} at T=256"


@pytest.mark.parametrize("train", [False, True], ids=["forward", "training"])
def test_peak_memory_sees_quadratic_memory(train):
    """The meter of ``test_peak_memory_grows_linearly`` sees the dense reference's [T, T] scores grow ~16x."""
    dense = lambda q, k, v, pos: masked_attention_eager(q, k, v, pos, pos, 0.25, visible=SlidingWindowPattern(64))
    assert measure(dense, 1024, train) > 10 * measure(dense, 256, train)


SMALL_BLOCK_KERNELS = {
    "sliding_window": lambda q, k, v, pos: blockwise_attention(q, k, v, pos, pos, 0.25,
                                                               visible=SlidingWindowPattern(16), block_size=16),
    "block_sparse": lambda q, k, v, pos: blockwise_attention(
        q, k, v, pos, pos, 0.25, visible=BlockSparsePattern(8, window_blocks=2, global_blocks=1, random_blocks=2),
        block_size=16),
}


@pytest.mark.parametrize("name", sorted(SMALL_BLOCK_KERNELS))
def test_scored_pairs_grow_linearly(name):
    """Skipped key blocks are never scored: the work at 4T is ~4x (full causal block-wise attention: ~16x)."""
    def pairs(kernel, length):
        q, k, v = random_qkv(batch=1, heads=4, kv_heads=2, tq=length, tk=length, dim=16, dtype=torch.float32)
        with ScoredPairs() as mode, torch.no_grad():
            kernel(q, k, v, torch.arange(length)[None])
        return mode.pairs

    kernel = SMALL_BLOCK_KERNELS[name]
    assert pairs(kernel, 1024) <= 4.5 * pairs(kernel, 256)  # 4x, plus early blocks having fewer keys to attend
    full = lambda q, k, v, pos: blockwise_attention(q, k, v, pos, pos, 0.25, block_size=64)
    assert pairs(full, 1024) > 12 * pairs(full, 256)
