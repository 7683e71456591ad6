"""Perplexity protocols: how windows are cut, which predictions count, and how their NLL is averaged.

Published long-context perplexities differ in all three, so numbers from different papers only compare when the
protocol is reproduced exactly. Each protocol, one module of this package, is a registered, typed config
(``PROTOCOLS``; the key is the ``name`` written into results and the option of the config group ``eval/protocol``,
``conf/eval/protocol/<name>.yaml``) whose ``score`` method implements one published convention:

=============== =================================================== ==================================================
name            windows                                             aggregation
=============== =================================================== ==================================================
canonical       each document truncated to L, one window            token-weighted; position buckets; bootstrap CI
yarn            per document, BOS + L-1 tokens every ``stride``     **mean of per-window mean losses**
longlora_stream one stream, L tokens every ``stride``, all scored   **mean of per-batch mean losses**
sliding         per document, L tokens every ``stride``, new scored token-weighted, every token scored once
fairseq         one stream, blocks of L-C new tokens + C context    token-weighted, every token scored once
streaming       per document, (BOS +) L tokens fed one at a time    token-weighted; position buckets
                with a KV cache, optionally evicting all but the
                first and most recent entries
=============== =================================================== ==================================================

The protocols never touch a model: they call ``nll_fn(input_ids [B, T]) -> [B, T-1]``, the NLL (nats) of token
``t+1`` given tokens ``0..t`` of each row, so a hand-computable fake can stand in for a model in tests.
``model_nll_fn(model, chunk_size, device)`` is the real one (chunked logits, never ``T x V`` at once); a protocol
that must run the model differently (``streaming``: token by token with a KV cache) has its own ``model_nll_fn``
method, and ``protocol_nll_fn`` picks it.

Sources: YaRN (Peng et al., arXiv:2309.00071), LongLoRA (Chen et al., arXiv:2309.12307) and Dual Chunk Attention
(An et al., arXiv:2402.17463), ALiBi (Press et al., arXiv:2108.12409), StreamingLLM (Xiao et al., arXiv:2309.17453),
each protocol's reference file named in its docstring. Only ``canonical`` (nanoGPT's rule: NLL summed, divided once)
is a sound statistic; ``yarn`` and ``longlora_stream`` weight a prediction by one over the size of its window or
batch, and exist to reproduce published tables. Their results carry ``aggregation`` so that a report never mixes them
up silently.
"""

import importlib
import pkgutil

from lce.eval.perplexity import NllFn, model_nll_fn
from lce.eval.protocols.canonical import CanonicalProtocol, bootstrap_interval
from lce.eval.protocols.fairseq import FairseqProtocol
from lce.eval.protocols.longlora import LongLoraStreamProtocol
from lce.eval.protocols.registry import PROTOCOLS, Protocol, build_protocol, protocol_meta, protocol_nll_fn
from lce.eval.protocols.sliding import SlidingProtocol
from lce.eval.protocols.streaming import StreamingProtocol
from lce.eval.protocols.yarn import YarnProtocol
from lce.eval.score import MEAN_OF_BATCH_MEANS, MEAN_OF_WINDOW_MEANS, TOKEN_MEAN, ProtocolScore

for _module in pkgutil.iter_modules(__path__):  # every protocol module registers itself: adding one is adding a module
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "MEAN_OF_BATCH_MEANS",
    "MEAN_OF_WINDOW_MEANS",
    "PROTOCOLS",
    "TOKEN_MEAN",
    "CanonicalProtocol",
    "FairseqProtocol",
    "LongLoraStreamProtocol",
    "NllFn",
    "Protocol",
    "ProtocolScore",
    "SlidingProtocol",
    "StreamingProtocol",
    "YarnProtocol",
    "bootstrap_interval",
    "build_protocol",
    "model_nll_fn",
    "protocol_meta",
    "protocol_nll_fn",
]
