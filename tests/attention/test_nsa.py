"""NSA against the paper's equations written one query at a time, the fast path against the materialised reference
(forward and backward, parameters included), initialisation, save/reload, decode and training on the tiny model."""

import pytest
import torch

import lce
from lce.attention.nsa import NSA, NSALayerAttention, NSAParameters, nsa_branches, nsa_reference_branches
from lce.errors import ConfigError
from tests.conftest import (
    assert_checkpointed_training_step,
    assert_close_to_reference,
    assert_decode_matches_full,
    fp64_logits,
    logits,
    make_tiny_llama,
)

IDS = torch.randint(3, 259, (2, 50), generator=torch.Generator().manual_seed(0))
SMALL = {"compress_block": 8, "compress_stride": 4, "select_block": 8, "top_n": 3, "window": 6}


def perturbed(params: NSAParameters, seed: int = 0) -> NSAParameters:
    """Every parameter moved off its initialisation, so that each one matters in the comparisons."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return params


def paper_oracle(variant: NSA, params: NSAParameters, q, k, v, x, scale):
    """Eq. 5, 7-12 and the window branch for one batch row, one query at a time (fp64, ``q [H, T, D]``, ``k, v [HKV,
    T, D]``, ``x [T, hidden]``): returns ``[T, H, D]`` and the selected block sets ``{(hkv, t): set}``."""
    heads, length, _ = q.shape
    kv_heads = k.shape[0]
    group = heads // kv_heads
    l, d, ls = variant.compress_block, variant.compress_stride, variant.select_block
    gates = torch.sigmoid(params.gate(x.to(params.gate.weight.dtype)).double()).view(length, heads, 3)
    out = torch.zeros(length, heads, q.shape[-1], dtype=torch.float64)
    chosen = {}
    for hk in range(kv_heads):
        for t in range(length):
            complete = [i for i in range(length) if i * d + l - 1 <= t]  # eq. 7: blocks ending at or before t
            ck = [params.key_compressor(k[hk, i * d:i * d + l]).double() for i in complete]
            cv = [params.value_compressor(v[hk, i * d:i * d + l]).double() for i in complete]
            own = t // ls
            group_score = [0.0] * (own + 1)
            branch_cmp = {}
            for h in range(hk * group, (hk + 1) * group):
                if complete:
                    p_cmp = torch.softmax(torch.stack([q[h, t] @ key for key in ck]) * scale, 0)  # eq. 8
                    branch_cmp[h] = sum(p * value for p, value in zip(p_cmp, cv))
                    for j in range(own + 1):  # eq. 9: compressed blocks overlapping selection block j; eq. 10: sum
                        group_score[j] += sum(float(p.detach()) for p, i in zip(p_cmp, complete)
                                              if i * d < (j + 1) * ls and i * d + l > j * ls)
                else:
                    branch_cmp[h] = torch.zeros(q.shape[-1], dtype=torch.float64)
            forced = {j for j in range(own + 1) if j < variant.initial_blocks or j > own - variant.local_blocks}
            rest = sorted(set(range(own + 1)) - forced, key=lambda j: -group_score[j])  # eq. 11
            selected = forced | set(rest[:max(variant.top_n - len(forced), 0)])
            chosen[hk, t] = selected
            for h in range(hk * group, (hk + 1) * group):
                keys = [j for j in range(t + 1) if j // ls in selected]  # eq. 12
                p = torch.softmax(torch.stack([q[h, t] @ k[hk, j] for j in keys]) * scale, 0)
                o_slc = sum(pj * v[hk, j] for pj, j in zip(p, keys))
                near = list(range(max(0, t - variant.window + 1), t + 1))
                p = torch.softmax(torch.stack([q[h, t] @ k[hk, j] for j in near]) * scale, 0)
                o_win = sum(pj * v[hk, j] for pj, j in zip(p, near))
                out[t, h] = gates[t, h, 0] * branch_cmp[h] + gates[t, h, 1] * o_slc + gates[t, h, 2] * o_win  # eq. 5
    return out, chosen


@pytest.mark.parametrize("branches", [nsa_branches, nsa_reference_branches], ids=["fast", "reference"])
@pytest.mark.parametrize("length", [29, 40])
def test_matches_the_papers_equations(branches, length):
    variant = NSA(**SMALL)
    params = perturbed(NSAParameters(variant, hidden_size=12, heads=4, head_dim=8, layer_index=0)).double()
    g = torch.Generator().manual_seed(length)
    q = torch.randn(1, 4, length, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, length, 8, generator=g, dtype=torch.float64) for _ in range(2))
    x = torch.randn(1, length, 12, generator=g, dtype=torch.float64)
    pos = torch.arange(length)[None]
    layer = NSALayerAttention(variant, params, reference=branches is nsa_reference_branches)
    out, _ = layer(None, q, k, v, None, 0.35, 0.0, q_pos=pos, k_pos=pos, hidden_states=x)
    oracle, chosen = paper_oracle(variant, params, q[0], k[0], v[0], x[0], 0.35)
    torch.testing.assert_close(out[0], oracle, rtol=1e-10, atol=1e-10)  # fp64 throughout: rounding only
    result = branches(variant, params, q, k, v, pos, 0.35)
    for (hk, t), selected in chosen.items():
        assert set(result.chosen[0, hk, t].tolist()) - {-1} == selected, (hk, t)


def test_fast_path_equals_reference_forward_and_backward_with_parameter_gradients():
    variant = NSA(**SMALL)
    params = perturbed(NSAParameters(variant, hidden_size=12, heads=4, head_dim=8, layer_index=0)).double()
    g = torch.Generator().manual_seed(3)
    length = 300  # > the compression chunk: the checkpointed chunks are exercised
    q = torch.randn(1, 4, length, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, length, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    x = torch.randn(1, length, 12, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(length)[None]
    inputs = (q, k, v, x, *params.parameters())
    results = []
    for reference in (False, True):
        out, _ = NSALayerAttention(variant, params, reference)(None, q, k, v, None, 0.35, 0.0, q_pos=pos, k_pos=pos,
                                                                hidden_states=x)
        results.append((out, torch.autograd.grad(out.square().sum(), inputs)))
    (fast, fast_grads), (ref, ref_grads) = results
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(fast_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert all(grad.abs().max() > 0 for grad in fast_grads)  # every parameter is trained, the gates included


def test_initialisation_is_mean_pooling_and_the_configured_gates():
    variant = NSA(**SMALL)
    params = NSAParameters(variant, hidden_size=12, heads=4, head_dim=8, layer_index=0)
    blocks = torch.randn(3, 8, 8)
    torch.testing.assert_close(params.key_compressor(blocks), blocks.mean(-2))
    gates = params.gates(torch.randn(1, 5, 12))
    torch.testing.assert_close(gates[0, 0, 0], torch.sigmoid(torch.tensor([-4.0, 4.0, -4.0])))


def test_saturated_gates_with_every_block_selected_are_the_original_model():
    """Selection covering the whole sequence and the gate all on it (sigmoid(±100) is 1 and 4e-44 in fp32): the
    swapped model is the original to fp32 rounding."""
    model, reference = make_tiny_llama(), make_tiny_llama()
    lce.patch(model, "rope", attention={"name": "nsa", **SMALL, "top_n": 7, "gate_bias_compressed": -100.0,
                                        "gate_bias_selected": 100.0, "gate_bias_window": -100.0})
    # the same attention by another computation: within the stock fp32 forward's own error (conftest)
    assert_close_to_reference(logits(model, IDS), logits(reference, IDS), fp64_logits(reference, IDS))


@pytest.mark.filterwarnings("ignore:.*there is no tokenizer")
def test_save_and_reload_restore_the_trained_parameters(tmp_path):
    model = make_tiny_llama()
    lce.patch(model, "rope", attention={"name": "nsa", **SMALL, "layers": [1]})
    assert not hasattr(model.model.layers[0].self_attn, "lce_nsa")
    perturbed(model.model.layers[1].self_attn.lce_nsa)
    expected = logits(model, IDS)
    lce.save_model(model, None, tmp_path / "nsa")
    loaded = lce.load_model(str(tmp_path / "nsa")).model
    torch.testing.assert_close(logits(loaded, IDS), expected)
    torch.testing.assert_close(loaded.model.layers[1].self_attn.lce_nsa.gate.weight,
                               model.model.layers[1].self_attn.lce_nsa.gate.weight)


def test_decode_matches_full_forward():
    model = make_tiny_llama()
    lce.patch(model, "rope", attention={"name": "nsa", **SMALL})
    for module in model.model.layers:
        perturbed(module.self_attn.lce_nsa)
    assert_decode_matches_full(model, IDS[:, :40], prefill=9)


def test_training_step_and_unpatch():
    model = make_tiny_llama()
    lce.patch(model, "rope", attention={"name": "nsa", **SMALL})
    for module in model.model.layers:  # at initialisation W_2 = 0 blocks the gradients of W_1 and P (as LoRA's B = 0)
        perturbed(module.self_attn.lce_nsa)
    assert_checkpointed_training_step(model, IDS[:, :40])
    lce.unpatch(model)
    assert not any("lce_" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("params,key", [
    ({"compress_stride": 64}, "attention.compress_stride"),
    ({"top_n": 2}, "attention.top_n"),
    ({"local_blocks": 0}, "attention.local_blocks"),
    ({"window": 0}, "attention.window"),
])
def test_bad_config_gets_a_clear_error(params, key):
    with pytest.raises(ConfigError, match=key):
        NSA(**params)


@pytest.fixture
def fla_nsa():
    """flash-linear-attention's pure-PyTorch NSA references (``pip install fla-core --no-deps einops``)."""
    try:
        from fla.ops.nsa.naive import naive_nsa_compression, naive_nsa_selection, naive_nsa_topk
    except Exception as e:  # noqa: BLE001 - importing fla also imports its Triton kernels and layers
        pytest.skip(f"flash-linear-attention's NSA references are not importable ({type(e).__name__}: {e}); "
                    "pip install fla-core --no-deps einops to compare with them")
    return naive_nsa_compression, naive_nsa_selection, naive_nsa_topk


