"""Dual Chunk Attention against an independent per-pair reference (forward and backward), hand-written distance
matrices, the largest relative distance of each convention, identities (plain RoPE within a chunk, decode == full
forward, left padding), training, unpatch, save/load, log-n composition, golden constants and bad parameters.

The per-pair reference (``pair_reference``) is also used by ``test_self_extend.py``: it computes every logit as
``q_i . R(-r(i, j)) k_j`` from a relative distance ``r`` given as a plain Python function of absolute positions, with
the rotation written as a complex phase (``R(m)^T R(n) = R(n - m)``), independent of ``Rotation`` and of the
segments.
"""

import math
import types

import pytest
import torch
from transformers import LlamaConfig

import lce
from lce.errors import ConfigError, LceError
from lce.kernels.rope import Rotation
from lce.posenc.dca import Dca, DcaGeometry, dca_attention, dca_mscale
from lce.posenc.logn import logn_scale
from tests.conftest import (
    assert_checkpointed_training_step,
    assert_close_to_reference,
    assert_decode_matches_full,
    fp64_logits,
    logits,
    make_tiny_llama,
    scale_queries,
)
from tests.posenc.relative import relative_positions

# ---------------------------------------------------------------------------------------------------------------
# The independent reference


def inverse_frequencies(dim: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def pair_reference(q, k, v, q_pos, k_pos, distance, inv_freq, scaling, mask=None, logit_scale=None):
    """Softmax attention whose logit for (query i, key j) is ``scaling * q_i . R(-r) k_j``, ``r = distance(i, j)``.

    Args:
        q: ``[B, H, Tq, D]``; k, v: ``[B, HKV, Tk, D]`` (D == rotary dim, Llama's half-split pairs).
        q_pos, k_pos: ``[B, Tq]``, ``[B, Tk]`` absolute positions.
        distance: ``(i: int, j: int) -> int``, called for every causal, unmasked pair.
        mask: optional ``[B, 1, Tq, Tk]`` boolean.
        logit_scale: optional ``(i: int) -> float`` multiplying the logits of query ``i``.

    Returns:
        ``[B, Tq, H, D]`` in float64; rows with no visible key are 0.
    """
    batch, heads, tq, dim = q.shape
    tk = k.shape[2]
    groups = heads // k.shape[1]
    half = dim // 2
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    zq = torch.complex(q.double()[..., :half], q.double()[..., half:])
    zk = torch.complex(k[..., :half], k[..., half:])
    q_list, k_list = q_pos.expand(batch, tq).tolist(), k_pos.expand(batch, tk).tolist()
    mask_list = None if mask is None else mask[:, 0].expand(batch, tq, tk).tolist()
    rel_list = [[[0] * tk for _ in range(tq)] for _ in range(batch)]
    allowed_list = [[[False] * tk for _ in range(tq)] for _ in range(batch)]
    for b in range(batch):
        for a, i in enumerate(q_list[b]):
            for c, j in enumerate(k_list[b]):
                if j <= i and (mask_list is None or mask_list[b][a][c]):
                    allowed_list[b][a][c] = True
                    rel_list[b][a][c] = distance(i, j)
    rel = torch.tensor(rel_list, dtype=torch.float64)
    allowed = torch.tensor(allowed_list, dtype=torch.bool)
    row_scale = torch.tensor([[logit_scale(i) if logit_scale else 1.0 for i in row] for row in q_list],
                             dtype=torch.float64)
    # q . R(-r) k = Re(sum conj(zq) * zk * exp(-i r theta)) for half-split rotary pairs.
    angle = -rel[..., None] * inv_freq.double()
    phase = torch.polar(torch.ones_like(angle), angle)
    scores = torch.einsum("bhqd,bhkd,bqkd->bhqk", zq.conj(), zk, phase).real * scaling * row_scale[:, None, :, None]
    scores = torch.where(allowed[:, None], scores, torch.full_like(scores, float("-inf")))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, v).transpose(1, 2)


