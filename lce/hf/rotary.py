"""Rotary modules lce swaps into a model instance.

Most families hold one rotary module with one ``inv_freq`` (``forward(x, position_ids) -> (cos, sin)``). Gemma3 holds
one module with a set of frequencies per layer type (``{layer_type}_inv_freq``, ``forward(x, position_ids,
layer_type)``); ``LayerTypeView`` shows one layer type of it as a plain rotary module, and ``LayerTypeRotary``
assembles per-layer-type modules back into the shape Gemma3's model calls.

``keep_fp32`` guards the rotary module of a patched model against casts: ``model.half()`` or
``model.to(torch.bfloat16)`` would turn its fp32 frequencies into bf16 (an angle error of ~234 rad at position 1e5,
i.e. no position information), whereas ``from_pretrained(dtype=...)`` keeps them fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from lce.errors import UnsupportedModelError


def rotary_inv_freqs(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every inverse-frequency buffer a rotary module (and its submodules) holds, by buffer name.

    ``original_inv_freq`` copies (kept by transformers for dynamic scaling) are left out.
    """
    found = {name: buf for name, buf in module.named_buffers()
             if name.endswith("inv_freq") and not name.endswith("original_inv_freq")}
    if not found and isinstance(getattr(module, "inv_freq", None), torch.Tensor):
        found["inv_freq"] = module.inv_freq
    return found


class Fp32Apply:
    """Installed as one rotary module's ``_apply`` (by ``keep_fp32``): runs the module's own ``_apply`` (what
    ``.to()``, ``.half()``, ``.bfloat16()``, ``.cuda()`` call), then undoes any change of a float32 buffer of the
    module or its submodules to another floating dtype, putting the fp32 tensor from before the cast back on the new
    device. Device moves go through; dtype casts do not reach the frequencies.

    An instance attribute, not a subclass or a patched class method: it guards this module only, survives
    ``copy.deepcopy`` and pickling (it is a plain module-level class), and ``release_fp32`` removes it.
    """

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, fn, recurse: bool = True) -> nn.Module:
        module = self.module
        before = [(owner, name, buffer) for owner in module.modules() for name, buffer in owner._buffers.items()
                  if buffer is not None and buffer.dtype == torch.float32]
        type(module)._apply(module, fn, recurse)
        moved: dict[tuple[int, torch.device], torch.Tensor] = {}  # buffers shared before stay shared
        for owner, name, old in before:
            new = owner._buffers.get(name)
            if new is not None and new.is_floating_point() and new.dtype != torch.float32:
                key = (id(old), new.device)
                if key not in moved:
                    moved[key] = old.to(new.device)
                owner._buffers[name] = moved[key]
        return module


def keep_fp32(rotary: nn.Module) -> nn.Module:
    """Keep the float32 buffers of ``rotary`` (its frequencies) float32 through any cast of the model it belongs to
    (``Fp32Apply``); device moves still apply. Returns ``rotary``."""
    if not isinstance(rotary.__dict__.get("_apply"), Fp32Apply):
        rotary._apply = Fp32Apply(rotary)
    return rotary


def release_fp32(rotary: nn.Module) -> nn.Module:
    """Undo ``keep_fp32``: ``rotary`` casts like any module again. Returns ``rotary``."""
    if isinstance(rotary.__dict__.get("_apply"), Fp32Apply):
        del rotary.__dict__["_apply"]
    return rotary


class NeutralRotary(nn.Module):
    """Returns ``cos = 1, sin = 0``: the model's ``apply_rotary_pos_emb`` becomes an exact identity.

    Used by methods that remove rotation (NoPE, ALiBi) or rotate inside attention instead (DCA, Self-Extend, ReRoPE).
    Keeps the replaced module's inverse frequencies (fp32, not persistent) so the rotary width and frequencies stay
    inspectable: ``inv_freq`` for a one-rotation module, ``{layer_type}_inv_freq`` for Gemma3's. Accepts and ignores
    the ``layer_type`` argument of multi-rotation modules: every layer type of one model rotates the same width.
    """

    def __init__(self, replaced: nn.Module):
        super().__init__()
        freqs = rotary_inv_freqs(replaced)
        widths = {2 * f.numel() for f in freqs.values()}
        if len(widths) != 1:
            raise UnsupportedModelError(
                f"{type(replaced).__name__}: cannot neutralise a rotary module with rotary widths {sorted(widths)} "
                "(needs exactly one width)"
            )
        for name, freq in freqs.items():
            self.register_buffer(name.replace(".", "_"), freq.detach().clone().float(), persistent=False)
        self.rotary_dim = widths.pop()

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *layer_type) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, T, C]``, ``position_ids [B|1, T]`` -> ``cos, sin [B|1, T, rotary_dim]`` in ``x.dtype``."""
        shape = (*position_ids.shape, self.rotary_dim)
        return x.new_ones(shape), x.new_zeros(shape)


class LayerTypeView(nn.Module):
    """One layer type of a multi-rotation module (Gemma3's) as a plain rotary module.

    Exposes what a one-rotation module has (``inv_freq``, ``attention_scaling``, ``rope_type``, ``config``) plus the
    layer type's own ``rope_parameters``; ``forward(x, position_ids)`` returns that layer type's ``(cos, sin)``.
    The viewed module is shared, not copied.
    """

    def __init__(self, rotary: nn.Module, layer_type: str):
        super().__init__()
        self.rotary = rotary
        self.layer_type = layer_type

    @property
    def inv_freq(self) -> torch.Tensor:
        return getattr(self.rotary, f"{self.layer_type}_inv_freq")

    @property
    def original_inv_freq(self) -> torch.Tensor:
        return getattr(self.rotary, f"{self.layer_type}_original_inv_freq")

    @property
    def attention_scaling(self) -> float:
        return getattr(self.rotary, f"{self.layer_type}_attention_scaling")

    @property
    def rope_type(self) -> str:
        return self.rotary.rope_type[self.layer_type]

    @property
    def config(self):
        return self.rotary.config

    @property
    def rope_parameters(self) -> dict:
        return self.rotary.config.rope_parameters[self.layer_type]

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(x, position_ids, self.layer_type)


class LayerTypeRotary(nn.Module):
    """Per-layer-type rotary modules behind Gemma3's ``rotary_emb(x, position_ids, layer_type)`` call.

    Args:
        slots: ``{layer_type: module}`` with ``module(x, position_ids) -> (cos, sin)``.
    """

    def __init__(self, slots: dict[str, nn.Module]):
        super().__init__()
        self.slots = nn.ModuleDict(slots)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str):
        return self.slots[layer_type](x, position_ids)
