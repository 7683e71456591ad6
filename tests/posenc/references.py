"""Readable references for the frequency methods lce applies only as transformers' own rope types (PI's ``linear``,
``llama3``, ``longrope``), written from the papers' equations and compared with ``ROPE_INIT_FUNCTIONS`` in
``tests/posenc/test_frequency.py``.

lce's code path for these methods is the built-in rope type, so that a saved checkpoint loads in vanilla transformers;
these functions are the specification it is checked against, and live with the tests because no lce code calls them.
What lce computes itself (``rope_inv_freq``, the NTK base, YaRN's frequencies and temperature, LongRoPE's starting
factors) is in ``lce.posenc.frequencies``. Notation as there (METHODS.md §2): rotary dim ``d``, base ``b``,
``theta_i = b^(-2i/d)``, wavelength ``lambda_i = 2*pi/theta_i``, original length ``L``, scale ``s``.

Papers: PI, Chen et al. 2023 (arXiv:2306.15595); Llama 3, Dubey et al. 2024 (arXiv:2407.21783); LongRoPE, Ding et al.
2024 (arXiv:2402.13753).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lce.posenc.frequencies import rope_inv_freq


def pi_inv_freq(inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    """Position Interpolation: ``g(m) = m / s`` (PI paper §2.3). RoPE angles are ``m * theta_i``, so dividing the
    positions is dividing the frequencies: ``theta_i / s`` (transformers' ``linear`` rope type)."""
    return inv_freq / factor


def llama3_inv_freq(dim: int, base: float, factor: float, original_length: int, low_freq_factor: float = 1.0,
                    high_freq_factor: float = 4.0, device: torch.device | str | None = None) -> torch.Tensor:
    """Llama 3.1's frequency scaling, ``[d/2]`` fp32 (no equation in the Llama 3 paper; the released reference is
    transformers' ``_compute_llama3_parameters``, constants from Meta's Llama 3.1 release: 8, 1, 4, 8192).

    Wavelengths shorter than ``L / high_freq_factor`` are kept, longer than ``L / low_freq_factor`` divided by ``s``,
    and in between blended with ``smooth = (L / lambda - low) / (high - low)``:
    ``theta' = (1 - smooth) * theta / s + smooth * theta`` -- NTK-by-parts with ``alpha = low_freq_factor``,
    ``beta = high_freq_factor`` and no temperature (attention factor 1).
    """
    theta = rope_inv_freq(dim, base, device)
    wavelength = 2 * math.pi / theta
    smooth = (original_length / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * theta / factor + smooth * theta
    out = torch.where(wavelength > original_length / low_freq_factor, theta / factor, blended)
    return torch.where(wavelength < original_length / high_freq_factor, theta, out)


def longrope_inv_freq(dim: int, base: float, rescale: Sequence[float],
                      device: torch.device | str | None = None) -> torch.Tensor:
    """LongRoPE: one searched rescale factor per pair, ``theta_i' = 1 / (lambda_i * b^(2i/d))``
    (``_calc_inv_freq`` in microsoft/LongRoPE ``rope/longrope.py``), ``[d/2]`` fp32."""
    factors = torch.tensor(list(rescale), dtype=torch.float32, device=device)
    return 1.0 / (factors * base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def longrope_mscale(factor: float, original_length: int) -> float:
    """LongRoPE's default ("su") cos/sin multiplier ``sqrt(1 + ln s / ln L)``, 1 for ``s <= 1``.

    Its square ``1 + ln s / ln L = log_L(s * L)`` is log-n scaling evaluated at the target length.
    """
    if factor <= 1:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original_length))
