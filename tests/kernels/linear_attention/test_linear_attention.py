"""Chunked causal linear attention: the Triton kernels (interpreted on CPU) against the materialised reference,
forward (numerator, denominator, final state) and backward (features, values, log-decays, initial state), with and
without decay and initial state, lengths that are not a multiple of the chunk, ``F != E``, decays strong enough to
overflow a factorised ``e^{-b}``; bf16/fp16 on tensor cores against plain PyTorch's own error in the same dtype; every
output element written (outputs poisoned with NaN); the ``ref`` backend's chunkwise form against the same reference;
lce's references against flash-linear-attention's naive ones (a second oracle, when ``fla`` is installed); bad input
named.

Tolerance, fp32: the kernels' exactness path (IEEE fp32 dots) is compared with the reference in fp64 by the relative
error ``max|x - ref| / max|ref|`` (flash-linear-attention's ``assert_close`` ratio). fp32 sums of at most ~40 terms
of O(1) products are off by ~1e-7 relative (observed <= 6e-7, the log-decay gradient included): ``RELATIVE = 2e-6``.
Under strong decays the log-decays cumulated inside a chunk reach -115, where fp32's spacing is 7.6e-6, and
``e^{b_p - b_j}`` inherits that error in the kernels and in the PyTorch chunkwise form alike (both cumulate in fp32;
observed 2.1e-6 for both): ``STRONG_DECAY_RELATIVE = 2e-5``. A wrong mask, decay, chunk boundary or state hand-over
is an error of 1e-2 or more.

Tolerance, bf16/fp16: the kernels multiply 16-bit operands on tensor cores and round what they feed to a further dot
(decayed keys, score matrices, stored states) to the input dtype, so they cannot be held to fp32's bound. As
flash-attention's tests do, each output's and gradient's error against the fp64 reference must be at most
``LOW_PRECISION_RATIO = 2`` times the error of the same quantities from plain PyTorch in that dtype (the materialised
reference run in bf16/fp16, which rounds its scores and products likewise). Observed: at most 1.2x (bf16) and 1.0x
(fp16); a missing decay, mask or normaliser term is an error of 1e-2 or more, 3x bf16's and 20x fp16's own error.
"""
import pytest
import torch
import triton
import triton.language as tl

from lce.errors import LceError
from lce.kernels.linear_attention import function as dispatch
from lce.kernels.linear_attention import (
    linear_attention,
    linear_attention_chunked_ref,
    linear_attention_final_state,
    linear_attention_parallel,
)
from lce.kernels.triton_precision import round_to

RELATIVE = 2e-6
STRONG_DECAY_RELATIVE = 2e-5
LOW_PRECISION_RATIO = 2.0


def inputs(batch, heads, length, features, channels, decay, initial, seed=0, dtype=torch.float32):
    """Positive features (the denominators stay away from 0), Gaussian values, log-decays in (-1, 0] or, for
    ``decay="strong"``, with steps down to -60 (Performer's stabiliser makes such steps: ``e^{60}`` overflows fp32)."""
    g = torch.Generator().manual_seed(seed)
    fq = torch.rand(batch, heads, length, features, generator=g, dtype=dtype)
    fk = torch.rand(batch, heads, length, features, generator=g, dtype=dtype)
    v = torch.randn(batch, heads, length, channels, generator=g, dtype=dtype)
    log_decay = None
    if decay:
        log_decay = -torch.rand(batch, heads, length, generator=g, dtype=dtype)
        if decay == "strong":
            log_decay = log_decay * torch.where(torch.rand(log_decay.shape, generator=g) < 0.2, 60.0, 1.0).to(dtype)
    state = None
    if initial:
        state = (torch.randn(batch, heads, features, channels, generator=g, dtype=dtype),
                 torch.rand(batch, heads, features, generator=g, dtype=dtype))
    return fq, fk, v, log_decay, state


def flat(fq, fk, v, log_decay, state):
    """The differentiable inputs, in a fixed order."""
    return [t for t in (fq, fk, v, log_decay, *(state or ())) if t is not None]


def reference(fq, fk, v, log_decay, state):
    """``num, den, S, z`` from the materialised references."""
    num, den = linear_attention_parallel(fq, fk, v, log_decay, state)
    return (num, den, *linear_attention_final_state(fk, v, log_decay, state))


