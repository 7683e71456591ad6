"""The position-encoding registry and the base class every method's config derives from.

A method is a frozen dataclass (its fields are the method's parameters, named as transformers names them) registered
under the name of its ``conf/posenc/<name>.yaml`` option file. ``apply`` patches one model instance through a
``PatchTarget`` (``lce.core.target``, implemented by ``lce.hf.patch``), which offers the three ways into a Hugging Face
model: merged ``rope_parameters``, a replaced rotary module, and its own attention computation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from lce.config import check
from lce.core.segments import SegmentLayer
from lce.registry import Registry

if TYPE_CHECKING:
    from lce.core.target import PatchTarget
    from lce.kernels.attention.spec import Segment

POSENCS: Registry = Registry("posenc")


@dataclass(frozen=True)
class PosEnc:
    """Base of position-encoding configs. Subclasses add ``name: str = "<key>"`` and their parameters.

    Every method composes with log-n query scaling (``logn: true``, see ``lce.posenc.logn``): it multiplies queries
    by ``max(1, ln(p + 1) / ln(logn_length))`` at position ``p``, after whatever else the method does.

    ``signal`` is the kind of position information a model's weights learn under the method: ``rotary`` for every
    RoPE-based method (their frequencies and positions differ, but a RoPE-trained model can be evaluated under any of
    them without training), ``alibi`` and ``none`` (NoPE). Evaluating a model under a method of another kind is
    refused unless asked for (``eval.allow_other_signals``).
    """

    signal: ClassVar[str] = "rotary"
    name: str
    logn: bool = False
    logn_length: int | None = None

    def __post_init__(self):
        check(self.logn_length is None or self.logn_length >= 2, "posenc.logn_length",
              f"must be >= 2 (the training length), got {self.logn_length}")

    def apply(self, target: PatchTarget) -> None:
        """Patch ``target.model`` in place; must only go through ``target`` so that unpatching restores it."""
        raise NotImplementedError

    def max_length(self, pretraining_length: int) -> int | None:
        """The longest input the method is designed for on a model trained on ``pretraining_length`` tokens (training
        beyond it is refused, ``lce.train.limits``); None: the method sets no bound."""
        return None


@dataclass(frozen=True)
class SegmentMethod(PosEnc):
    """A RoPE method that remaps the positions each (query, key) pair is rotated at (DCA, Self-Extend, ReRoPE,
    StreamingLLM). Its whole layer is data: ``segments(L)`` (``lce.kernels.attention.spec.Segment``) and the
    ``SegmentLayer`` fields of ``layer(L)``, which the PyTorch path (``lce.core.segments``), the fused CPU path and
    the Triton kernel all read, and that the shared kernel tests take from this registry.

    Attributes:
        block_size: query rows scored at once (a field of the methods that let it be set).
    """

    block_size: ClassVar[int] = 1024

    def segments(self, pretraining_length: int) -> tuple[Segment, ...]:
        """The segments for a model trained on ``pretraining_length`` tokens (``max_position_embeddings``)."""
        raise NotImplementedError

    def layer(self, pretraining_length: int) -> SegmentLayer:
        """Every layer's attention but its rotation, for a model trained on ``pretraining_length`` tokens."""
        return SegmentLayer(self.name, self.segments(pretraining_length), block_size=self.block_size)

    def apply(self, target: PatchTarget) -> None:
        """Compute every layer's attention as ``layer(L)`` with that layer's rotation (Gemma3's per-layer-type
        frequencies, SmolLM3's NoPE layers)."""
        layer = self.layer(int(target.config.max_position_embeddings))
        rotations = target.layer_rotations_in_attention(self.name)
        target.compute_attention(self.name,
                                 lambda index, module: dataclasses.replace(layer, rotation=rotations[index]))
