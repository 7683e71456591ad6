"""Linear attention ops: the chunked and recurrent forms against the materialised reference, forward and backward,
on awkward shapes (odd lengths, lengths not a multiple of the chunk, GQA); a cached prefix (decoding) and left padding
through each variant's kernel; memory that grows linearly with the length; bad parameters named.

Parity runs in float64, where the forms differ only by summation order (~1e-15), so the default float64 tolerances of
``assert_close`` (rtol 1e-7, atol 1e-7) hold with a wide margin; a wrong decay, state hand-over or mask shows up as
O(1e-2) or worse.
"""

import dataclasses

import pytest
import torch
from torch import nn

from lce.attention import ATTENTIONS
from lce.attention.linear import (
    LinearAttention,
    LinearLayerAttention,
    linear_attention_chunked,
    linear_attention_parallel,
    linear_attention_recurrent,
)
from lce.errors import ConfigError
from lce.kernels.backend import use_backend

#: Per variant, parameters that keep the tests small (Performer: fewer random features than d ln d).
VARIANTS = {"linear_elu": {}, "linear_relu": {}, "performer": {"num_features": 24}, "transnormer": {},
            "retention": {}}


def test_every_linear_variant_is_tested():
    """The shared tests here and in ``test_linear_model.py`` run every registered linear variant."""
    registered = {name for name in ATTENTIONS if issubclass(ATTENTIONS.get(name), LinearAttention)}
    assert set(VARIANTS) == registered

# (B, H, HKV, T, D, chunk)
SHAPES = [
    pytest.param((2, 4, 2, 37, 16, 8), id="gqa4:2-T37-C8"),
    pytest.param((1, 3, 1, 5, 8, 16), id="mqa-T5<C16"),
    pytest.param((2, 2, 2, 33, 12, 11), id="mha-T33-C11"),
    pytest.param((1, 2, 1, 16, 8, 4), id="T16=4C"),
]


def variant(name, **params):
    return ATTENTIONS.build({"name": name, **VARIANTS[name], **params})


