"""ALiBi: the paper's slopes (golden values; not attention-gym's formula; equal to transformers' BLOOM), a per-pair
reference for the kernels and the patched model, block-wise == eager (forward and backward, awkward shapes), external
parity with transformers' SDPA ``position_bias``, model invariants, and memory at T = 4096."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lce
from lce.errors import ConfigError
from lce.posenc.alibi import alibi_attention, alibi_attention_eager, alibi_bias, alibi_slopes
from lce.posenc.logn import logn_scale
from tests.conftest import (
    assert_checkpointed_training_step,
    assert_decode_matches_full,
    logits,
    make_tiny_llama,
    scale_queries,
)

IDS = torch.randint(3, 259, (2, 29), generator=torch.Generator().manual_seed(0))

GOLDEN = {  # METHODS.md §2.7 / §2.13; the 4-decimal values are the paper's get_slopes rounded
    8: [2.0**-h for h in range(1, 9)],
    12: [2.0**-h for h in range(1, 9)] + [0.7071, 0.3536, 0.1768, 0.0884],
    32: [2.0 ** (-h / 4) for h in range(1, 33)],
    40: [2.0 ** (-h / 4) for h in range(1, 33)] + [0.9170, 0.7711, 0.6484, 0.5453, 0.4585, 0.3856, 0.3242, 0.2726],
}


@pytest.mark.parametrize("heads", sorted(GOLDEN), ids=lambda h: f"H{h}")
def test_golden_slopes(heads):
    slopes = alibi_slopes(heads, dtype=torch.float64)
    assert slopes.shape == (heads,)
    torch.testing.assert_close(slopes, torch.tensor(GOLDEN[heads], dtype=torch.float64), atol=5e-5, rtol=0)


def test_slopes_are_not_attention_gyms():
    """attention-gym uses 2^(-8(h+1)/H) for every H: the same as the paper for powers of two only."""
    gym = lambda heads: torch.tensor([2.0 ** (-8 * (h + 1) / heads) for h in range(heads)], dtype=torch.float64)
    torch.testing.assert_close(alibi_slopes(8, torch.float64), gym(8))
    assert gym(12)[0].item() == pytest.approx(0.630, abs=1e-3)
    assert (alibi_slopes(12, torch.float64) - gym(12)).abs().max() > 0.1


def test_slopes_match_transformers_bloom():
    """BLOOM was trained with the paper's slopes; transformers builds them in fp32 (1-ulp differences)."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for heads in [1, 2, 3, 5, 6, 12, 16, 20, 24, 40, 48, 64, 96]:
        bias = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)  # [H, 1, 2] = slope * position
        torch.testing.assert_close(alibi_slopes(heads), bias[:, 0, 1])