def test_second_oracle_flash_linear_attention(fla_nsa):
    """fla's NSA is the case ``l = d = l'`` with mean-pooled compression (lce's ``φ`` at initialisation): its
    compressed branch, its top-k choice (the group's mean probability, the first, own and previous blocks forced) and
    its selected branch must equal lce's. fla's naive functions take ``[B, T, H, D]`` and work in fp32."""
    naive_compression, naive_selection, naive_topk = fla_nsa
    block = 8
    variant = NSA(compress_block=block, compress_stride=block, select_block=block, top_n=4, window=6)
    params = NSAParameters(variant, hidden_size=12, heads=4, head_dim=16, layer_index=0)
    g = torch.Generator().manual_seed(7)
    length = 64
    q = torch.randn(1, 4, length, 16, generator=g)
    k, v = (torch.randn(1, 2, length, 16, generator=g) for _ in range(2))
    pos = torch.arange(length)[None]
    ours = nsa_branches(variant, params, q, k, v, pos, 0.25)

    def fla(x):
        return x.transpose(1, 2).contiguous()

    k_cmp = fla(k).view(1, length // block, block, 2, 16).mean(2)
    v_cmp = fla(v).view(1, length // block, block, 2, 16).mean(2)
    compressed, _ = naive_compression(fla(q), k_cmp, v_cmp, block, 0.25)
    torch.testing.assert_close(ours.compressed.transpose(1, 2), compressed, rtol=1e-5, atol=1e-5)  # fp32 rounding
    chosen = naive_topk(fla(q), k_cmp, 4, block, 0.25)  # [B, T, HKV, S]
    for t in range(length):
        for h in range(2):
            assert set(ours.chosen[0, h, t].tolist()) - {-1} == set(chosen[0, t, h].tolist()) - {-1}, (t, h)
    selected = naive_selection(fla(q), fla(k), fla(v), chosen, block, 0.25)
    torch.testing.assert_close(ours.selected.transpose(1, 2), selected, rtol=1e-5, atol=1e-5)