def install_reference_attention(model, distance, logit_scale=None):
    """Replace every self-attention forward of an *unpatched* model with ``pair_reference`` (causal, no padding)."""
    inv_freq = model.model.rotary_emb.inv_freq.double()

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None, **kwargs):
        batch, t, _ = hidden_states.shape
        shape = (batch, t, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        pos = position_ids if position_ids is not None else torch.arange(t)[None]
        pos = pos.expand(batch, t)
        out = pair_reference(q, k, v, pos, pos, distance, inv_freq, self.scaling, logit_scale=logit_scale)
        return self.o_proj(out.to(hidden_states.dtype).reshape(batch, t, -1)), None

    for layer in model.model.layers:
        layer.self_attn.forward = types.MethodType(forward, layer.self_attn)
    return model


def assert_left_padding_is_invisible(model, ids: torch.Tensor, pads: int):
    """A batch of ``ids`` (unpadded) and ``ids[pads:]`` left-padded to the same length, with position_ids from the
    attention mask's cumsum: each row's real tokens get the logits of their own unpadded forward."""
    padded = torch.stack([ids, torch.cat([torch.zeros(pads, dtype=torch.long), ids[pads:]])])
    mask = torch.ones_like(padded)
    mask[1, :pads] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    batched = logits(model, padded, attention_mask=mask, position_ids=position_ids)
    # fp32 sums over a different number of masked terms: equal up to rounding.
    torch.testing.assert_close(batched[:1], logits(model, ids[None]), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(batched[1:, pads:], logits(model, ids[None, pads:]), atol=2e-5, rtol=2e-5)


def kernel_inputs(batch, heads, kv_heads, tq, tk, dim, pads=0, seed=0):
    """Random float64 q/k/v and the positions and mask the dispatcher would pass (last ``tq`` of ``tk`` queries;
    batch row 1 left-padded by ``pads``)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tq, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, kv_heads, tk, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, kv_heads, tk, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    real = torch.ones(batch, tk, dtype=torch.bool)
    if pads:
        real[1, :pads] = False
    key_pos = (real.long().cumsum(-1) - 1).clamp(min=0)
    q_pos = key_pos[:, tk - tq :]
    k_pos = q_pos[:, -1:] - (tk - 1) + torch.arange(tk)  # lce.core.plan.key_positions
    index = torch.arange(tk)
    mask = (real[:, None, :] & (index[None, :] <= index[tk - tq :, None])[None])[:, None] if pads else None
    return q, k, v, q_pos, k_pos, mask


# ---------------------------------------------------------------------------------------------------------------
# DCA's effective relative distance, straight from the definitions (paper §3 and chunkllama_attn_replace.py)


def code_distance(s: int, w: int):
    stride = s - w

    def r(i: int, j: int) -> int:
        gap = i // stride - j // stride
        if gap == 0:
            p_q = i % stride
        elif gap == 1:
            p_q = min(i % stride + stride, s)
        else:
            p_q = min(2 * stride - 1, s)  # qc_t[chunk_len - 1]
        return p_q - j % stride

    return r


def paper_distance(s: int, w: int, c: int):
    def r(i: int, j: int) -> int:
        gap = i // s - j // s
        if gap == 0:
            p_q = i % s
        elif gap == 1:
            p_q = s + i % s if i % s < w else c - 1
        else:
            p_q = c - 1
        return p_q - j % s

    return r


def distance_for(geometry: DcaGeometry):
    s, w, c = geometry.chunk_size, geometry.local_window, geometry.pretraining_length
    return code_distance(s, w) if geometry.convention == "code" else paper_distance(s, w, c)


def mscale_squared(c: int):
    return lambda i: (0.05 * math.log((i + 1) / c) + 1) ** 2 if i + 1 > c else 1.0


def loop_matrix(r, length: int) -> torch.Tensor:
    return torch.tensor([[r(i, j) if j <= i else -1 for j in range(length)] for i in range(length)])


# ---------------------------------------------------------------------------------------------------------------
# Distances


CODE_S4_W1 = [  # chunk_size 4, local_window 1: stride 3; successive queries at min(i%3 + 3, 4); inter at 4
    [0],
    [1, 0],
    [2, 1, 0],
    [3, 2, 1, 0],
    [4, 3, 2, 1, 0],
    [4, 3, 2, 2, 1, 0],
    [4, 3, 2, 3, 2, 1, 0],
    [4, 3, 2, 4, 3, 2, 1, 0],
    [4, 3, 2, 4, 3, 2, 2, 1, 0],
    [4, 3, 2, 4, 3, 2, 3, 2, 1, 0],
]
PAPER_S4_W1_C6 = [  # chunk_size 4, local_window 1, c = 6: successive queries [4, 5, 5, 5]; inter at c-1 = 5
    [0],
    [1, 0],
    [2, 1, 0],
    [3, 2, 1, 0],
    [4, 3, 2, 1, 0],
    [5, 4, 3, 2, 1, 0],
    [5, 4, 3, 2, 2, 1, 0],
    [5, 4, 3, 2, 3, 2, 1, 0],
    [5, 4, 3, 2, 4, 3, 2, 1, 0],
    [5, 4, 3, 2, 5, 4, 3, 2, 1, 0],
]


def lower_triangle(rows) -> torch.Tensor:
    return torch.tensor([row + [-1] * (len(rows) - len(row)) for row in rows])


@pytest.mark.parametrize("convention,rows", [("code", CODE_S4_W1), ("paper", PAPER_S4_W1_C6)], ids=["code", "paper"])
def test_relative_distances_by_hand(convention, rows):
    geometry = Dca(chunk_size=4, local_window=1, pretraining_length=6, convention=convention).geometry(6)
    expected = lower_triangle(rows)
    assert torch.equal(relative_positions(geometry.segments(), 10), expected)
    assert torch.equal(loop_matrix(distance_for(geometry), 10), expected)


@pytest.mark.parametrize(
    "geometry,largest",
    [
        (DcaGeometry(64, 48, 8, "code"), 48),  # ChunkLlama defaults for c = 64: s = 3c/4
        (DcaGeometry(64, 48, 8, "paper"), 63),  # c - 1
        (DcaGeometry(64, 48, 16, "paper"), 63),  # w = c - s, the paper's suggestion
        (DcaGeometry(64, 20, 15, "code"), 9),  # w > s/2: inter queries at 2(s-w)-1 = 9 < s
        (DcaGeometry(16, 12, 0, "code"), 12),
    ],
    ids=["code", "paper", "paper-w=c-s", "code-wide-window", "code-w0"],
)
def test_largest_relative_distance(geometry, largest):
    """Over every pair of a sequence several chunks long, the largest effective distance is ``s`` (code, ``w < s/2``),
    ``2(s - w) - 1`` (code, wider windows) or ``c - 1`` (paper), never beyond the pre-training range; the reference
    loop and the segments agree on every pair."""
    length = 5 * geometry.chunk_size + 3
    matrix = relative_positions(geometry.segments(), length)
    assert torch.equal(matrix, loop_matrix(distance_for(geometry), length))
    assert matrix.max().item() == largest == geometry.max_relative_position
    assert matrix.max().item() < geometry.pretraining_length
    assert (matrix[torch.ones(length, length, dtype=torch.bool).tril()] >= 0).all()


def test_successive_chunk_keeps_exact_local_distances():
    """Code: the first ``w + 1`` queries of a chunk see the previous chunk at true distance; paper: the first ``w``."""
    true = torch.arange(40)[:, None] - torch.arange(40)[None]
    code = relative_positions(DcaGeometry(64, 12, 4, "code").segments(), 40)  # stride 8
    assert torch.equal(code[8:13, :8], true[8:13, :8]) and not torch.equal(code[13, :8], true[13, :8])
    paper = relative_positions(DcaGeometry(64, 12, 4, "paper").segments(), 40)
    assert torch.equal(paper[12:16, :12], true[12:16, :12]) and not torch.equal(paper[16, :12], true[16, :12])


# ---------------------------------------------------------------------------------------------------------------
# Kernel == per-pair reference, forward and backward


def test_reference_with_true_distances_is_rope():
    """The reference itself: with r(i, j) = i - j it is causal attention over RoPE-rotated q and k."""
    q, k, v, pos, _, _ = kernel_inputs(2, 4, 2, 11, 11, 16)
    rotation = Rotation(inverse_frequencies(16).float())
    out = pair_reference(q, k, v, pos, pos, lambda i, j: i - j, inverse_frequencies(16), 0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(
        rotation.apply(q, pos), rotation.apply(k, pos), v, is_causal=True, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, expected.transpose(1, 2))


GEOMETRIES = {  # (geometry, mscale); c is small so that mscale acts within T = 13
    "code-s5w2c8": (DcaGeometry(8, 5, 2, "code"), True),  # stride 3: T = 13 spans five chunks, the last partial
    "paper-s4w1c6": (DcaGeometry(6, 4, 1, "paper"), True),
    "code-s4w0c4-no-mscale": (DcaGeometry(4, 4, 0, "code"), False),
    "paper-s3w2c5-no-mscale": (DcaGeometry(5, 3, 2, "paper"), False),
}
SHAPES = {  # (Tq, Tk, pads, block_size)
    "prefill-T13-block4": (13, 13, 0, 4),
    "decode-3of14-block2": (3, 14, 0, 2),
    "padded-T13-block5": (13, 13, 3, 5),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("geometry,mscale", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_kernel_matches_pair_reference(geometry, mscale, shape):
    """Forward and gradients (q, k, v) equal the per-pair reference in float64 (GQA 4:2, odd T, T not a multiple of
    the chunk stride, block size not dividing T, decode-shaped queries, left padding)."""
    tq, tk, pads, block = shape
    q, k, v, q_pos, k_pos, mask = kernel_inputs(2, 4, 2, tq, tk, 16, pads=pads, seed=tq + tk)
    rotation = Rotation(inverse_frequencies(16).float())
    out = dca_attention(q, k, v, geometry, rotation, q_pos, k_pos, 0.25, mask, mscale=mscale, block_size=block)
    ref = pair_reference(q, k, v, q_pos, k_pos, distance_for(geometry), inverse_frequencies(16), 0.25, mask,
                         logit_scale=mscale_squared(geometry.pretraining_length) if mscale else None)
    # Rotation computes angles in fp32 (as transformers does), the reference in float64: ~2e-7 observed.
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, atol=2e-6, rtol=2e-6, msg=lambda m, name=name: f"d/d{name}: {m}")


def test_gradient_flows_through_every_segment():
    """The last query of a five-chunk sequence reaches keys of its own chunk, the previous one and earlier ones; each
    key gets a nonzero gradient (ChunkLlama detaches the merge weights; here one softmax covers all three)."""
    geometry = DcaGeometry(8, 5, 2, "code")
    q, k, v, q_pos, k_pos, _ = kernel_inputs(1, 2, 2, 13, 13, 16)
    out = dca_attention(q, k, v, geometry, Rotation(inverse_frequencies(16).float()), q_pos, k_pos, 0.25)
    (grad_k,) = torch.autograd.grad(out[:, -1].sum(), (k,))
    per_key = grad_k.abs().sum(dim=(0, 1, 3))
    intra, successive, inter = [12], [9, 10, 11], list(range(9))  # stride 3, query 12 in chunk 4
    assert torch.equal(relative_positions(geometry.segments(), 13)[12, 9:12], torch.tensor([3, 2, 1]))
    for keys in (intra, successive, inter):
        assert (per_key[keys] > 0).all()


# ---------------------------------------------------------------------------------------------------------------
# The patched model


IDS = torch.randint(3, 259, (2, 50), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("convention", ["code", "paper"])
def test_one_layer_model_matches_pair_reference(convention):
    """Patched 1-layer model == the same model with the per-pair reference as its attention: logits and the gradient
    of every parameter. c = 16 (defaults s = 12, w = 2), T = 37: past the chunk, past c (mscale active)."""
    model = make_tiny_llama(num_hidden_layers=1, max_position_embeddings=16)
    reference = make_tiny_llama(num_hidden_layers=1, max_position_embeddings=16)
    lce.patch(model, "dca", convention=convention)
    geometry = Dca(convention=convention).geometry(16)
    install_reference_attention(reference, distance_for(geometry), mscale_squared(16))
    assert_model_matches_reference(model, reference, IDS[:, :37])


def assert_model_matches_reference(model, reference, ids):
    """Logits and every parameter's gradient of the loss. fp32 model (angles in fp32, as transformers computes them)
    vs float64 reference attention: ~2e-7 observed on logits of order 1, so 2e-6; gradients by relative norm error
    (parameters' gradients differ by orders of magnitude), ~3e-7 observed, so 1e-5."""
    out, ref = model(ids, labels=ids), reference(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, atol=2e-6, rtol=2e-6)
    out.loss.backward()
    ref.loss.backward()
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        assert r.grad.norm() > 0, name
        assert (p.grad - r.grad).norm() / r.grad.norm() < 1e-5, name


@pytest.mark.parametrize("convention", ["code", "paper"])
def test_chunk_as_long_as_the_input_is_plain_rope(convention):
    """With s >= T every pair is exact (code: the second chunk starts at s - w and its first w + 1 queries are exact;
    paper: one chunk), so the model is the unpatched one. T = c would make mscale 1 anyway."""
    model, reference = make_tiny_llama(), make_tiny_llama()  # c = 64
    lce.patch(model, "dca", chunk_size=40, convention=convention)
    ids = IDS[:, :40]
    assert_close_to_reference(logits(model, ids), logits(reference, ids), fp64_logits(reference, ids))  # eager vs SDPA
    assert (logits(model, IDS) - logits(reference, IDS)).abs().max() > 1e-3  # T = 50 > s: no longer RoPE


@pytest.mark.parametrize("convention", ["code", "paper"])
def test_decode_matches_full_forward_far_past_the_chunk(convention):
    """c = 16, s = 12: T = 40 spans four chunks and passes c (mscale per query); prefill 7, then token by token."""
    model = make_tiny_llama(max_position_embeddings=16)
    lce.patch(model, "dca", convention=convention)
    assert_decode_matches_full(model, IDS[:, :40], prefill=7)


def test_left_padding_does_not_change_real_tokens():
    model = make_tiny_llama(max_position_embeddings=16)
    lce.patch(model, "dca")
    assert_left_padding_is_invisible(model, IDS[0, :35], pads=6)


def test_training_step_with_activation_checkpointing():
    model = make_tiny_llama(max_position_embeddings=16)
    lce.patch(model, "dca")
    assert_checkpointed_training_step(model, IDS[:, :40])


def test_attention_dropout_is_refused():
    model = make_tiny_llama(max_position_embeddings=16, attention_dropout=0.1)
    lce.patch(model, "dca")
    model.train()
    with pytest.raises(LceError, match="posenc=dca has no attention dropout"):
        model(IDS[:, :20])


def test_patch_then_unpatch_equals_never_patched():
    model, reference = make_tiny_llama(max_position_embeddings=16), make_tiny_llama(max_position_embeddings=16)
    lce.patch(model, "dca")
    assert not torch.equal(logits(model, IDS), logits(reference, IDS))
    lce.unpatch(model)
    assert torch.equal(logits(model, IDS), logits(reference, IDS))
    assert model.config._attn_implementation == "sdpa"


def test_save_load_round_trip(tmp_path):
    model = make_tiny_llama(max_position_embeddings=16)
    lce.patch(model, "dca", convention="paper", local_window=3, mscale=False)
    lce.save_model(model, lce.data.ByteTokenizer(), tmp_path)
    loaded, _ = lce.load_model(str(tmp_path))
    assert loaded.config.lce["posenc"] == {**loaded.config.lce["posenc"], "name": "dca", "convention": "paper",
                                           "local_window": 3, "mscale": False, "chunk_size": None}
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_composes_with_logn():
    """dca + logn == dca with queries scaled by the log-n factor (hook on q_proj; RoPE is linear in q)."""
    model, reference = make_tiny_llama(max_position_embeddings=16), make_tiny_llama(max_position_embeddings=16)
    lce.patch(model, "dca", logn=True, logn_length=8)
    assert model.config._attn_implementation == "lce_dca_logn"
    lce.patch(reference, "dca")
    factor = logn_scale(8)(torch.arange(IDS.shape[1])[None])[0]
    scale_queries(reference, factor)
    torch.testing.assert_close(logits(model, IDS), logits(reference, IDS), atol=1e-5, rtol=1e-5)  # fp32 order
    assert (logits(model, IDS) - logits(make_tiny_llama(max_position_embeddings=16), IDS)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Constants and parameters


def test_llama2_code_defaults():
    """METHODS §2.13: c = 4096 -> chunk_size 3072, local_window 512, stride 2560, largest distance 3072."""
    geometry = Dca().geometry_for(LlamaConfig(max_position_embeddings=4096))
    assert (geometry.chunk_size, geometry.local_window, geometry.stride, geometry.max_relative_position) == (
        3072, 512, 2560, 3072)
    assert geometry.inter_query_position == 3072  # qc_t[chunk_len - 1] = min(2 * 2560 - 1, 3072)
    paper = Dca(convention="paper").geometry_for(LlamaConfig(max_position_embeddings=4096))
    assert (paper.stride, paper.max_relative_position) == (3072, 4095)
    assert Dca(local_window=1024).geometry(4096).stride == 2048  # ChunkLlama's ppl script (w = c/4)


def test_mscale_values():
    lengths = torch.tensor([1, 4096, 4097, 8192, 16384])
    expected = [1.0, 1.0, 0.05 * math.log(4097 / 4096) + 1, 0.05 * math.log(2) + 1, 0.05 * math.log(4) + 1]
    torch.testing.assert_close(dca_mscale(lengths, 4096), torch.tensor(expected))


@pytest.mark.parametrize(
    "params,match",
    [
        ({"chunk_size": 65}, r"posenc\.chunk_size: must be between 1 and the pre-training length c = 64, got 65"),
        ({"chunk_size": 0}, r"posenc\.chunk_size: must be >= 1"),
        ({"chunk_size": 8}, r"posenc\.local_window: must be smaller than chunk_size = 8, got 8 \(the default c/8\)"),
        ({"chunk_size": 8, "local_window": 9}, r"posenc\.local_window: must be smaller than chunk_size = 8, got 9"),
        ({"local_window": -1}, r"posenc\.local_window: must be >= 0, got -1"),
        ({"convention": "paper", "local_window": 17},
         r"posenc\.local_window: convention=paper needs local_window <= c - chunk_size = 16"),
        ({"convention": "papers"}, r"posenc\.convention: 'papers' is not allowed \(did you mean 'paper'\?\)"),
        ({"pretraining_length": 32, "chunk_size": 33}, r"posenc\.chunk_size: .* c = 32, got 33"),
        ({"pretraining_length": 1}, r"posenc\.pretraining_length: must be >= 2"),
    ],
    ids=["chunk>c", "chunk0", "default-window>=chunk", "window>=chunk", "negative-window", "paper-window>c-s",
         "convention-typo", "chunk>pretraining_length", "pretraining_length1"],
)
def test_bad_parameters_name_the_field(params, match):
    with pytest.raises(ConfigError, match=match):
        lce.patch(make_tiny_llama(), "dca", **params)  # c = 64


def test_failed_patch_leaves_the_model_untouched():
    model, reference = make_tiny_llama(), make_tiny_llama()
    with pytest.raises(ConfigError, match=r"posenc\.chunk_size"):
        lce.patch(model, "dca", chunk_size=65)
    assert torch.equal(logits(model, IDS), logits(reference, IDS))
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "_lce_patch")
