"""Greedy decoding with the KV cache, the generator retrieval trials run by default."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lce.hf.cache import cache_keyword, returned_cache

GenerateFn = Callable[[torch.Tensor, int], list[int]]


def greedy_generate(
    model: nn.Module, ids: torch.Tensor, max_new_tokens: int, eos_id: int | None = None,
    device: torch.device | str | None = None,
) -> list[int]:
    """Greedy continuation of ``ids [T]`` with the KV cache; the prefill keeps only the last position's logits.

    Returns:
        The generated token ids (at most ``max_new_tokens``; ``eos_id`` ends generation and is not returned).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    generated: list[int] = []
    keyword = cache_keyword(model)
    with torch.inference_mode():
        out = model(input_ids=ids[None].to(device), use_cache=True, logits_to_keep=1)
        for step in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            if token == eos_id:
                break
            generated.append(token)
            if step + 1 < max_new_tokens:
                step_ids = torch.tensor([[token]], device=device)
                out = model(input_ids=step_ids, use_cache=True, **{keyword: returned_cache(out)})
    return generated


def model_generate_fn(
    model: nn.Module, eos_id: int | None = None, device: torch.device | str | None = None
) -> GenerateFn:
    """``generate(ids [T], max_new_tokens) -> list[int]`` by ``greedy_generate`` on ``model``."""
    return lambda ids, max_new_tokens: greedy_generate(model, ids, max_new_tokens, eos_id, device)
