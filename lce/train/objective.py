"""What training optimizes: the chunked next-token loss of a causal LM as one module, and AdamW over its weights.

Every training strategy (``lce.train.strategy``) builds these two around the model it trains: the caller's model, or
its sharded copy.
"""

from __future__ import annotations

import torch
from torch import nn

from lce.eval.loss import token_nll
from lce.hf.lm import hidden_states, loss_head
from lce.train.config import TrainConfig


class NextTokenLoss(nn.Module):
    """A causal LM and its chunked next-token loss as one module.

    accelerate applies autocast and DDP by wrapping a module's ``forward``; computing the loss inside one keeps the
    whole forward (hidden states and chunked logits) under those wrappers.
    """

    def __init__(self, model: nn.Module, chunk_size: int):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token NLL ``[B * T]`` float32 of ``inputs [B, T]`` predicting ``targets [B, T]`` (0 where a target is
        ``IGNORE``), with explicit ``position_ids [B, T]`` and ``attention_mask`` when given (see ``Batch``)."""
        kwargs = {"position_ids": position_ids} if position_ids is not None else {}
        hidden = hidden_states(self.model, inputs, attention_mask, **kwargs)
        return token_nll(
            loss_head(self.model), hidden.flatten(0, 1), targets.flatten(), self.chunk_size
        )


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (>= 2-D: linear and embedding weights) only, not on norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
