"""Self-Extend against the independent per-pair reference of ``test_dca.py`` (forward and backward), a hand-written
distance matrix, the usable length ``(L - W) * G + W`` (golden values and its defining property), identities (plain
RoPE within the neighbor window, decode == full forward, left padding), training, unpatch, save/load, log-n
composition and bad parameters."""

import pytest
import torch

import lce
from lce.errors import ConfigError, LceError
from lce.kernels.rope import Rotation
from lce.posenc.logn import logn_scale
from lce.posenc.self_extend import (
    SelfExtend,
    self_extend_attention,
    self_extend_max_length,
    self_extend_segments,
)
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
from tests.posenc.test_dca import (
    IDS,
    assert_left_padding_is_invisible,
    assert_model_matches_reference,
    install_reference_attention,
    inverse_frequencies,
    kernel_inputs,
    pair_reference,
)


def self_extend_distance(group_size: int, neighbor_window: int):
    """Jin et al. §3: exact within the window, floor-grouped and shifted by ``W - floor(W/G)`` beyond it."""

    def r(i: int, j: int) -> int:
        if i - j < neighbor_window:
            return i - j
        return (i // group_size + neighbor_window - neighbor_window // group_size) - j // group_size

    return r


def loop_matrix(r, length: int) -> torch.Tensor:
    return torch.tensor([[r(i, j) if j <= i else -1 for j in range(length)] for i in range(length)])


# ---------------------------------------------------------------------------------------------------------------
# Distances and the usable length


@pytest.mark.parametrize("args,expected", [((4096, 1024, 8), 25600), ((4096, 1024, 32), 99328),
                                           ((4096, 512, 16), 57856), ((8192, 1024, 16), 115712)])
def test_max_length_golden(args, expected):
    """METHODS §2.13 (Llama-2 W=1024 G=8 is the paper's 25.6k)."""
    assert self_extend_max_length(*args) == expected


@pytest.mark.parametrize("length,window,group", [(16, 4, 2), (16, 6, 3), (20, 8, 4), (16, 5, 1)])
def test_max_length_is_the_longest_input_within_the_training_range(length, window, group):
    """With G dividing W, every effective distance stays <= L - 1 up to ``(L - W) G + W`` tokens, and one more token
    reaches distance L."""
    longest = self_extend_max_length(length, window, group)
    matrix = relative_positions(self_extend_segments(group, window), longest + 1)
    assert matrix[:longest, :longest].max().item() == length - 1
    assert matrix.max().item() == length


def test_relative_distances_by_hand():
    """G = 2, W = 3 (G does not divide W: shift W - floor(W/G) = 2), T = 10."""
    rows = [
        [0],
        [1, 0],
        [2, 1, 0],
        [3, 2, 1, 0],
        [4, 4, 2, 1, 0],
        [4, 4, 3, 2, 1, 0],
        [5, 5, 4, 4, 2, 1, 0],
        [5, 5, 4, 4, 3, 2, 1, 0],
        [6, 6, 5, 5, 4, 4, 2, 1, 0],
        [6, 6, 5, 5, 4, 4, 3, 2, 1, 0],
    ]
    expected = torch.tensor([row + [-1] * (10 - len(row)) for row in rows])
    assert torch.equal(relative_positions(self_extend_segments(2, 3), 10), expected)
    assert torch.equal(loop_matrix(self_extend_distance(2, 3), 10), expected)


@pytest.mark.parametrize("group,window", [(2, 4), (4, 8), (3, 4), (1, 3)])
def test_segments_match_the_definition_and_meet_at_the_window(group, window):
    matrix = relative_positions(self_extend_segments(group, window), 60)
    assert torch.equal(matrix, loop_matrix(self_extend_distance(group, window), 60))
    at_window = torch.diagonal(matrix, offset=-window)  # pairs with i - j == W, the first grouped ones
    if window % group == 0:
        assert (at_window == window).all()  # continuous with the neighbor window
    assert (at_window >= window - 1).all() and (at_window <= window + 1).all()


# ---------------------------------------------------------------------------------------------------------------
# Kernel == per-pair reference, forward and backward


PARAMS = {"G3-W4": (3, 4), "G2-W4": (2, 4), "G4-W1": (4, 1), "G1-W2": (1, 2)}
SHAPES = {  # (Tq, Tk, pads, block_size)
    "prefill-T13-block4": (13, 13, 0, 4),
    "decode-3of14-block2": (3, 14, 0, 2),
    "padded-T13-block5": (13, 13, 3, 5),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("params", PARAMS.values(), ids=PARAMS.keys())
def test_kernel_matches_pair_reference(params, shape):
    """Forward and gradients (q, k, v) equal the per-pair reference in float64 (GQA 4:2, odd T, G not dividing W,
    block size not dividing T, decode-shaped queries, left padding)."""
    group, window = params
    tq, tk, pads, block = shape
    q, k, v, q_pos, k_pos, mask = kernel_inputs(2, 4, 2, tq, tk, 16, pads=pads, seed=tq + tk)
    rotation = Rotation(inverse_frequencies(16).float())
    out = self_extend_attention(q, k, v, group, window, rotation, q_pos, k_pos, 0.25, mask, block_size=block)
    ref = pair_reference(q, k, v, q_pos, k_pos, self_extend_distance(group, window), inverse_frequencies(16), 0.25,
                         mask)
    # Rotation computes angles in fp32 (as transformers does), the reference in float64: ~2e-7 observed.
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, atol=2e-6, rtol=2e-6, msg=lambda m, name=name: f"d/d{name}: {m}")


def test_gradient_flows_through_both_segments():
    q, k, v, q_pos, k_pos, _ = kernel_inputs(1, 2, 2, 13, 13, 16)
    out = self_extend_attention(q, k, v, 3, 4, Rotation(inverse_frequencies(16).float()), q_pos, k_pos, 0.25)
    grad_q, grad_k = torch.autograd.grad(out[:, -1].sum(), (q, k))
    per_key = grad_k.abs().sum(dim=(0, 1, 3))
    assert (per_key[9:] > 0).all() and (per_key[:9] > 0).all()  # neighbor keys 9..12, grouped keys 0..8
    assert grad_q[:, :, -1].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# The patched model


def test_one_layer_model_matches_pair_reference():
    """Patched 1-layer model == the same model with the per-pair reference as its attention (logits and every
    parameter's gradient); L = 16, G = 3, W = 5, T = 37."""
    model = make_tiny_llama(num_hidden_layers=1, max_position_embeddings=16)
    reference = make_tiny_llama(num_hidden_layers=1, max_position_embeddings=16)
    lce.patch(model, "self_extend", group_size=3, neighbor_window=5)
    install_reference_attention(reference, self_extend_distance(3, 5))
    assert_model_matches_reference(model, reference, IDS[:, :37])


def test_window_as_long_as_the_input_is_plain_rope():
    model, reference = make_tiny_llama(), make_tiny_llama()  # L = 64
    lce.patch(model, "self_extend", group_size=4, neighbor_window=40)
    ids = IDS[:, :40]
    assert_close_to_reference(logits(model, ids), logits(reference, ids), fp64_logits(reference, ids))  # eager vs SDPA
    assert (logits(model, IDS) - logits(reference, IDS)).abs().max() > 1e-3  # T = 50 > W: grouped pairs


def test_group_size_one_is_plain_rope():
    """G = 1: grouped positions are the true ones (shift W - W = 0)."""
    model, reference = make_tiny_llama(), make_tiny_llama()
    lce.patch(model, "self_extend", group_size=1, neighbor_window=5)
    assert_close_to_reference(logits(model, IDS), logits(reference, IDS), fp64_logits(reference, IDS))  # eager vs SDPA


def test_decode_matches_full_forward_far_past_the_window():
    """L = 16, W = 5, G = 3, T = 40 (near the usable length 38): prefill 7, then token by token."""
    model = make_tiny_llama(max_position_embeddings=16)
    lce.patch(model, "self_extend", group_size=3, neighbor_window=5)
    assert_decode_matches_full(model, IDS[:, :40], prefill=7)


def test_left_padding_does_not_change_real_tokens():
    model = make_tiny_llama(max_position_embeddings=16)
    lce.patch(model, "self_extend", group_size=3, neighbor_window=5)
    assert_left_padding_is_invisible(model, IDS[0, :35], pads=6)


def test_training_step_with_activation_checkpointing():
    model = make_tiny_llama(max_position_embeddings=16)
    lce.patch(model, "self_extend", group_size=3, neighbor_window=5)
    assert_checkpointed_training_step(model, IDS[:, :40])


def test_attention_dropout_is_refused():
    model = make_tiny_llama(max_position_embeddings=16, attention_dropout=0.1)
    lce.patch(model, "self_extend", group_size=3, neighbor_window=5)
    model.train()
    with pytest.raises(LceError, match="posenc=self_extend has no attention dropout"):
        model(IDS[:, :20])


def test_patch_then_unpatch_equals_never_patched():
    model, reference = make_tiny_llama(max_position_embeddings=16), make_tiny_llama(max_position_embeddings=16)
    lce.patch(model, "self_extend", group_size=3, neighbor_window=5)
    assert not torch.equal(logits(model, IDS), logits(reference, IDS))
    lce.unpatch(model)
    assert torch.equal(logits(model, IDS), logits(reference, IDS))
    assert model.config._attn_implementation == "sdpa"


def test_save_load_round_trip(tmp_path):
    model = make_tiny_llama(max_position_embeddings=16)
    lce.patch(model, "self_extend", group_size=3, neighbor_window=5)
    lce.save_model(model, lce.data.ByteTokenizer(), tmp_path)
    loaded, _ = lce.load_model(str(tmp_path))
    assert (loaded.config.lce["posenc"]["group_size"], loaded.config.lce["posenc"]["neighbor_window"]) == (3, 5)
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_composes_with_logn_as_the_codes_scale_base():
    """The code's ``scale_base`` (q * clip(log(i+1)/log(scale_base), 1)) is ``logn: true, logn_length: scale_base``:
    equal to Self-Extend with queries scaled by a hook on q_proj (RoPE is linear in q)."""
    model, reference = make_tiny_llama(max_position_embeddings=16), make_tiny_llama(max_position_embeddings=16)
    lce.patch(model, "self_extend", group_size=3, neighbor_window=5, logn=True, logn_length=16)
    assert model.config._attn_implementation == "lce_self_extend_logn"
    lce.patch(reference, "self_extend", group_size=3, neighbor_window=5)
    positions = torch.arange(IDS.shape[1], dtype=torch.float64)
    factor = (torch.log(positions + 1) / torch.log(torch.tensor(16.0, dtype=torch.float64))).clip(min=1).float()
    torch.testing.assert_close(logn_scale(16)(positions[None])[0], factor)
    scale_queries(reference, factor)
    torch.testing.assert_close(logits(model, IDS), logits(reference, IDS), atol=1e-5, rtol=1e-5)  # fp32 order


# ---------------------------------------------------------------------------------------------------------------
# Parameters


def test_defaults_are_the_codes():
    config = SelfExtend()
    assert (config.group_size, config.neighbor_window) == (8, 1024)
    assert config.max_length(4096) == 25600


@pytest.mark.parametrize(
    "params,match",
    [
        ({"group_size": 0, "neighbor_window": 5}, r"posenc\.group_size: must be >= 1, got 0"),
        ({"group_size": 2, "neighbor_window": 0}, r"posenc\.neighbor_window: must be >= 1, got 0"),
        ({"group_size": 2, "neighbor_window": 64},
         r"posenc\.neighbor_window: must be smaller than the training length L = 64 \(max_position_embeddings\)"),
        ({}, r"posenc\.neighbor_window: .* L = 64 .* got 1024"),  # the code's default W on a 64-token model
        ({"group_size": 1.5}, r"posenc\.group_size: expected an integer, got 1\.5"),
    ],
    ids=["group0", "window0", "window>=L", "default-window>=L", "fractional-group"],
)
def test_bad_parameters_name_the_field(params, match):
    with pytest.raises(ConfigError, match=match):
        lce.patch(make_tiny_llama(), "self_extend", **params)  # L = 64


def test_failed_patch_leaves_the_model_untouched():
    model, reference = make_tiny_llama(), make_tiny_llama()
    with pytest.raises(ConfigError, match=r"posenc\.neighbor_window"):
        lce.patch(model, "self_extend")
    assert torch.equal(logits(model, IDS), logits(reference, IDS))
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "_lce_patch")
