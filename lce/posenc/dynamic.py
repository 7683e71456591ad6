"""Dynamic NTK and dynamic YaRN: frequencies that follow the current sequence length, recomputed statelessly.

Both scale RoPE by the length ``l = max(position_ids) + 1`` of each forward (YaRN paper, Peng et al. 2023,
arXiv:2309.00071, §3.3 "Dynamic Scaling"; emozilla's dynamic NTK):

- ``dynamic_ntk`` (transformers v5 ``dynamic``, METHODS §2.3): for ``l > L`` the base becomes
  ``b' = b * ((s * l / L) - (s - 1))^(d / (d - 2))``; up to ``L`` it is the original ``b``; no temperature.
- ``dynamic_yarn`` (jquesnelle/yarn ``LlamaDynamicYaRNScaledRotaryEmbedding``, METHODS §2.4): YaRN at scale
  ``s = max(1, l / L)``, with its temperature at that scale. transformers has no such type.

Stateless: transformers' ``dynamic`` type keeps ``max_seq_len_cached`` and only recomputes when the length grows
past it (or drops below ``L``), so a 100-token forward after a 200-token one reuses the 200-token base, and a
perplexity sweep depends on the order of its lengths. The rotary modules here hold no state: every forward computes
``inv_freq`` (fp32, from Python scalars, so even after ``model.to(torch.bfloat16)``) and the cos/sin multiplier from
``l`` alone. For ``l <= L`` they are bit-identical to the unpatched model.

KV-cache caveat (METHODS §2.3; HF #25104, YaRN §3.3): keys are cached *after* rotation, so while decoding past ``L``
each cached key keeps the frequencies of the step that computed it, whereas a full forward rotates all keys with the
frequencies of the final length. Decoding equals a full forward only while the sequence stays within ``L``; beyond it
the two are different (both reasonable) models. Correct dynamic scaling with a cache needs pre-rotation keys.

Checkpoints: ``dynamic_ntk`` also sets ``rope_parameters = {"rope_type": "dynamic", "factor": s}`` (when ``L`` is the
model's ``max_position_embeddings``, the length transformers' ``dynamic`` scales from), so a saved model loads in
vanilla transformers as its (stateful) dynamic NTK; ``dynamic_yarn`` leaves ``rope_parameters`` unchanged, so vanilla
transformers loads it as plain RoPE. ``lce.load_model`` re-applies either from ``config.lce``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lce.config import check
from lce.kernels.rope import Rotation
from lce.posenc.base import POSENCS, PosEnc
from lce.posenc.frequencies import (
    check_factor,
    dynamic_ntk_base,
    resolve_original_length,
    rope_inv_freq,
    rope_theta,
    yarn_attention_factor,
    yarn_inv_freq,
)
from lce.posenc.yarn import check_yarn_fields


class StatelessDynamicRotary(nn.Module):
    """A rotary module whose frequencies are a function of the current length only.

    Args:
        dim: rotary dim ``d``.
        base: RoPE base ``b`` (the model's ``rope_theta``).
        original_length: ``L``, the length up to which RoPE is unchanged.
        style: how the model pairs dims (``half`` for Llama's ``rotate_half``).

    ``inv_freq`` (a non-persistent buffer) holds the frequencies for ``l <= L``, for inspection and the rotary width;
    ``forward`` never reads it.
    """

    def __init__(self, dim: int, base: float, original_length: int, style: str = "half"):
        super().__init__()
        self.dim, self.base, self.original_length, self.style = dim, float(base), int(original_length), style
        self.attention_scaling = 1.0
        self.inv_freq = nn.Buffer(rope_inv_freq(dim, self.base), persistent=False)

    def frequencies(self, length: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
        """``(inv_freq [d/2] fp32, cos/sin multiplier)`` for a forward whose positions reach ``length - 1``."""
        raise NotImplementedError

    def rotation(self, length: int) -> Rotation:
        """The rotation every position of a length-``length`` forward gets."""
        inv_freq, scaling = self.frequencies(length)
        return Rotation(inv_freq, scaling, self.style)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, C]`` (for dtype/device), ``position_ids [B|1, T]`` -> ``cos, sin [B|1, T, d]`` in ``x.dtype``."""
        length = int(position_ids.max()) + 1
        inv_freq, scaling = self.frequencies(length, x.device)
        return Rotation(inv_freq, scaling, self.style).cos_sin(position_ids, x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, original_length={self.original_length}"


class DynamicNtkRotary(StatelessDynamicRotary):
    """Dynamic NTK: base ``b * ((s * l / L) - (s - 1))^(d / (d - 2))`` for ``l > L``, no temperature."""

    def __init__(self, dim: int, base: float, original_length: int, factor: float, style: str = "half"):
        super().__init__(dim, base, original_length, style)
        self.factor = float(factor)

    def frequencies(self, length, device=None):
        base = dynamic_ntk_base(self.base, self.factor, self.dim, length, self.original_length)
        return rope_inv_freq(self.dim, base, device), 1.0


class DynamicYarnRotary(StatelessDynamicRotary):
    """Dynamic YaRN: NTK-by-parts and temperature at ``s = max(1, l / L)``; exactly RoPE for ``l <= L``."""

    def __init__(self, dim: int, base: float, original_length: int, beta_fast: float, beta_slow: float,
                 truncate: bool, attention_factor: float | None, mscale: float | None, mscale_all_dim: float | None,
                 style: str = "half"):
        super().__init__(dim, base, original_length, style)
        self.beta_fast, self.beta_slow, self.truncate = beta_fast, beta_slow, truncate
        self.attention_factor, self.mscale, self.mscale_all_dim = attention_factor, mscale, mscale_all_dim

    def frequencies(self, length, device=None):
        if length <= self.original_length:
            # s = 1 is RoPE by definition (the ramp blend theta*(1-r) + theta*r could round away from theta).
            return rope_inv_freq(self.dim, self.base, device), 1.0
        scale = length / self.original_length
        inv_freq, _ = yarn_inv_freq(self.dim, self.base, scale, self.original_length, self.beta_fast, self.beta_slow,
                                    self.truncate, device)
        return inv_freq, yarn_attention_factor(scale, self.attention_factor, self.mscale, self.mscale_all_dim)


def _rotary_setting(target, method: str, rotary: nn.Module) -> tuple[int, float, str]:
    """``(rotary dim, base, pairing style)`` of the plain rotary module a dynamic module replaces.

    A family with one rotation per layer type hands over each layer type's module, with its own ``rope_parameters``.
    """
    base = rope_theta(target, method, getattr(rotary, "rope_parameters", None))
    return 2 * rotary.inv_freq.numel(), base, target.adapter.rotation(rotary).style


@POSENCS.register("dynamic_ntk")
@dataclass(frozen=True)
class DynamicNtk(PosEnc):
    """Dynamic NTK-aware scaling, recomputed from the current length in every forward.

    Attributes:
        factor: ``s`` in ``b * ((s * l / L) - (s - 1))^(d / (d - 2))``; 1 scales the base by ``(l / L)^(d/(d-2))``.
        original_max_position_embeddings: ``L``; null = the model's training length. The saved
            ``rope_parameters`` load in vanilla transformers only when this is the model's ``max_position_embeddings``.
    """

    name: str = "dynamic_ntk"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        super().__post_init__()
        check_factor(self.factor)
        check(self.original_max_position_embeddings is None or self.original_max_position_embeddings >= 1,
              "posenc.original_max_position_embeddings", f"must be >= 1, got {self.original_max_position_embeddings}")

    def apply(self, target) -> None:
        length = resolve_original_length(self, target)

        def build(rotary: nn.Module) -> nn.Module:
            dim, base, style = _rotary_setting(target, self.name, rotary)
            return DynamicNtkRotary(dim, base, length, self.factor, style)

        if length == target.config.max_position_embeddings:
            target.set_rope_parameters(self.name, rope_type="dynamic", factor=float(self.factor))
        target.replace_rotary(self.name, build)


@POSENCS.register("dynamic_yarn")
@dataclass(frozen=True)
class DynamicYarn(PosEnc):
    """YaRN at ``s = max(1, l / L)``, recomputed from the current length in every forward.

    Attributes:
        original_max_position_embeddings: ``L``; null = the model's training length.
        beta_fast, beta_slow, truncate: YaRN's ramp (see ``posenc=yarn``).
        attention_factor: constant cos/sin multiplier replacing the per-length temperature beyond ``L`` (1.0 turns
            it off); null computes ``0.1 ln s + 1`` at each length. Within ``L`` the multiplier is 1 either way.
        mscale, mscale_all_dim: DeepSeek's temperature ratio at each length; both or neither.
    """

    name: str = "dynamic_yarn"
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_yarn_fields(self)

    def apply(self, target) -> None:
        length = resolve_original_length(self, target)

        def build(rotary: nn.Module) -> nn.Module:
            dim, base, style = _rotary_setting(target, self.name, rotary)
            return DynamicYarnRotary(dim, base, length, self.beta_fast, self.beta_slow, self.truncate,
                                     self.attention_factor, self.mscale, self.mscale_all_dim, style)

        target.replace_rotary(self.name, build)
