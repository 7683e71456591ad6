"""ReRoPE: every score equals an independent per-pair reference q_i . R(-min(i - j, w)) k_j (kernel on random inputs,
forward and backward, and the patched model); a window covering the sequence is plain RoPE; keys beyond the window
carry no position; decode == full forward; padding; training; unpatch; save/load; log-n on by default."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import lce
from lce.errors import ConfigError
from lce.hf.adapters import adapter_for
from lce.posenc.logn import logn_scale
from lce.posenc.rerope import ReRope, rerope_attention
from tests.conftest import (
    assert_checkpointed_training_step,
    assert_close_to_reference,
    assert_decode_matches_full,
    fp64_logits,
    logits,
    make_tiny_llama,
)
from tests.posenc.pairwise import dispatcher_positions, per_pair_reference, random_qkv

IDS = torch.randint(3, 259, (2, 30), generator=torch.Generator().manual_seed(0))


def rerope_distance(q_pos, k_pos, window, mask=None):
    """The paper's relative position min(i - j, w) for visible causal pairs."""
    def distance(b, i):
        return {j: min(int(q_pos[b, i] - k_pos[b, j]), window) for j in range(k_pos.shape[1])
                if k_pos[b, j] <= q_pos[b, i] and (mask is None or bool(mask[b, 0, i, j]))}
    return distance


def tiny_rotary():
    return LlamaRotaryEmbedding(config=make_tiny_llama().config)


CASES = {  # (B, H, HKV, Tq, Tk, window, block, pads)
    "odd-T13-gqa4:2-w4-block5": (1, 4, 2, 13, 13, 4, 5, [0]),
    "B2-left-padded-T11-w3-block4": (2, 4, 2, 11, 11, 3, 4, [0, 4]),
    "cached-prefix-Tq5-Tk16-w6-block2": (2, 4, 4, 5, 16, 6, 2, [2, 0]),
    "window-1-T9": (1, 2, 1, 9, 9, 1, 3, [0]),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernel_matches_per_pair_reference_forward_and_backward(case):
    batch, heads, kv_heads, tq, tk, window, block, pads = case
    q, k, v = random_qkv(batch, heads, kv_heads, tq, tk)
    q_pos, k_pos, mask = dispatcher_positions(batch, tq, tk, pads)
    rotary = tiny_rotary()
    rotation = adapter_for(make_tiny_llama()).rotation(rotary)
    out = rerope_attention(q, k, v, rotation, q_pos, k_pos, 0.25, window, mask, block_size=block)
    ref = per_pair_reference(q, k, v, rerope_distance(q_pos, k_pos, window, mask), 0.25, rotary)
    # Both sides take cos/sin from fp32 angles (lce: R(i), R(j); reference: R(-(i - j))): ~1e-7 relative rounding.
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    weight = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)


def capture_attention(model):
    calls = []
    hook = lambda module, args, kwargs, out: calls.append((kwargs["hidden_states"], out[0]))
    model.model.layers[0].self_attn.register_forward_hook(hook, with_kwargs=True)
    return calls


def model_reference(model, hidden, window, logn_length=None):
    """Layer 0's attention recomputed from its projections: log-n on queries (true positions), then per-pair ReRoPE."""
    attn = model.model.layers[0].self_attn
    batch, length, _ = hidden.shape
    heads_of = lambda proj: proj(hidden).view(batch, length, -1, attn.head_dim).transpose(1, 2).double()
    q, k, v = heads_of(attn.q_proj), heads_of(attn.k_proj), heads_of(attn.v_proj)
    pos = torch.arange(length).expand(batch, length)
    if logn_length is not None:
        q = q * logn_scale(logn_length)(pos)[:, None, :, None].double()
    out = per_pair_reference(q, k, v, rerope_distance(pos, pos, window), attn.head_dim**-0.5,
                             LlamaRotaryEmbedding(config=model.config))
    return attn.o_proj(out.reshape(batch, length, -1).float())


@pytest.mark.parametrize("logn", [True, False], ids=["logn-default", "no-logn"])
def test_patched_model_matches_per_pair_reference(logn):
    """One layer, 30 tokens, window 7; log-n (on by default, as in the reference code) from position 16 on."""
    model = make_tiny_llama(num_hidden_layers=1)
    params = {"window": 7, "block_size": 8, "logn_length": 16} | ({} if logn else {"logn": False})
    lce.patch(model, "rerope", **params)
    assert ReRope().logn and model.config._attn_implementation == ("lce_rerope_logn" if logn else "lce_rerope")
    calls = capture_attention(model)
    logits(model, IDS)
    hidden, out = calls[0]
    ref = model_reference(model, hidden, 7, 16 if logn else None)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # fp32 model vs fp64 reference


