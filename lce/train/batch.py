"""What the model sees in one micro-batch: inputs, scored targets, and explicit position ids and attention mask.

Plain blocks need neither (positions ``0 ... T - 1``, causal attention). PoSE (``lce.train.pose``) gives position ids
with a skip, packing (``lce.train.packing``) position ids that restart per document: both come with an explicit
mask, so transformers never infers sequence boundaries from position-id jumps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lce.errors import ConfigError
from lce.train.config import TrainConfig
from lce.train.packing import document_ids, document_mask, document_positions, mask_for
from lce.train.pose import pose_batch, pose_generator

IGNORE = -100  # target id that is not scored (as in torch's cross_entropy)


@dataclass
class Batch:
    """One micro-batch.

    Attributes:
        inputs: ``[B, T]`` token ids.
        targets: ``[B, T]`` next-token ids, ``IGNORE`` where not scored.
        position_ids: ``[B, T]``, or None for ``0 ... T - 1``.
        attention_mask: ``[B, T]`` (all ones: explicit "no padding, no packing") or ``[B, 1, T, T]``, or None.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        move = lambda t: t.to(device) if t is not None else None
        return Batch(move(self.inputs), move(self.targets), move(self.position_ids), move(self.attention_mask))

    @property
    def scored(self) -> int:
        return int((self.targets != IGNORE).sum())


def block_length(cfg: TrainConfig) -> int:
    """Tokens per training block: ``seq_len + 1``, or PoSE's source window of ``pose_source_factor`` times that."""
    return cfg.pose_source_factor * (cfg.seq_len + 1) if cfg.pose_target_len else cfg.seq_len + 1


def make_batch(rows: torch.Tensor, index: int, cfg: TrainConfig, model: nn.Module, *, seed: int,
               eos_id: int | None = None, pose: bool = True) -> Batch:
    """The micro-batch of global index ``index`` from its blocks ``rows [B, block_length(cfg)]``.

    Args:
        pose: apply PoSE when ``cfg.pose_target_len`` is set (validation blocks are scored without it).
    """
    if pose and cfg.pose_target_len:
        tokens, positions = pose_batch(rows, cfg.seq_len, cfg.pose_target_len, pose_generator(seed, index))
        # An explicit all-ones mask: without one transformers would cut the sequence in two at the position skip.
        mask = torch.ones(tokens.shape[0], cfg.seq_len, dtype=torch.long)
        return Batch(tokens[:, :-1], tokens[:, 1:], positions, mask)
    inputs, targets = rows[:, :-1], rows[:, 1:]
    if not cfg.pack_documents:
        return Batch(inputs, targets)
    if eos_id is None:
        raise ConfigError("train.pack_documents: needs the tokenizer's eos id to find document boundaries")
    docs = document_ids(inputs, eos_id)
    dtype = next(model.parameters()).dtype
    mask = mask_for(document_mask(docs), model.config._attn_implementation, dtype)
    return Batch(inputs, targets.masked_fill(inputs == eos_id, IGNORE), document_positions(docs), mask)
