"""Attention sinks (StreamingLLM with pos-shift): every score equals an independent per-pair reference that simulates
the evicting cache (first S + latest R tokens, RoPE positions = indices in the cache); the masked full forward equals
real token-by-token streaming with an evicting KV cache; S + R >= T is plain RoPE; decode == full forward; padding;
key pruning; training; unpatch; save/load; log-n composition."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import lce
from lce.core import segments, staircase
from lce.errors import ConfigError
from lce.hf.adapters import adapter_for
from lce.posenc.logn import logn_scale
from lce.posenc.sinks import sink_segments, sinks_attention
from tests.conftest import (
    assert_checkpointed_training_step,
    assert_close_to_reference,
    assert_decode_matches_full,
    forward_cached,
    fp64_logits,
    logits,
    make_tiny_llama,
    scale_queries,
)
from tests.posenc.pairwise import dispatcher_positions, per_pair_reference, random_qkv

IDS = torch.randint(3, 259, (2, 30), generator=torch.Generator().manual_seed(0))


def streaming_distance(q_pos, k_pos, start, recent, mask=None):
    """Relative positions as StreamingLLM's cache gives them, from token order alone: the text so far is the visible
    key columns up to and including the query's own; the cache keeps its first ``start`` and last ``recent`` tokens;
    RoPE positions are indices in the cache, the query being the last entry."""
    def distance(b, i):
        text = [c for c in range(k_pos.shape[1])
                if k_pos[b, c] <= q_pos[b, i] and (mask is None or bool(mask[b, 0, i, c]))]
        cache = [c for n, c in enumerate(text) if n < start or len(text) - n <= recent]
        return {c: len(cache) - 1 - n for n, c in enumerate(cache)}
    return distance


CASES = {  # (B, H, HKV, Tq, Tk, start, recent, block, pads)
    "odd-T15-gqa4:2-S2-R4-block4": (1, 4, 2, 15, 15, 2, 4, 4, [0]),
    "B2-left-padded-T13-S3-R3-block5": (2, 4, 2, 13, 13, 3, 3, 5, [0, 4]),
    "cached-prefix-Tq5-Tk17-S1-R6-block2": (2, 4, 4, 5, 17, 1, 6, 2, [3, 0]),
    "no-sinks-S0-R3": (1, 2, 1, 11, 11, 0, 3, 3, [0]),
    "window-1-S2-R1": (1, 2, 1, 9, 9, 2, 1, 4, [0]),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernel_matches_per_pair_reference_forward_and_backward(case):
    batch, heads, kv_heads, tq, tk, start, recent, block, pads = case
    q, k, v = random_qkv(batch, heads, kv_heads, tq, tk)
    q_pos, k_pos, mask = dispatcher_positions(batch, tq, tk, pads)
    rotary = LlamaRotaryEmbedding(config=make_tiny_llama().config)
    rotation = adapter_for(make_tiny_llama()).rotation(rotary)
    out = sinks_attention(q, k, v, rotation, q_pos, k_pos, 0.25, start, recent, mask, block_size=block)
    ref = per_pair_reference(q, k, v, streaming_distance(q_pos, k_pos, start, recent, mask), 0.25, rotary)
    # Both sides take cos/sin from fp32 angles (lce: R(i), R(j); reference: R(-r)): ~1e-7 relative rounding.
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    weight = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6)


def test_patched_model_matches_per_pair_reference():
    """One layer, 30 tokens, 3 sinks + 8 recent: the model's attention output from its own projections."""
    model = make_tiny_llama(num_hidden_layers=1)
    lce.patch(model, "sinks", start_size=3, recent_size=8, block_size=7)
    calls = []
    model.model.layers[0].self_attn.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((kwargs["hidden_states"], out[0])), with_kwargs=True)
    logits(model, IDS)
    hidden, out = calls[0]
    attn = model.model.layers[0].self_attn
    batch, length, _ = hidden.shape
    heads_of = lambda proj: proj(hidden).view(batch, length, -1, attn.head_dim).transpose(1, 2).double()
    pos = torch.arange(length).expand(batch, length)
    ref = per_pair_reference(heads_of(attn.q_proj), heads_of(attn.k_proj), heads_of(attn.v_proj),
                             streaming_distance(pos, pos, 3, 8), attn.head_dim**-0.5,
                             LlamaRotaryEmbedding(config=model.config))
    ref = attn.o_proj(ref.reshape(batch, length, -1).float())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # fp32 model vs fp64 reference