def per_pair_reference(q, k, v, slopes, q_pos, k_pos, scaling, mask=None):
    """Every score written out: s[b,h,i,j] = q.k * scaling - m_h (i - j) for visible j <= i; zero rows stay zero."""
    batch, heads, tq, dim = q.shape
    groups = heads // k.shape[1]
    out = torch.zeros(batch, tq, heads, dim, dtype=q.dtype)
    for b in range(batch):
        for h in range(heads):
            for i in range(tq):
                keys = [j for j in range(k.shape[2])
                        if k_pos[b, j] <= q_pos[b, i] and (mask is None or mask[b, 0, i, j])]
                if not keys:
                    continue
                scores = torch.stack([q[b, h, i] @ k[b, h // groups, j] * scaling
                                      - slopes[h] * float(q_pos[b, i] - k_pos[b, j]) for j in keys])
                out[b, i, h] = torch.softmax(scores, 0) @ v[b, h // groups, keys]
    return out


def random_qkv(batch, heads, kv_heads, tq, tk, dim=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tq, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, tk, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, tk, dim, generator=g, dtype=dtype)
    return q, k, v


def left_padded_positions(batch, tq, tk, pads):
    """Positions and mask as lce's dispatcher sees them: row b has pads[b] left pads (negative key positions)."""
    k_pos = torch.stack([torch.arange(tk) - p for p in pads])
    q_pos = k_pos[:, tk - tq:].clamp(min=0)
    causal = torch.arange(tk)[None, :] <= torch.arange(tk - tq, tk)[:, None]  # by index, as sdpa_mask builds it
    mask = (causal[None] & (k_pos[:, None, :] >= 0))[:, None]  # pad queries see nothing
    return q_pos, k_pos, mask


@pytest.mark.parametrize("kernel", ["blockwise", "eager"])
def test_kernels_match_per_pair_reference(kernel):
    q, k, v = random_qkv(2, 4, 2, 7, 10)
    q_pos, k_pos, mask = left_padded_positions(2, 7, 10, pads=[0, 5])
    slopes = alibi_slopes(4, torch.float64)
    if kernel == "eager":
        out = alibi_attention_eager(q, k, v, slopes, q_pos, k_pos, 0.3, mask)
    else:
        out = alibi_attention(q, k, v, slopes, q_pos, k_pos, 0.3, mask, block_size=3)
    torch.testing.assert_close(out, per_pair_reference(q, k, v, slopes, q_pos, k_pos, 0.3, mask))


def test_eager_matches_transformers_sdpa_with_position_bias():
    """External parity: transformers' own SDPA attention with ALiBi passed as ``position_bias``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = random_qkv(2, 6, 3, 5, 9)
    q_pos, k_pos, mask = left_padded_positions(2, 5, 9, pads=[0, 2])
    bias = alibi_bias(alibi_slopes(6, torch.float64), q_pos, k_pos)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True)
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25, position_bias=bias)
    out = alibi_attention_eager(q, k, v, alibi_slopes(6, torch.float64), q_pos, k_pos, 0.25, mask)
    torch.testing.assert_close(out, expected)


SHAPES = {  # (B, H, HKV, Tq, Tk, block): odd lengths, GQA 4:2 and 6:3, blocks not dividing T, Tq < Tk (cached prefix)
    "odd-T13-gqa4:2-block4": (1, 4, 2, 13, 13, 4),
    "B2-T17-gqa6:3-block5": (2, 6, 3, 17, 17, 5),
    "cached-prefix-Tq7-Tk20-mha-block3": (2, 4, 4, 7, 20, 3),
    "block-larger-than-T": (1, 4, 2, 9, 9, 64),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("padded", [False, True], ids=["causal", "left-padded"])
def test_blockwise_matches_eager_forward_and_backward(shape, padded):
    batch, heads, kv_heads, tq, tk, block = shape
    q, k, v = (t.requires_grad_() for t in random_qkv(batch, heads, kv_heads, tq, tk, seed=1))
    if padded:
        q_pos, k_pos, mask = left_padded_positions(batch, tq, tk, pads=[3] + [0] * (batch - 1))
    else:
        k_pos = torch.arange(tk).expand(batch, tk)
        q_pos, mask = k_pos[:, tk - tq:], None
    slopes = alibi_slopes(heads, torch.float64)
    fast = alibi_attention(q, k, v, slopes, q_pos, k_pos, 0.35, mask, block_size=block)
    ref = alibi_attention_eager(q, k, v, slopes, q_pos, k_pos, 0.35, mask)
    torch.testing.assert_close(fast, ref)  # fp64: same terms, default (1e-7) tolerance
    weight = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((fast * weight).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_inference_form_matches_eager(shape):
    """Without autograd on CPU: past keys with a broadcast bias and the causal square, merged by log-sum-exp."""
    batch, heads, kv_heads, tq, tk, block = shape
    q, k, v = random_qkv(batch, heads, kv_heads, tq, tk, seed=1)
    k_pos = torch.arange(tk).expand(batch, tk) + 1000  # far from 0: the row shift is not a small number
    q_pos = k_pos[:, tk - tq:]
    slopes = alibi_slopes(heads, torch.float64)
    with torch.no_grad():
        fast = alibi_attention(q, k, v, slopes, q_pos, k_pos, 0.35, block_size=block)
        ref = alibi_attention_eager(q, k, v, slopes, q_pos, k_pos, 0.35)
    torch.testing.assert_close(fast, ref)  # fp64: exact merge algebra, default (1e-7) tolerance


def capture_attention(model):
    """Record each self-attention call's input hidden states and output."""
    calls = []
    hook = lambda module, args, kwargs, out: calls.append((kwargs["hidden_states"], out[0]))
    model.model.layers[0].self_attn.register_forward_hook(hook, with_kwargs=True)
    return calls


def attention_reference(model, hidden, query_scale=None):
    """ALiBi attention of layer 0 recomputed from its projections with the per-pair reference."""
    attn = model.model.layers[0].self_attn
    batch, length, _ = hidden.shape
    heads_of = lambda proj: proj(hidden).view(batch, length, -1, attn.head_dim).transpose(1, 2).double()
    q, k, v = heads_of(attn.q_proj), heads_of(attn.k_proj), heads_of(attn.v_proj)
    if query_scale is not None:
        q = q * query_scale[None, None, :, None]
    pos = torch.arange(length).expand(batch, length)
    out = per_pair_reference(q, k, v, alibi_slopes(q.shape[1], torch.float64), pos, pos, attn.head_dim**-0.5)
    return attn.o_proj(out.reshape(batch, length, -1).float())


def test_patched_model_matches_per_pair_reference():
    """One layer: no rotation left anywhere, the model's 1/sqrt(d), causal ALiBi over GQA heads."""
    model = make_tiny_llama(num_hidden_layers=1)
    lce.patch(model, "alibi", block_size=5)
    calls = capture_attention(model)
    ids = IDS[:1, :12]
    logits(model, ids)
    hidden, out = calls[0]
    # fp32 model vs fp64 reference: fp32 rounding of q.k and of the output projection
    torch.testing.assert_close(out, attention_reference(model, hidden), atol=1e-5, rtol=1e-5)


def test_translation_invariant():
    """Only i - j enters ALiBi: shifting every position changes nothing (unlike RoPE's absolute angles in fp32,
    ALiBi sees exactly the same integers)."""
    model = make_tiny_llama()
    lce.patch(model, "alibi", block_size=8)
    shifted = torch.arange(IDS.shape[1]).expand(IDS.shape) + 1000
    torch.testing.assert_close(logits(model, IDS, position_ids=shifted), logits(model, IDS), atol=1e-5, rtol=1e-5)


def test_eager_kernel_option_equals_blockwise_model():
    blockwise, eager = make_tiny_llama(), make_tiny_llama()
    lce.patch(blockwise, "alibi", block_size=6)
    lce.patch(eager, "alibi", kernel="eager")
    torch.testing.assert_close(logits(blockwise, IDS), logits(eager, IDS), atol=1e-5, rtol=1e-5)  # fp32 order


def test_decode_matches_full_forward():
    model = make_tiny_llama(max_position_embeddings=16)
    lce.patch(model, "alibi", block_size=4)
    ids = torch.randint(3, 259, (2, 30), generator=torch.Generator().manual_seed(3))  # beyond max_position_embeddings
    assert_decode_matches_full(model, ids, prefill=11)


def test_left_padding_does_not_change_real_tokens():
    model = make_tiny_llama()
    lce.patch(model, "alibi", block_size=4)
    ids = IDS[:1, :15]
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 15, dtype=torch.long)], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = logits(model, padded, attention_mask=mask, position_ids=position_ids)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 6:], logits(model, ids), atol=2e-5, rtol=2e-5)  # fp32 reduction order


