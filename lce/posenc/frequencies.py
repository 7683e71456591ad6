"""Frequency-scaling functions the position encodings compute with, written from the papers' equations.

Each function returns what a RoPE module needs: inverse frequencies ``inv_freq [d/2]`` (fp32) and, where the method
has one, the factor transformers multiplies cos and sin by (``attention_factor``, YaRN's "mscale"; logits are scaled
by its square). Notation follows METHODS.md §2: rotary dim ``d``, pair index ``i in [0, d/2)``, base ``b``,
``theta_i = b^(-2i/d)``, wavelength ``lambda_i = 2*pi/theta_i``, original (training) length ``L``, scale ``s``.

The static methods (PI, NTK, YaRN, Llama 3, LongRoPE) run as transformers' own rope types, so that a saved checkpoint
loads in vanilla transformers; what lce computes itself is here: RoPE's frequencies, the NTK base, YaRN's
frequencies and temperature (also the code path of the stateless dynamic methods, ``lce.posenc.dynamic``) and
LongRoPE's starting factors. Tests compare them with transformers' ``ROPE_INIT_FUNCTIONS`` over many random parameter
draws (``tests/posenc/test_frequency.py``); the references for PI, Llama 3 and LongRoPE, which lce never computes
itself, are in ``tests/posenc/references.py``. The last few functions are the parameter checks and model lookups
(training length, base) those method configs share.

Papers: RoPE, Su et al. 2021 (arXiv:2104.09864); YaRN, Peng et al. 2023 (arXiv:2309.00071), which also writes down
NTK-aware and NTK-by-parts; LongRoPE, Ding et al. 2024 (arXiv:2402.13753).
"""
from __future__ import annotations

import math

import torch

from lce.config import check
from lce.errors import UnsupportedModelError
from lce.posenc.logn import original_length


