"""Running a causal LM in pieces: final hidden states, then logits only where needed (see ``lce.eval.loss``)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from lce.hf.adapters import adapter_for


def hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
) -> torch.Tensor:
    """Final (normed) hidden states ``[B, T] -> [B, T, C]`` without computing any logits."""
    out = adapter_for(model).base_model(model)(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
    )
    return out.last_hidden_state


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits ``[..., C] -> [..., V]`` as the model's own forward would compute them."""
    return adapter_for(model).logits(model, hidden)


def loss_head(model: nn.Module):
    """What ``lce.eval.loss.token_nll`` turns hidden states into logits with: the model's output layer as data
    (``lce.kernels.cross_entropy.LogitHead``, so the fused linear + cross-entropy never forms logits), or, for an
    output layer lce cannot describe (quantised, hooked), a callable computing the logits."""
    return adapter_for(model).logit_head(model) or partial(logits_from_hidden, model)
