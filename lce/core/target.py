"""What a method may do to a model: the protocol position encodings and attention variants patch through.

``lce.hf.patch.PatchTarget`` implements it for Hugging Face models; methods (``PosEnc.apply``,
``AttentionVariant.apply``) see only this, so they know no transformers internals and unpatching can restore
everything they changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from torch import nn

from lce.core.plan import LayerAttention, Restriction
from lce.kernels.rope import Rotation


class PatchTarget(Protocol):
    """One model being patched.

    Attributes:
        model: the model (read-only for methods: every change goes through the methods below).
        config: its config.
        adapter: its family's adapter (``rotary_dim(model)``, ``rotation(rotary)``, ``family``).
    """

    model: nn.Module
    adapter: Any

    @property
    def config(self) -> Any: ...

    def has_rotary(self) -> bool:
        """Whether the model has a rotary embedding."""
        ...

    def require_rotary(self, method: str) -> nn.Module:
        """The rotary module; a clear error naming ``method`` when the model has none."""
        ...

    def neutralize_rotary(self, method: str = "nope") -> None:
        """Make the rotary embedding an identity (NoPE, ALiBi)."""
        ...

    def set_rope_parameters(self, method: str, **override: Any) -> None:
        """Merge ``override`` into the model's ``rope_parameters`` and rebuild its frequencies (transformers' own
        implementation of the method)."""
        ...

    def replace_rotary(self, method: str, build: Callable[[nn.Module], nn.Module]) -> None:
        """Replace the rotary module with ``build(plain rotary module)``."""
        ...

    def rotate_in_attention(self, method: str, layer: int | None = None) -> Rotation:
        """Make the rotary embedding an identity and return the rotation for attention to apply itself."""
        ...

    def layer_rotations_in_attention(self, method: str) -> list[Rotation]:
        """``rotate_in_attention(method, layer=i)`` for every decoder layer."""
        ...

    def compute_attention(self, method: str,
                          attention_for_layer: Callable[[int, nn.Module], LayerAttention | None]) -> None:
        """Compute attention in layer ``i`` with ``attention_for_layer(i, attention_module)`` (None: the model's)."""
        ...

    def attach_parameters(self, method: str, build: Callable[[int, nn.Module], nn.Module | None]) -> None:
        """Give layer ``i``'s attention module the parameters of ``build(i, attention_module)`` (None: none): trained,
        saved and reloaded with the model, removed by unpatching."""
        ...

    def scale_queries(self, method: str, logn_length: int) -> None:
        """Log-n query scaling with training length ``logn_length``."""
        ...

    def restrict(self, method: str, restriction_for_layer: Callable[[int, nn.Module], Restriction | None]) -> None:
        """Let layer ``i`` attend only the pairs ``restriction_for_layer(i, attention_module)`` makes visible."""
        ...