@pytest.mark.parametrize("window", [29, 30, 1000], ids=lambda w: f"w{w}")
def test_window_covering_the_sequence_is_plain_rope(window):
    """With w >= T - 1 every pair keeps its true distance (w = T - 1 puts the farthest pair in the clipped segment
    at distance w = i - j); log-n is 1 within the training length (64)."""
    model = make_tiny_llama()
    lce.patch(model, "rerope", window=window, block_size=7)
    stock = make_tiny_llama()  # fp32 order
    assert_close_to_reference(logits(model, IDS), logits(stock, IDS), fp64_logits(stock, IDS))


def test_keys_beyond_the_window_carry_no_position():
    """In one layer, the last token sees every key at least w away at the same distance w: shuffling those tokens
    leaves its logits unchanged (under RoPE it does not)."""
    model, rope = make_tiny_llama(num_hidden_layers=1), make_tiny_llama(num_hidden_layers=1)
    lce.patch(model, "rerope", window=6)
    ids = IDS[:1]
    far = ids.shape[1] - 6  # positions 0..far-1 are >= 6 away from the last token
    perm = torch.cat([torch.randperm(far, generator=torch.Generator().manual_seed(4)), torch.arange(far, ids.shape[1])])
    torch.testing.assert_close(logits(model, ids[:, perm])[0, -1], logits(model, ids)[0, -1], atol=1e-5, rtol=1e-5)
    assert (logits(rope, ids[:, perm])[0, -1] - logits(rope, ids)[0, -1]).abs().max() > 1e-3


def test_decode_matches_full_forward_beyond_window_and_training_length():
    model = make_tiny_llama(max_position_embeddings=16)
    lce.patch(model, "rerope", window=6, block_size=4)
    ids = torch.randint(3, 259, (2, 30), generator=torch.Generator().manual_seed(3))
    assert_decode_matches_full(model, ids, prefill=9)


def test_left_padding_does_not_change_real_tokens():
    model = make_tiny_llama()
    lce.patch(model, "rerope", window=5, block_size=4)
    ids = IDS[:1, :15]
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 15, dtype=torch.long)], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = logits(model, padded, attention_mask=mask, position_ids=position_ids)
    torch.testing.assert_close(out[:, 6:], logits(model, ids), atol=2e-5, rtol=2e-5)  # fp32 reduction order


def test_training_step_with_activation_checkpointing():
    model = make_tiny_llama()
    lce.patch(model, "rerope", window=5, block_size=8)
    assert_checkpointed_training_step(model, IDS)
    assert model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_patch_then_unpatch_equals_never_patched(tiny_model):
    before = logits(tiny_model, IDS)
    rotary = tiny_model.model.rotary_emb
    lce.patch(tiny_model, "rerope", window=4)
    assert not torch.allclose(logits(tiny_model, IDS), before)
    lce.unpatch(tiny_model)
    assert torch.equal(logits(tiny_model, IDS), before)
    assert tiny_model.model.rotary_emb is rotary
    assert tiny_model.config._attn_implementation == "sdpa"


def test_save_load_round_trip(tmp_path):
    model = make_tiny_llama()
    lce.patch(model, "rerope", window=5, logn_length=12)
    lce.save_model(model, lce.data.ByteTokenizer(), tmp_path)
    loaded, _ = lce.load_model(str(tmp_path))
    assert lce.patch_spec(loaded)["posenc"] == {"name": "rerope", "window": 5, "block_size": 1024, "logn": True,
                                                "logn_length": 12}
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_bad_parameters_name_the_field():
    for window in (0, -3):
        with pytest.raises(ConfigError, match=r"posenc\.window: must be >= 1"):
            lce.patch(make_tiny_llama(), "rerope", window=window)
    with pytest.raises(ConfigError, match=r"posenc\.block_size: must be >= 1"):
        lce.patch(make_tiny_llama(), "rerope", block_size=0)
    with pytest.raises(ConfigError, match=r"posenc\.window: expected an integer"):
        lce.patch(make_tiny_llama(), "rerope", window="wide")