def test_full_forward_equals_streaming_with_an_evicting_cache():
    """The masked full forward is StreamingLLM: decode token by token while really evicting the KV cache down to
    S sinks + the latest R - 1 entries (the current token is the R-th) and feeding cache-local positions, as
    streaming-llm's pos-shift does. Two layers, so evicted tokens' deeper states must agree too."""
    start, recent = 2, 5
    model = make_tiny_llama()
    lce.patch(model, "sinks", start_size=start, recent_size=recent, block_size=8)
    ids = IDS[:1, :24]
    prefill = start + recent - 1  # nothing to evict yet
    with torch.no_grad():
        out, cache = forward_cached(model, ids[:, :prefill])
        steps = [out.logits]
        for t in range(prefill, ids.shape[1]):
            for layer in cache.layers:
                if layer.keys.shape[2] > start + recent - 1:
                    layer.keys = torch.cat([layer.keys[:, :, :start], layer.keys[:, :, -(recent - 1):]], 2)
                    layer.values = torch.cat([layer.values[:, :, :start], layer.values[:, :, -(recent - 1):]], 2)
            position = torch.tensor([[min(t, start + recent - 1)]])
            out, cache = forward_cached(model, ids[:, t : t + 1], cache, position_ids=position)
            steps.append(out.logits)
    assert cache.get_seq_length() == start + recent
    assert_close_to_reference(torch.cat(steps, 1), logits(model, ids), fp64_logits(model, ids))  # fp32 order


@pytest.mark.parametrize("start,recent", [(4, 26), (0, 30), (2, 100)], ids=["S4-R26", "S0-R30", "S2-R100"])
def test_cache_covering_the_sequence_is_plain_rope(start, recent):
    model = make_tiny_llama()
    lce.patch(model, "sinks", start_size=start, recent_size=recent, block_size=7)
    stock = make_tiny_llama()  # fp32 order
    assert_close_to_reference(logits(model, IDS), logits(stock, IDS), fp64_logits(stock, IDS))


def test_decode_matches_full_forward_beyond_the_cache():
    model = make_tiny_llama(max_position_embeddings=16)
    lce.patch(model, "sinks", start_size=2, recent_size=6, block_size=4)
    ids = torch.randint(3, 259, (2, 30), generator=torch.Generator().manual_seed(3))
    assert_decode_matches_full(model, ids, prefill=12)


def test_left_padding_does_not_change_real_tokens():
    """Sinks are the first real tokens (positions from the attention mask), not the pads."""
    model = make_tiny_llama()
    lce.patch(model, "sinks", start_size=2, recent_size=4, block_size=4)
    ids = IDS[:1, :15]
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 15, dtype=torch.long)], 1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = logits(model, padded, attention_mask=mask, position_ids=position_ids)
    torch.testing.assert_close(out[:, 6:], logits(model, ids), atol=2e-5, rtol=2e-5)  # fp32 reduction order


def test_each_block_scores_only_the_keys_it_may_see(monkeypatch):
    """At 2048 tokens with S = 4, R = 60, blocks of 64 queries: at most S + R + block - 1 keys per block."""
    seen = []
    original = segments.segmented_attention

    def spy(query, key, *args, **kwargs):
        seen.append(key.shape[2])
        return original(query, key, *args, **kwargs)

    monkeypatch.setattr(segments, "segmented_attention", spy)
    q, k, v = (t.detach().float() for t in random_qkv(1, 2, 1, 2048, 2048))
    pos = torch.arange(2048)[None]
    rotation = adapter_for(make_tiny_llama()).rotation(make_tiny_llama().model.rotary_emb)
    sinks_attention(q, k, v, rotation, pos, pos, 0.35, 4, 60, block_size=64)  # grad mode: the training path
    assert len(seen) == 32 and max(seen) <= 4 + 60 + 64 - 1