def relative_error(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


def assert_matches_reference(run, args, tolerance):
    """``run(*args) -> (num, den, (S, z))`` equals the fp64 reference, and so do the gradients of a random weighting
    of all four outputs with respect to every input."""
    args = [None if a is None
            else (tuple(t.requires_grad_() for t in a) if isinstance(a, tuple) else a.requires_grad_())
            for a in args]
    num, den, (S, z) = run(*args)
    exact_args = [None if a is None else (tuple(t.double() for t in a) if isinstance(a, tuple) else a.double())
                  for a in args]
    expected = reference(*exact_args)
    for name, out, ref in zip(("num", "den", "S", "z"), (num, den, S, z), expected):
        assert out.shape == ref.shape and out.dtype == args[0].dtype, name
        assert relative_error(out, ref) <= tolerance, (name, relative_error(out, ref))
    g = torch.Generator().manual_seed(1)
    # Weights representable in the inputs' dtype, so both sides weight the outputs identically.
    weights = [torch.randn(ref.shape, generator=g).to(args[0].dtype).double() for ref in expected]
    grads = torch.autograd.grad(sum((o * w.to(o.dtype)).sum() for o, w in zip((num, den, S, z), weights)),
                                flat(*args))
    ref_grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(expected, weights)), flat(*exact_args))
    for i, (grad, ref) in enumerate(zip(grads, ref_grads)):
        assert relative_error(grad, ref) <= tolerance, (i, relative_error(grad, ref))


# (B, H, T, F, E, chunk_size, decay, initial)
CASES = [
    pytest.param((2, 2, 37, 8, 12, 16, None, False), id="no-decay-T37-C16"),
    pytest.param((2, 2, 37, 8, 12, 16, "mild", False), id="decay-T37-C16"),
    pytest.param((1, 3, 21, 12, 8, 8, "mild", True), id="decay-state-T21-C8->16-F>E"),
    pytest.param((1, 2, 32, 16, 16, 16, None, True), id="state-T32=2C"),
    pytest.param((2, 1, 5, 20, 6, 64, "mild", True), id="T5<C64-F20-E6"),
    pytest.param((1, 2, 40, 8, 8, 16, "strong", True), id="strong-decay"),
]


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_the_reference(case):
    batch, heads, length, features, channels, chunk, decay, initial = case
    args = inputs(batch, heads, length, features, channels, decay, initial)
    assert_matches_reference(lambda *a: linear_attention(*a, chunk_size=chunk, backend="triton"), args,
                             STRONG_DECAY_RELATIVE if decay == "strong" else RELATIVE)


def test_strong_decay_in_a_partial_last_chunk():
    """T = 20 in chunks of 16: the last chunk has 4 positions and 12 of padding. A step of -100 at its last position
    cumulates below -100 there, and a padding row's factor ``e^{b_p - b_j}`` must not become ``e^{100}`` (inf in
    fp32, then NaN times the row's zero features in ``dk`` and ``dv``). The other steps are mild, so the gradients
    are not all vanishing (a relative error needs a reference of some size)."""
    fq, fk, v, log_decay, state = inputs(1, 2, 20, 4, 4, "mild", True)
    log_decay[..., -1] = -100.0
    assert_matches_reference(lambda *a: linear_attention(*a, chunk_size=16, backend="triton"),
                             [fq, fk, v, log_decay, state], STRONG_DECAY_RELATIVE)


@pytest.mark.parametrize("chunk_size,chunk", [(1, 16), (16, 16), (17, 32), (64, 64), (65, 64), (1000, 64)])
def test_triton_chunk_is_a_power_of_two_from_16_to_64(chunk_size, chunk):
    """``tl.dot`` tiles need >= 16 rows; past 64 the fp32 score accumulators outgrow the registers."""
    assert dispatch.triton_chunk(chunk_size) == chunk


@pytest.mark.parametrize("shape,message", [((1, 1, 64 * 65535 + 1), "65536 chunks of 64 positions"),
                                           ((65536, 1, 1), r"B \* H = 65536 \* 1 = 65536")],
                         ids=["chunks", "batch_heads"])
def test_triton_refuses_more_programs_than_the_launch_grid_holds(shape, message):
    """Chunks and B * H go on the CUDA grid's second and third axes (at most 65535 each): a named error, not a launch
    failure (the interpreter has no such limit)."""
    fk = torch.zeros(*shape, 1)
    with pytest.raises(LceError, match=message + r".* at most 65535"):
        linear_attention(None, fk, fk, chunk_size=1000, backend="triton")


