"""The registry of perplexity protocols (the key is the ``name`` written into results) and what applies to any of
them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from lce.eval.perplexity import NllFn, model_nll_fn
from lce.registry import Registry

PROTOCOLS: Registry = Registry("protocol")


@dataclass(frozen=True)
class Protocol:
    """Base of perplexity protocols. Subclasses add ``name: str = "<key>"``, their parameters, the kind of ``input``
    they read (``documents`` or one token ``stream``) and ``score``."""

    name: str
    input: ClassVar[str] = "documents"

    def model_nll_fn(self, model, chunk_size: int = 4096, device=None) -> NllFn:
        """How the protocol runs the model: one full forward per window (``lce.eval.perplexity.model_nll_fn``:
        chunked logits, never ``T x V`` at once), unless the protocol needs another way (``streaming``)."""
        return model_nll_fn(model, chunk_size, device)

    def with_bucket_size(self, size: int) -> Protocol:
        """This protocol reporting per-position buckets of ``size`` tokens where it reports buckets and none is set
        (a run's default: its training length); a protocol without buckets is returned as is."""
        return self


def build_protocol(spec: Any, where: str = "protocol"):
    """A protocol config from a name, a mapping with ``name``, a config node or an instance."""
    return PROTOCOLS.build(spec, where)


def protocol_nll_fn(protocol: Protocol, model, chunk_size: int = 4096, device=None) -> NllFn:
    """The ``nll_fn`` ``protocol`` scores ``model`` with (``Protocol.model_nll_fn``)."""
    return protocol.model_nll_fn(model, chunk_size, device)


def protocol_meta(config) -> dict:
    """The protocol's identity for result rows: its name and every parameter."""
    return dataclasses.asdict(config)
