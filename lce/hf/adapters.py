"""One small adapter per model family: the only place that knows where transformers keeps things.

An adapter says where a family's rotary module lives, how wide its rotation is, and how its logits are formed from
the final hidden states (some families scale or soft-cap them). Everything else in lce goes through
``adapter_for(model)``; an unsupported family is a clear error listing the supported ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lce.errors import UnsupportedModelError
from lce.posenc.rotation import Rotation


@dataclass(frozen=True)
class Adapter:
    """Transformers internals of one model family (decoder-only causal LMs with one shared rotary module)."""

    family: str
    rotary_attr: str = "rotary_emb"

    def base_model(self, model: nn.Module) -> nn.Module:
        return model.base_model

    def rotary(self, model: nn.Module) -> nn.Module:
        module = getattr(self.base_model(model), self.rotary_attr, None)
        if module is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no rotary module '{self.rotary_attr}'")
        return module

    def set_rotary(self, model: nn.Module, module: nn.Module) -> None:
        setattr(self.base_model(model), self.rotary_attr, module)

    def build_rotary(self, model: nn.Module) -> nn.Module:
        """A fresh rotary module of the model's own class from ``model.config`` (fp32 frequencies)."""
        old = self.rotary(model)
        return type(old)(config=model.config).to(next(model.parameters()).device)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The self-attention module of every decoder layer, in layer order."""
        return [layer.self_attn for layer in self.base_model(model).layers]

    def rotation(self, rotary: nn.Module) -> Rotation:
        """The rotation a rotary module applies, as a position-agnostic ``Rotation``."""
        return Rotation(rotary.inv_freq.detach().float().clone(), float(getattr(rotary, "attention_scaling", 1.0)))

    def rotary_dim(self, model: nn.Module) -> int:
        """Width of the rotated part of each head (head_dim, or less under partial rotary)."""
        return 2 * self.rotary(model).inv_freq.numel()

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states ``[..., C] -> [..., V]``, exactly as the family's forward forms them."""
        return model.get_output_embeddings()(hidden)


ADAPTERS: dict[str, Adapter] = {
    family: Adapter(family) for family in ("llama", "mistral", "qwen2", "qwen3")
}


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s family (its ``config.model_type``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"model family '{model_type}' ({type(model).__name__}) is not supported; "
            f"supported families: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]