@pytest.mark.parametrize("case", [CASES[2], CASES[5]])
def test_reference_backend_matches_the_reference(case):
    """The ``ref`` backend (the PyTorch chunkwise form, what CPUs run) in fp32, against the same fp64 reference."""
    batch, heads, length, features, channels, chunk, decay, initial = case
    args = inputs(batch, heads, length, features, channels, decay, initial)
    assert_matches_reference(lambda *a: linear_attention(*a, chunk_size=chunk, backend="ref"), args,
                             STRONG_DECAY_RELATIVE if decay == "strong" else RELATIVE)


def test_state_only_and_continuation():
    """``fq=None`` returns only the final state; running the second half from it equals one run over both halves."""
    fq, fk, v, log_decay, _ = inputs(1, 2, 30, 8, 8, "mild", False)
    none, also_none, first = linear_attention(None, fk[:, :, :13], v[:, :, :13], log_decay[:, :, :13], backend="triton")
    assert none is None and also_none is None
    num, den, last = linear_attention(fq[:, :, 13:], fk[:, :, 13:], v[:, :, 13:], log_decay[:, :, 13:], first,
                                      backend="triton")
    full_num, full_den, full_last = linear_attention(fq, fk, v, log_decay, backend="ref")
    for out, ref in ((num, full_num[:, :, 13:]), (den, full_den[:, :, 13:]), (last[0], full_last[0]),
                     (last[1], full_last[1])):
        assert relative_error(out, ref.double()) <= RELATIVE


def test_every_output_element_is_written(monkeypatch):
    """Buffers the kernels fill come from ``torch.empty``: poisoned with NaN, none may survive."""
    def poisoned(make):
        return lambda *a, **kw: make(*a, **kw).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned(torch.Tensor.new_empty))
    args = [t.requires_grad_() for t in flat(*inputs(1, 2, 19, 20, 24, "mild", True))]
    fq, fk, v, log_decay, S0, z0 = args
    num, den, (S, z) = linear_attention(fq, fk, v, log_decay, (S0, z0), chunk_size=16, backend="triton")
    grads = torch.autograd.grad(num.sum() + den.sum() + S.sum() + z.sum(), args)
    for out in (num, den, S, z, *grads):
        assert not out.isnan().any()


def leaf(t):
    return t.detach().requires_grad_()


def outputs_and_gradients(run, args, weights):
    """``(num, den, S, z)`` of ``run(*args)`` and the gradients of ``Σ weights · outputs`` with respect to every input,
    all in fp64 (the values as computed, only widened)."""
    args = [None if a is None else (tuple(map(leaf, a)) if isinstance(a, tuple) else leaf(a)) for a in args]
    num, den, (S, z) = run(*args)
    outputs = (num, den, S, z)
    grads = torch.autograd.grad(sum((o.double() * w).sum() for o, w in zip(outputs, weights)), flat(*args))
    return [o.detach().double() for o in outputs], [g.double() for g in grads]


def plain_pytorch(fq, fk, v, log_decay, state):
    """The materialised references in the inputs' dtype: plain PyTorch in bf16/fp16, the ground truth in fp64."""
    return (*linear_attention_parallel(fq, fk, v, log_decay, state),
            linear_attention_final_state(fk, v, log_decay, state))