def rope_inv_freq(dim: int, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE's inverse frequencies ``theta_i = 1 / b^(2i/d)``, ``[d/2]`` fp32 (RoPE paper §3.2).

    Written as ``1 / b^(2i/d)`` in fp32, the way transformers' default rope computes it, so that a method that leaves
    the frequencies unchanged is bit-identical to the unpatched model.
    """
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def ntk_base(base: float, factor: float, dim: int) -> float:
    """NTK-aware base change ``b' = b * s^(d / (d - 2))`` (YaRN paper eq. 16, derived in App. A.1).

    The exponent makes the lowest frequency ``theta_{d/2-1}`` exactly ``1/s`` of its original value (as under PI)
    while the highest, ``theta_0 = 1``, stays unchanged.
    """
    return base * factor ** (dim / (dim - 2))


def dynamic_ntk_base(base: float, factor: float, dim: int, length: int, original_length: int) -> float:
    """Dynamic NTK base at sequence length ``l`` (transformers v5 ``dynamic``; METHODS §2.3).

    ``b' = b * ((s * l / L) - (s - 1))^(d / (d - 2))`` for ``l > L``, and ``b`` for ``l <= L``: NTK-aware scaling whose
    effective scale ``s * l / L - (s - 1)`` is 1 at ``l = L`` and grows with the length.
    """
    if length <= original_length:
        return base
    return base * ((factor * length / original_length) - (factor - 1)) ** (dim / (dim - 2))


def find_correction_dim(num_rotations: float, dim: int, base: float, original_length: int) -> float:
    """The (fractional) pair index whose wavelength fits ``num_rotations`` full turns into ``L``.

    Solves ``L / lambda_i = R`` for ``i`` with ``lambda_i = 2*pi * b^(2i/d)`` (YaRN paper §3.2: the ratio
    ``r(d) = L / lambda_d``): ``i = d * ln(L / (2*pi*R)) / (2 * ln b)``.
    """
    return dim * math.log(original_length / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float, original_length: int,
                          truncate: bool = True) -> tuple[float, float]:
    """Pair indices ``(low, high)`` between which NTK-by-parts ramps from extrapolation to interpolation.

    Pairs below ``low`` turn more than ``beta_fast`` times over ``L`` (high frequency: kept), pairs above ``high``
    fewer than ``beta_slow`` times (low frequency: interpolated). The paper's ``beta = 32`` and ``alpha = 1`` (YaRN
    §3.2) are ``beta_fast`` and ``beta_slow``. With ``truncate`` (the reference code and transformers'
    default) the bounds are floored/ceiled to whole pairs. Clamped to ``[0, d - 1]`` as the reference code does (the
    upper clamp is loose, ``d/2 - 1`` would be tight, and has no effect on the ramp).
    """
    low = find_correction_dim(beta_fast, dim, base, original_length)
    high = find_correction_dim(beta_slow, dim, base, original_length)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_ramp(low: float, high: float, num_pairs: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Interpolation weight of each pair, ``clamp((i - low) / (high - low), 0, 1)``, ``[d/2]`` fp32.

    This is ``1 - gamma(r(i))`` of YaRN §3.2 in pair-index space: 0 for the fast pairs (kept), 1 for the slow pairs
    (fully interpolated). ``low == high`` is widened by 0.001 as in the reference code.
    """
    if low == high:
        high += 0.001
    return torch.clamp((torch.arange(num_pairs, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature as a cos/sin multiplier: ``sqrt(1/t) = 0.1 * m * ln(s) + 1`` (YaRN §3.4,
    eq. 21-22, with ``m = 1``; DeepSeek's ``mscale`` generalises it). 1 for ``s <= 1``."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(factor: float, attention_factor: float | None = None, mscale: float | None = None,
                          mscale_all_dim: float | None = None) -> float:
    """The cos/sin multiplier YaRN uses: ``attention_factor`` if given (it replaces the computed one, as in
    transformers), else DeepSeek's ``mscale(s, mscale) / mscale(s, mscale_all_dim)`` when both are given, else the
    paper's ``0.1 ln s + 1`` (YaRN §3.4, eq. 21-22)."""
    if attention_factor is not None:
        return attention_factor
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def yarn_inv_freq(dim: int, base: float, factor: float, original_length: int, beta_fast: float = 32.0,
                  beta_slow: float = 1.0, truncate: bool = True,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """YaRN: NTK-by-parts frequencies and the paper's temperature, ``(inv_freq [d/2] fp32, mscale)``.

    NTK-by-parts (YaRN §3.2) blends in frequency space,
    ``h(theta_i) = (1 - gamma_i) * theta_i / s + gamma_i * theta_i``, with ``gamma`` the ramp over
    ``r(i) = L / lambda_i`` between ``beta_slow`` and ``beta_fast`` rotations; the temperature is
    ``0.1 ln s + 1`` (§3.4, eq. 21-22). See ``yarn_attention_factor`` for the other temperature choices.
    """
    theta = rope_inv_freq(dim, base, device)
    low, high = yarn_correction_range(beta_fast, beta_slow, dim, base, original_length, truncate)
    interpolate = yarn_ramp(low, high, dim // 2, device)  # 1 - gamma
    return theta / factor * interpolate + theta * (1 - interpolate), yarn_mscale(factor)


def longrope_init_factors(dim: int, base: float, factor: float, original_length: int, beta_fast: float = 32.0,
                          beta_slow: float = 1.0) -> list[float]:
    """The starting point of LongRoPE's factor search: YaRN's ramp blended in *scale* space,
    ``lambda_i = s * ramp_i + 1 * (1 - ramp_i)`` (microsoft/LongRoPE ``evolution/search.py``, β 32/1 for Llama).

    Unlike YaRN's frequency-space blend this keeps ``theta_i / lambda_i`` a harmonic rather than arithmetic mean.
    """
    low, high = yarn_correction_range(beta_fast, beta_slow, dim, base, original_length)
    interpolate = yarn_ramp(low, high, dim // 2).double()
    return (factor * interpolate + (1 - interpolate)).tolist()


# Parameter checks and model lookups shared by the method configs (pi, ntk, yarn, llama3, longrope, dynamic).


def check_factor(factor: float, where: str = "posenc.factor") -> None:
    """A context-extension ratio ``s = L'/L`` must be a finite number >= 1."""
    check(math.isfinite(factor) and factor >= 1, where,
          f"must be a finite number >= 1 (the context extension ratio L'/L), got {factor}")


def check_positive(value: float | None, where: str) -> None:
    """An optional parameter, when set, must be a finite number > 0."""
    check(value is None or (math.isfinite(value) and value > 0), where, f"must be > 0, got {value}")


def resolve_original_length(config, target) -> int:
    """A method's ``original_max_position_embeddings``, or the model's training length when it is null: the
    model's own ``original_max_position_embeddings`` if its rope parameters have one, else
    ``max_position_embeddings``."""
    return int(config.original_max_position_embeddings or original_length(target.config))


def rope_theta(target, method: str, rope_parameters: dict | None = None) -> float:
    """The RoPE base ``b`` of a model (or of one layer type's ``rope_parameters``)."""
    params = rope_parameters if rope_parameters is not None else target.config.rope_parameters
    if "rope_theta" not in params:
        raise UnsupportedModelError(
            f"posenc={method} derives its frequencies from one rope_theta, but {type(target.model).__name__} has "
            f"per-layer-type rope_parameters ({', '.join(map(str, params))})"
        )
    return float(params["rope_theta"])