def qkv(batch, heads, kv_heads, length, dim, seed=0, dtype=torch.float64, kv_length=None):
    g = torch.Generator().manual_seed(seed)
    kv_length = kv_length or length
    q = torch.randn(batch, heads, length, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, kv_length, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, kv_length, dim, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def attend(config, q, k, v, mask=None, module=None):
    """One call of the variant's computation for layer 0, ``[B, Tq, H, D]``."""
    module = module or nn.Module()
    out, weights = LinearLayerAttention(config, 0)(module, q, k, v, mask, q.shape[-1] ** -0.5, 0.0, q_pos=None,
                                                   k_pos=None)
    assert weights is None
    return out


def assert_same_and_same_gradients(out, ref, inputs):
    torch.testing.assert_close(out, ref)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * weight).sum(), inputs)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("form", ["chunked", "recurrent"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", VARIANTS)
def test_form_matches_the_parallel_reference(name, shape, form):
    batch, heads, kv_heads, length, dim, chunk = shape
    q, k, v = qkv(batch, heads, kv_heads, length, dim)
    out = attend(variant(name, form=form, chunk_size=chunk), q, k, v)
    ref = attend(variant(name, form="parallel"), q, k, v)
    assert out.shape == (batch, length, heads, dim)
    assert_same_and_same_gradients(out, ref, (q, k, v))


@pytest.mark.parametrize("name", VARIANTS)
def test_triton_kernels_match_the_parallel_reference(name):
    """The chunked form on the Triton kernels (Triton's interpreter on CPU; fp32, which the kernels take) equals the
    materialised reference forward and backward, also for queries after a cached prefix whose state the kernels
    recompute. Tolerance: fp32 summation order through the features and the output norms; observed differences
    <= 3e-6 absolute on entries up to ~15 (<= 3e-7 relative to the largest), so rtol 2e-5 / atol 2e-6 (a wrong decay
    or state is off by 1e-2 or more)."""
    q, k, v = qkv(1, 4, 2, 21, 8, dtype=torch.float32)
    with use_backend("triton"):
        out = attend(variant(name, chunk_size=16), q, k, v)
        after_prefix = attend(variant(name, chunk_size=16), q[:, :, -5:], k, v)
    ref = attend(variant(name, form="parallel"), q, k, v)
    tolerance = {"rtol": 2e-5, "atol": 2e-6}
    torch.testing.assert_close(out, ref, **tolerance)
    torch.testing.assert_close(after_prefix, ref[:, -5:], **tolerance)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    for grad, expected in zip(grads, torch.autograd.grad((ref * weight).sum(), (q, k, v))):
        torch.testing.assert_close(grad, expected, **tolerance)


def causal_padding_mask(pad: list[int], tq: int, tk: int) -> torch.Tensor:
    """``[B, 1, Tq, Tk]``: causal over the last ``Tq`` of ``Tk`` positions, the first ``pad[b]`` keys hidden."""
    i = torch.arange(tk - tq, tk)[:, None]
    j = torch.arange(tk)[None, :]
    keys = torch.arange(tk)[None, :] >= torch.tensor(pad)[:, None]
    return ((j <= i)[None] & keys[:, None, :])[:, None]


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_prefix_and_left_padding(name):
    """Queries over the last 5 of 37 cached positions (a prefill after a cache, or decoding without a saved state):
    the prefix's state is recomputed and equals the full forward's last rows; padded keys contribute nothing."""
    q, k, v = qkv(2, 4, 2, 37, 16)
    mask = causal_padding_mask([3, 0], 37, 37)
    full = attend(variant(name, chunk_size=8), q, k, v, mask)
    for form in ("chunked", "parallel", "recurrent"):
        config = variant(name, chunk_size=8, form=form)
        torch.testing.assert_close(attend(config, q[:, :, -5:], k, v, mask[:, :, -5:]), full[:, -5:])
        torch.testing.assert_close(attend(config, q[:, :, -1:], k, v, mask[:, :, -1:]), full[:, -1:])
    unpadded = attend(variant(name, chunk_size=8), q[:1, :, 3:], k[:1, :, 3:], v[:1, :, 3:])
    torch.testing.assert_close(full[:1, 3:], unpadded)


@pytest.mark.parametrize("name", VARIANTS)
def test_padded_keys_and_values_may_hold_anything(name):
    """Pad positions carry arbitrary hidden states (in a hybrid, possibly NaN from a fully masked softmax row): they
    must not leak into any state (``0 * NaN`` would)."""
    q, k, v = (t.detach() for t in qkv(1, 4, 2, 21, 16))
    mask = causal_padding_mask([4], 21, 21)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[:, :, :4], poisoned_v[:, :, :4] = float("nan"), float("nan")
    out = attend(variant(name, chunk_size=8), q, poisoned_k, poisoned_v, mask)
    torch.testing.assert_close(out[:, 4:], attend(variant(name, chunk_size=8), q, k, v, mask)[:, 4:])


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_core_forms_with_decay_and_initial_state(chunk):
    """The shared machinery on random positive features and random decays, split in two: the state handed over
    from the first part continues exactly."""
    g = torch.Generator().manual_seed(0)
    fq, fk = torch.rand(2, 3, 29, 5, generator=g, dtype=torch.float64), torch.rand(2, 3, 29, 5, generator=g,
                                                                                   dtype=torch.float64)
    v = torch.randn(2, 3, 29, 6, generator=g, dtype=torch.float64)
    log_decay = -torch.rand(2, 3, 29, generator=g, dtype=torch.float64)
    num, den = linear_attention_parallel(fq, fk, v, log_decay)
    for run in (lambda *a: linear_attention_chunked(*a, chunk_size=chunk), linear_attention_recurrent):
        n, d, _ = run(fq, fk, v, log_decay, None)
        torch.testing.assert_close((n, d), (num, den))
        _, _, state = run(fq[:, :, :11], fk[:, :, :11], v[:, :, :11], log_decay[:, :, :11], None)
        n2, d2, _ = run(fq[:, :, 11:], fk[:, :, 11:], v[:, :, 11:], log_decay[:, :, 11:], state)
        torch.testing.assert_close((n2, d2), (num[:, :, 11:], den[:, :, 11:]))
    offset_num, offset_den = linear_attention_parallel(fq[:, :, 11:], fk, v, log_decay)  # queries after a prefix
    torch.testing.assert_close((offset_num, offset_den), (num[:, :, 11:], den[:, :, 11:]))


def saved_bytes(config, length: int) -> int:
    """Bytes autograd keeps for the backward pass of one kernel call (each storage counted once)."""
    q, k, v = qkv(1, 4, 2, length, 16, dtype=torch.float32)
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = attend(config, q, k, v)
    out.sum().backward()
    return sum(saved.values())


@pytest.mark.parametrize("name", VARIANTS)
def test_training_memory_grows_linearly(name):
    """The chunked form keeps O(T * C) for backward: 4x the length costs at most ~5x the bytes (4x + chunk padding
    and constants), where the materialised reference costs ~16x."""
    chunked = variant(name, chunk_size=32)
    small, large = saved_bytes(chunked, 256), saved_bytes(chunked, 1024)
    assert large <= 5 * small, f"{name}: {small} bytes at T=256, {large} at T=1024"
    parallel = dataclasses.replace(chunked, form="parallel")
    assert saved_bytes(parallel, 1024) > 10 * saved_bytes(parallel, 256)


@pytest.mark.parametrize(
    "spec,message",
    [({"name": "linear_elu", "chunk_size": 0}, r"attention\.chunk_size: must be an integer >= 1, got 0"),
     ({"name": "retention", "chunk_size": -4}, r"attention\.chunk_size: must be an integer >= 1, got -4"),
     ({"name": "performer", "num_features": 0}, r"attention\.num_features: must be an integer >= 1"),
     ({"name": "performer", "num_features": -3}, r"attention\.num_features: must be an integer >= 1"),
     ({"name": "performer", "redraw": "sometimes"}, r"attention\.redraw: 'sometimes' is not allowed"),
     ({"name": "performer", "seed": -1}, r"attention\.seed: must be >= 0"),
     ({"name": "linear_relu", "eps": 0.0}, r"attention\.eps: must be > 0"),
     ({"name": "transnormer", "norm": "batchnorm"}, r"attention\.norm: 'batchnorm' is not allowed"),
     ({"name": "retention", "form": "fast"}, r"attention\.form: 'fast' is not allowed"),
     ({"name": "linear_elu", "layers": "odd"}, r"attention\.layers: 'odd' is not a layer selection"),
     ({"name": "linear_elu", "chunk": 8}, r"attention\.chunk: unknown key \(did you mean 'chunk_size'\?\)")],
)
def test_bad_parameters_name_the_field(spec, message):
    with pytest.raises(ConfigError, match=message):
        ATTENTIONS.build(spec, "attention")


def test_construction_is_cheap():
    """Every variant validates its layer selection without materialising it (``all`` means any model size)."""
    for name in VARIANTS:
        assert variant(name, layers="all_but_first:3").layers == "all_but_first:3"