LOW_PRECISION_CASES = [CASES[0], CASES[2], CASES[5],
                       pytest.param((1, 2, 70, 32, 24, 64, "mild", True), id="decay-state-T70-C64-F32-E24")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", LOW_PRECISION_CASES)
def test_16_bit_error_is_at_most_twice_plain_pytorch(case, dtype):
    """bf16/fp16 on tensor cores (fp32 accumulation): forward and backward error against the fp64 reference on the same
    (rounded) inputs within ``LOW_PRECISION_RATIO`` of plain PyTorch's in the same dtype."""
    batch, heads, length, features, channels, chunk, decay, initial = case
    args = inputs(batch, heads, length, features, channels, decay, initial, dtype=dtype)
    exact_args = [None if a is None else (tuple(t.double() for t in a) if isinstance(a, tuple) else a.double())
                  for a in args]
    g = torch.Generator().manual_seed(1)
    # Weights representable in the dtype, so every side weights the outputs identically.
    weights = [torch.randn(out.shape, generator=g).to(dtype).double() for out in reference(*exact_args)]
    exact = outputs_and_gradients(plain_pytorch, exact_args, weights)
    kernel = outputs_and_gradients(lambda *a: linear_attention(*a, chunk_size=chunk, backend="triton"), args, weights)
    plain = outputs_and_gradients(plain_pytorch, args, weights)
    fq, fk, v, log_decay, state = args
    names = ["num", "den", "S", "z"] + [f"d{name}" for name, t in zip(("fq", "fk", "v", "log_decay", "S0", "z0"),
                                                                       (fq, fk, v, log_decay, *(state or (None,) * 2)))
                                        if t is not None]
    errors = {name: (relative_error(k, e), relative_error(p, e))
              for name, k, p, e in zip(names, [*kernel[0], *kernel[1]], [*plain[0], *plain[1]],
                                       [*exact[0], *exact[1]])}
    assert len(errors) == len(kernel[0]) + len(kernel[1])
    worse = {name: f"kernel {k:.2e} vs plain {dtype} {p:.2e}" for name, (k, p) in errors.items()
             if k > LOW_PRECISION_RATIO * p}
    assert not worse, worse


@triton.jit
def round_to_bf16_kernel(x_ptr, y_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, round_to(tl.load(x_ptr + i), tl.bfloat16))


def test_interpreted_bf16_rounding_is_to_nearest_even():
    """Triton's interpreter rounds fp32 to bf16 toward zero; under it the kernels round themselves
    (``lce.kernels.triton_precision.round_to``), which must agree with the GPU's (and torch's) round-to-nearest-even,
    ties included, or the bf16 tests would measure the interpreter rather than the kernels."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randn(1024, generator=g).to(torch.bfloat16).float().view(torch.int32)
    low = torch.randint(0, 1 << 16, (1024,), generator=g, dtype=torch.int32)
    low[::4] = 1 << 15  # exact ties: to the even neighbour
    x = (bits + low).view(torch.float32)
    y = torch.empty(1024, dtype=torch.bfloat16)
    round_to_bf16_kernel[(1,)](x, y, N=1024)
    assert torch.equal(y, x.to(torch.bfloat16))


@pytest.fixture(scope="module")
def fla_naive():
    """flash-linear-attention's pure-PyTorch references (``fla-core``: ``pip install fla-core --no-deps einops``)."""
    try:
        from fla.ops.linear_attn.naive import naive_recurrent_linear_attn
        from fla.ops.simple_gla.naive import naive_recurrent_simple_gla
    except Exception as e:  # noqa: BLE001 - importing fla also imports its Triton kernels and layers
        pytest.skip(f"flash-linear-attention's naive references are not importable ({type(e).__name__}: {e}); "
                    "pip install fla-core --no-deps einops to compare with them")
    return naive_recurrent_linear_attn, naive_recurrent_simple_gla


def to_fla(x):
    """``[B, H, T, ...]`` (lce) -> ``[B, T, H, ...]`` (fla)."""
    return x.transpose(1, 2)


def test_reference_matches_fla_normalised_linear_attention(fla_naive):
    """No decay: fla's ``naive_recurrent_linear_attn(normalize=True)`` (one step at a time, fp32) returns
    ``num / den`` and the final ``(S, z)``, continuing from an initial state."""
    naive_linear_attn, _ = fla_naive
    fq, fk, v, _, (S0, z0) = inputs(2, 3, 37, 8, 12, None, True)
    o, (S, z) = naive_linear_attn(to_fla(fq), to_fla(fk), to_fla(v), scale=1.0,
                                  initial_state=(S0, to_fla(z0[:, :, None])), output_final_state=True, normalize=True)
    exact = [t.double() for t in (fq, fk, v, S0, z0)]
    num, den = linear_attention_parallel(*exact[:3], initial_state=tuple(exact[3:]))
    expected_S, expected_z = linear_attention_final_state(*exact[1:3], initial_state=tuple(exact[3:]))
    assert relative_error(to_fla(o), num / den[..., None]) <= RELATIVE
    assert relative_error(S, expected_S) <= RELATIVE
    assert relative_error(to_fla(z)[:, :, 0], expected_z) <= RELATIVE


@pytest.mark.parametrize("decay", ["mild", "strong"])
def test_reference_matches_fla_simple_gla(fla_naive, decay):
    """With decay: fla's ``naive_recurrent_simple_gla`` (RetNet/simple GLA, one step at a time, fp32) gives ``num`` and
    ``S``; on a value channel of ones, ``den`` and ``z``."""
    _, naive_simple_gla = fla_naive
    fq, fk, v, log_decay, (S0, z0) = inputs(1, 2, 40, 8, 8, decay, True)
    q, k, g = to_fla(fq), to_fla(fk), to_fla(log_decay)
    o, S = naive_simple_gla(q, k, to_fla(v), g, scale=1.0, initial_state=S0, output_final_state=True)
    ones, z = naive_simple_gla(q, k, torch.ones_like(to_fla(v)[..., :1]), g, scale=1.0, initial_state=z0[..., None],
                               output_final_state=True)
    exact = [t.double() for t in (fq, fk, v, log_decay, S0, z0)]
    num, den = linear_attention_parallel(*exact[:4], initial_state=tuple(exact[4:]))
    expected_S, expected_z = linear_attention_final_state(*exact[1:4], initial_state=tuple(exact[4:]))
    tolerance = STRONG_DECAY_RELATIVE if decay == "strong" else RELATIVE
    for name, out, ref in (("num", to_fla(o), num), ("den", to_fla(ones)[..., 0], den), ("S", S, expected_S),
                           ("z", z[..., 0], expected_z)):
        assert relative_error(out, ref) <= tolerance, (name, relative_error(out, ref))


def test_auto_takes_the_reference_for_float64(monkeypatch):
    """On CUDA ``auto`` resolves to Triton, which does not take float64: the op falls back to the reference there,
    and refuses when Triton was asked for by name."""
    monkeypatch.delenv("LCE_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "resolve_backend", lambda backend, *tensors: "triton")  # as on a CUDA device
    fq, fk, v, log_decay, state = inputs(1, 1, 9, 4, 4, "mild", True, dtype=torch.float64)
    num, _, _ = linear_attention(fq, fk, v, log_decay, state, chunk_size=4)
    expected, _, _ = linear_attention_chunked_ref(fq, fk, v, log_decay, state, chunk_size=4)
    assert torch.equal(num, expected)
    with pytest.raises(LceError, match=r"triton backend takes float16, bfloat16 or float32 inputs, got torch.float64"):
        linear_attention(fq, fk, v, log_decay, state, backend="triton")


def bad(**change):
    fq, fk, v, log_decay, state = inputs(2, 2, 9, 4, 6, "mild", True)
    args = {"fq": fq, "fk": fk, "v": v, "log_decay": log_decay, "initial_state": state, "chunk_size": 16}
    return {**args, **change}


@pytest.mark.parametrize(
    "args,message",
    [(bad(v=torch.randn(2, 2, 8, 6)), r"v must be \[B, H, T, E\] = \[2, 2, 9, 6\], got \[2, 2, 8, 6\]"),
     (bad(fq=torch.rand(2, 2, 9, 5)), r"fq must be \[B, H, T, F\] like fk = \[2, 2, 9, 4\], got \[2, 2, 9, 5\]"),
     (bad(log_decay=torch.zeros(2, 9)), r"log_decay must be \[B, H, T\] = \[2, 2, 9\], got \[2, 9\]"),
     (bad(initial_state=(torch.zeros(2, 2, 6, 4), torch.zeros(2, 2, 4))),
      r"initial_state S must be \[B, H, F, E\] = \[2, 2, 4, 6\], got \[2, 2, 6, 4\]"),
     (bad(initial_state=(torch.zeros(2, 2, 4, 6), torch.zeros(2, 2))),
      r"initial_state z must be \[B, H, F\] = \[2, 2, 4\], got \[2, 2\]"),
     (bad(fk=torch.rand(2, 2, 9)), r"fk \[B, H, T, F\] and v \[B, H, T, E\] must be 4-D, got \[2, 2, 9\]"),
     (bad(v=torch.ones(2, 2, 9, 6, dtype=torch.int64)), r"v must be floating-point, got torch.int64"),
     (bad(v=torch.randn(2, 2, 9, 6, dtype=torch.float16)),
      r"v is torch.float16 on cpu, fk torch.float32 on cpu; all inputs must share dtype and device"),
     (bad(chunk_size=0), r"chunk_size must be an integer >= 1, got 0")],
)
@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_bad_input_is_named(args, message, backend):
    with pytest.raises(LceError, match=r"linear_attention: " + message):
        linear_attention(**args, backend=backend)
