"""Token-by-token scoring with a KV cache that keeps only the first and the most recent entries (StreamingLLM).

StreamingLLM's perplexity script (Xiao et al. 2024, arXiv:2309.17453; mit-han-lab/streaming-llm
``examples/eval_long_ppl.py`` with ``streaming_llm/kv_cache.py::StartRecentKVCache``) feeds a text one token at a
time, no prefill, scores each next token from the logits, and after every step prunes the cache to its first
``start_size`` and last ``recent_size`` entries. ``streaming_nll_fn`` does the same through transformers v5's cache
API, as an ``nll_fn`` (``[B, T] -> [B, T-1]``) that any ``lce.eval.protocols`` protocol can use.

Positions are cache-local: the token fed at step ``t`` gets position ``n_t``, the number of entries the cache holds
before it (``t`` until eviction starts). This is what the script's Llama got from transformers 4.33, which derived
``position_ids`` from the cache length, and what makes eviction right for each kind of model:

- ``posenc=sinks`` (lce's StreamingLLM) rotates queries and keys inside attention from positions; its keys are
  cached unrotated and rotated at ``arange(kv_len)``, the cache-local positions, so decoding with eviction is the
  pos-shift of ``streaming_llm/pos_shift/modify_llama.py`` and equals the full forward of the sinks model.
- A model that caches rotated keys (plain RoPE and the frequency methods) keeps every key at the position it was
  fed at and the query at ``n_t``: the script without ``--enable_pos_shift``.
- Without eviction (``recent_size=None``) cache-local positions are the true ones: plain incremental decoding, equal
  to a full forward.

Sizes: ``recent_size`` counts the current token, as ``lce.posenc.sinks`` does, so the token fed at a step attends
``start_size + recent_size`` keys at most and the cache keeps ``start_size + recent_size - 1`` between steps; the
script's ``--recent_size r`` is ``recent_size = r + 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from lce.config import check
from lce.errors import UnsupportedModelError
from lce.eval.perplexity import NllFn
from lce.hf.adapters import adapter_for
from lce.hf.cache import cache_keyword
from lce.hf.lm import logits_from_hidden


class StartRecentLayer(DynamicLayer):
    """A full-attention cache layer that keeps its first ``start_size`` and last ``keep_recent`` entries.

    ``update`` returns every cached entry plus the new ones (what the current tokens attend), then keeps only the
    first ``start_size`` and the last ``keep_recent`` of them: ``StartRecentKVCache.__call__`` applied right after the
    step rather than before the next one, which is the same.
    """

    def __init__(self, start_size: int, keep_recent: int):
        super().__init__()
        self.start_size, self.keep_recent = start_size, keep_recent

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """``key_states, value_states [B, HKV, T, D]`` -> every cached and new key and value ``[B, HKV, n, D]``."""
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        n = keys.shape[-2]
        if n > self.start_size + self.keep_recent:
            recent = slice(n - self.keep_recent, n)
            self.keys = torch.cat([keys[..., : self.start_size, :], keys[..., recent, :]], dim=-2)
            self.values = torch.cat([values[..., : self.start_size, :], values[..., recent, :]], dim=-2)
        return keys, values


def start_recent_cache(model: nn.Module, start_size: int, recent_size: int) -> DynamicCache:
    """A ``DynamicCache`` for ``model`` whose layers keep ``start_size`` first and ``recent_size - 1`` last entries.

    Raises:
        UnsupportedModelError: a layer of the model caches otherwise (a sliding window, a linear-attention state):
            evicting its entries would not be StreamingLLM's eviction.
    """
    cache = DynamicCache(config=model.config)
    for index, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            raise UnsupportedModelError(
                f"protocol.recent_size: streaming eviction keeps the first and last entries of full-attention KV "
                f"caches, but layer {index} of {type(model).__name__} caches with {type(layer).__name__}; "
                "set recent_size to null (no eviction) for this model"
            )
    cache.layers = [StartRecentLayer(start_size, recent_size - 1) for _ in cache.layers]
    return cache


def streaming_nll_fn(model: nn.Module, start_size: int = 4, recent_size: int | None = None,
                     device: torch.device | str | None = None) -> NllFn:
    """``nll_fn(input_ids [B, T]) -> [B, T-1]``: the float32 NLL (nats) of token ``t+1``, fed one token at a time.

    Each call starts from an empty cache; the rows of a batch are streams of equal length decoded together.

    Args:
        model: a causal LM supported by ``lce.hf.adapters``.
        start_size: first entries kept (the attention sinks); only used with ``recent_size``.
        recent_size: most recent entries attended, the current token included; None keeps every entry.
        device: where to run; ``None`` means the device of the model's parameters.
    """
    check(start_size >= 0, "protocol.start_size", f"must be >= 0, got {start_size}")
    check(recent_size is None or recent_size >= 1, "protocol.recent_size",
          f"must be >= 1 (the current token) or null for no eviction, got {recent_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    base = adapter_for(model).base_model(model)
    keyword = cache_keyword(base)

    def nll_fn(input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise ValueError(f"input_ids must be [B, T] with T >= 2, got {tuple(input_ids.shape)}")
        ids = input_ids.to(device)
        batch, length = ids.shape
        cache = (DynamicCache(config=model.config) if recent_size is None
                 else start_recent_cache(model, start_size, recent_size))
        nll = torch.empty(batch, length - 1, dtype=torch.float32, device=device)
        with torch.inference_mode():
            for t in range(length - 1):
                position = torch.full((batch, 1), cache.get_seq_length(), dtype=torch.long, device=device)
                hidden = base(input_ids=ids[:, t : t + 1], position_ids=position, use_cache=True,
                              **{keyword: cache}).last_hidden_state  # [B, 1, C]
                logits = logits_from_hidden(model, hidden[:, 0]).float()  # [B, V]
                nll[:, t] = F.cross_entropy(logits, ids[:, t + 1], reduction="none")
        return nll

    return nll_fn