def test_training_step_with_activation_checkpointing():
    model = make_tiny_llama()
    lce.patch(model, "alibi", block_size=8)  # 29 tokens: 4 blocks, each recomputed in backward
    assert_checkpointed_training_step(model, IDS)


def test_patch_then_unpatch_equals_never_patched(tiny_model):
    before = logits(tiny_model, IDS)
    rotary = tiny_model.model.rotary_emb
    lce.patch(tiny_model, "alibi")
    assert not torch.allclose(logits(tiny_model, IDS), before)
    lce.unpatch(tiny_model)
    assert torch.equal(logits(tiny_model, IDS), before)
    assert tiny_model.model.rotary_emb is rotary
    assert tiny_model.config._attn_implementation == "sdpa"
    assert not hasattr(tiny_model.model.layers[0].self_attn, "lce_plan")


def test_save_load_round_trip(tmp_path):
    model = make_tiny_llama()
    lce.patch(model, "alibi", block_size=7)
    lce.save_model(model, lce.data.ByteTokenizer(), tmp_path)
    loaded, _ = lce.load_model(str(tmp_path))
    assert lce.patch_spec(loaded)["posenc"] == {"name": "alibi", "kernel": "blockwise", "block_size": 7,
                                                "logn": False, "logn_length": None}
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_composes_with_logn():
    """Reference: ALiBi without log-n and queries scaled through a q_proj hook (no rotation, so scaling q_proj's
    output is scaling the query)."""
    model, reference = make_tiny_llama(), make_tiny_llama()
    lce.patch(model, "alibi", logn=True, logn_length=8, block_size=8)
    lce.patch(reference, "alibi", block_size=8)
    assert model.config._attn_implementation == "lce_alibi_logn"
    factor = logn_scale(8)(torch.arange(IDS.shape[1])[None])[0]
    scale_queries(reference, factor)
    torch.testing.assert_close(logits(model, IDS), logits(reference, IDS), atol=1e-5, rtol=1e-5)  # fp32 order
    assert_decode_matches_full(model, IDS, prefill=9)


def test_bad_parameters_name_the_field():
    with pytest.raises(ConfigError, match=r"posenc\.block_size: must be >= 1"):
        lce.patch(make_tiny_llama(), "alibi", block_size=0)
    with pytest.raises(ConfigError, match=r"posenc\.kernel: 'flash' is not allowed"):
        lce.patch(make_tiny_llama(), "alibi", kernel="flash")
    with pytest.raises(ConfigError, match=r"posenc\.logn_length: must be >= 2"):
        lce.patch(make_tiny_llama(), "alibi", logn=True, logn_length=1)


class LargestAllocation(TorchDispatchMode):
    """The largest storage any aten op returns (forward and backward ops alike)."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.nbytes = max(self.nbytes, t.untyped_storage().nbytes())
        return out


def test_blockwise_memory_at_4096_tokens():
    """Training at T = 4096 (forward and backward): no op ever allocates more than one block of scores, far from a
    [H, T, T] tensor, and what autograd keeps between forward and backward is O(T), not the per-block probabilities
    (they are recomputed). The no-grad (evaluation) forward runs the same block function, minus the recomputation."""
    heads, length, block = 2, 4096, 256
    full = heads * length * length * 4  # one fp32 [H, T, T] tensor: 128 MiB
    q, k, v = (t.requires_grad_() for t in random_qkv(1, heads, 1, length, length, dtype=torch.float32))
    pos = torch.arange(length)[None]
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with LargestAllocation() as mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = alibi_attention(q, k, v, alibi_slopes(heads), pos, pos, 0.35, block_size=block)
        out.sum().backward()
    assert mode.nbytes <= heads * block * length * 4 == full // 16  # one block of fp32 scores
    assert sum(saved.values()) < full / 100
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