def test_inference_blocks_read_only_the_sinks_and_their_window(monkeypatch):
    """The staircase path (inference on CPU) at 2048 tokens with S = 4, R = 60: the pieces of every block of queries
    cover at most S + R + rows - 1 key columns (the rows are at most R wide)."""
    widths = []
    original = staircase.staircase_pieces

    def spy(start, stop, dtype):
        pieces = original(start, stop, dtype)
        widths.append(sum(piece.stop - piece.start for piece in pieces))
        return pieces

    monkeypatch.setattr(staircase, "staircase_pieces", spy)
    q, k, v = (t.detach().float() for t in random_qkv(1, 2, 1, 2048, 2048))
    pos = torch.arange(2048)[None]
    rotation = adapter_for(make_tiny_llama()).rotation(make_tiny_llama().model.rotary_emb)
    with torch.no_grad():
        out = sinks_attention(q, k, v, rotation, pos, pos, 0.35, 4, 60)
        reference = sinks_attention(q, k, v, rotation, pos, pos, 0.35, 4, 60, attention_mask=torch.ones(
            1, 1, 2048, 2048, dtype=torch.bool))  # a mask: the masked path, which gathers each block's columns
    rows = staircase.staircase_rows(sink_segments(4, 60))
    # Blocks of `rows` queries, two segments each: per block, recent + sinks pieces.
    assert len(widths) == 2 * (2048 // rows) and max(widths) <= 4 + 60 + rows - 1
    torch.testing.assert_close(out, reference, atol=3e-6, rtol=3e-6)  # fp32, per-piece softmaxes reweighted


def test_training_step_with_activation_checkpointing():
    model = make_tiny_llama()
    lce.patch(model, "sinks", start_size=2, recent_size=6, block_size=8)
    assert_checkpointed_training_step(model, IDS)
    assert model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_patch_then_unpatch_equals_never_patched(tiny_model):
    before = logits(tiny_model, IDS)
    rotary = tiny_model.model.rotary_emb
    lce.patch(tiny_model, "sinks", start_size=1, recent_size=4)
    assert not torch.allclose(logits(tiny_model, IDS), before)
    lce.unpatch(tiny_model)
    assert torch.equal(logits(tiny_model, IDS), before)
    assert tiny_model.model.rotary_emb is rotary
    assert tiny_model.config._attn_implementation == "sdpa"


def test_save_load_round_trip(tmp_path):
    model = make_tiny_llama()
    lce.patch(model, "sinks", start_size=3, recent_size=5)
    lce.save_model(model, lce.data.ByteTokenizer(), tmp_path)
    loaded, _ = lce.load_model(str(tmp_path))
    assert lce.patch_spec(loaded)["posenc"] == {"name": "sinks", "start_size": 3, "recent_size": 5,
                                                "block_size": 1024, "logn": False, "logn_length": None}
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_composes_with_logn():
    """Reference: sinks without log-n and queries scaled through a q_proj hook (RoPE is linear, so scaling before
    or after rotation is the same); log-n uses the true position, not the cache-local one."""
    model, reference = make_tiny_llama(), make_tiny_llama()
    lce.patch(model, "sinks", start_size=2, recent_size=6, logn=True, logn_length=8)
    lce.patch(reference, "sinks", start_size=2, recent_size=6)
    assert model.config._attn_implementation == "lce_sinks_logn"
    factor = logn_scale(8)(torch.arange(IDS.shape[1])[None])[0]
    scale_queries(reference, factor)
    torch.testing.assert_close(logits(model, IDS), logits(reference, IDS), atol=1e-5, rtol=1e-5)  # fp32 order
    assert_decode_matches_full(model, IDS, prefill=9)


def test_bad_parameters_name_the_field():
    with pytest.raises(ConfigError, match=r"posenc\.start_size: must be >= 0"):
        lce.patch(make_tiny_llama(), "sinks", start_size=-1)
    for recent in (0, -5):
        with pytest.raises(ConfigError, match=r"posenc\.recent_size: must be >= 1"):
            lce.patch(make_tiny_llama(), "sinks", recent_size=recent)
    with pytest.raises(ConfigError, match=r"posenc\.block_size: must be >= 1"):
        lce.patch(make_tiny_llama(), "sinks", block_size=0)
