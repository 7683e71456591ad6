"""One small adapter per model family: the only place that knows where transformers keeps things.

An adapter says where a family's rotary module and attention modules live, how its rotation pairs dimensions and how
wide it is, which decoder layers rotate with which frequencies ("rotary slots"), what its attention function must do
beyond softmax attention (logit soft-capping), and how its logits are formed from the final hidden states (some
families scale or soft-cap them). Everything else in lce goes through ``adapter_for(model)``; an unsupported family
is a clear error listing the supported ones.

Facts read from transformers 5.23 ``models/<family>/modeling_<family>.py``:

- Every supported family keeps one rotary module at ``model.base_model.rotary_emb`` and passes its ``(cos, sin)`` to
  every decoder layer; attention functions receive ``position_ids`` (and ``sliding_window``, ``softcap`` where the
  family has them) in ``**kwargs``. Sliding windows reach attention functions through the mask.
- Gemma3 (``gemma3_text``) holds one rotation per layer type in that module (``{layer_type}_inv_freq``, called as
  ``rotary_emb(x, position_ids, layer_type)``) and nests ``rope_parameters`` by layer type; local
  (``sliding_attention``) layers use a lower base. Its attention does not pass ``attn_logit_softcapping`` on.
- SmolLM3 skips rotation in the layers where ``config.no_rope_layers[i] == 0`` (NoPE layers).
- Partial rotary (GPT-NeoX ``rotary_pct``, StableLM, Phi-3/4 ``partial_rotary_factor``) is the width of
  ``inv_freq``: ``apply_rotary_pos_emb`` rotates the first ``cos.shape[-1]`` dims. Cohere pairs ``x[2i], x[2i+1]``.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lce.core.plan import BIDIRECTIONAL, SOFTCAP
from lce.errors import UnsupportedModelError
from lce.hf.dispatch import EagerAttention
from lce.hf.rotary import LayerTypeRotary, LayerTypeView
from lce.kernels.cross_entropy.head import LogitHead
from lce.kernels.rope import Rotation

#: The rotation of a layer that does not rotate (SmolLM3's NoPE layers): zero rotated dims.
NO_ROTATION = Rotation(torch.zeros(0))

#: Rope types whose frequencies transformers recomputes from the sequence length in every forward.
STATEFUL_ROPE_TYPES = ("dynamic", "longrope")


@dataclass(frozen=True)
class RotarySlot:
    """One set of rotary frequencies and the decoder layers that rotate with it.

    Attributes:
        key: the layer type the frequencies belong to (Gemma3), or None for a family's single rotation.
        layers: indices of the decoder layers that rotate with it (NoPE layers belong to no slot).
        extended: whether position-extension methods (``set_rope_parameters``, ``replace_rotary``) change it.
    """

    key: str | None
    layers: tuple[int, ...]
    extended: bool = True


@dataclass(frozen=True)
class Adapter:
    """Transformers internals of one model family (decoder-only causal LMs with one shared rotary module).

    Attributes:
        family: ``config.model_type``.
        rotary_attr: the rotary module's attribute on the base model.
        attention_attr: the self-attention module's attribute on each decoder layer.
        rotary_style: ``half`` (Llama's ``rotate_half``) or ``interleaved`` (Cohere).
        logit_scale: attribute of the causal-LM module its logits are multiplied by (Cohere ``logit_scale``).
        logit_divisor: config key its logits are divided by (Granite ``logits_scaling``).
        final_softcap: config key of the final logit soft-cap ``c * tanh(logits / c)`` (Gemma2/3).
        attention_softcap: config key of the attention-logit soft-cap the family passes to its attention function as
            ``softcap`` (Gemma2).
        rope_layer_flags: config key of a per-layer 0/1 list, 0 = the layer skips rotation (SmolLM3 ``no_rope_layers``).
    """

    family: str
    rotary_attr: str = "rotary_emb"
    attention_attr: str = "self_attn"
    rotary_style: Literal["half", "interleaved"] = "half"
    logit_scale: str | None = None
    logit_divisor: str | None = None
    final_softcap: str | None = None
    attention_softcap: str | None = None
    rope_layer_flags: str | None = None

    def base_model(self, model: nn.Module) -> nn.Module:
        return model.base_model

    def layers(self, model: nn.Module) -> list[nn.Module]:
        """The decoder layers, in order."""
        return list(self.base_model(model).layers)[: model.config.num_hidden_layers]

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The self-attention module of every decoder layer, in layer order."""
        return [getattr(layer, self.attention_attr) for layer in self.layers(model)]

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

    def rope_layers(self, model: nn.Module) -> tuple[int, ...]:
        """Indices of the decoder layers that apply the rotary embedding."""
        n = model.config.num_hidden_layers
        if self.rope_layer_flags is None:
            return tuple(range(n))
        flags = getattr(model.config, self.rope_layer_flags)
        return tuple(i for i in range(n) if flags[i])

    def slots(self, model: nn.Module) -> list[RotarySlot]:
        """The model's sets of rotary frequencies and the layers each serves."""
        return [RotarySlot(None, self.rope_layers(model))]

    def slot_rotary(self, rotary: nn.Module, key: str | None) -> nn.Module:
        """Slot ``key`` of ``rotary`` as a plain rotary module (``inv_freq``, ``forward(x, position_ids)``)."""
        return rotary

    def replaced_rotary(self, model: nn.Module, build) -> nn.Module:
        """The rotary module after ``build(plain_rotary) -> module`` replaced every extended slot."""
        return build(self.rotary(model))

    def merge_rope_parameters(self, model: nn.Module, original: Any, override: dict) -> dict:
        """``rope_parameters`` with ``override`` merged into those of every extended slot (originals kept).

        Raises:
            UnsupportedModelError: the family's config rejects the result (Phi-3 accepts only ``longrope``; YaRN
                needs ``original_max_position_embeddings``): a checkpoint saved with it would not reload.
        """
        merged = self._merge(model, original, override)
        config = copy.deepcopy(model.config)
        config.rope_parameters = merged
        try:
            if hasattr(config, "validate_rope"):
                config.validate_rope()
        except (ValueError, KeyError, TypeError) as e:
            raise UnsupportedModelError(f"{self.family} config rejects rope_parameters {merged} ({e}); a checkpoint "
                                        "saved with them would not reload") from None
        return merged

    def _merge(self, model: nn.Module, original: Any, override: dict) -> dict:
        return {**original, **override}

    def rotation(self, rotary: nn.Module) -> Rotation:
        """The rotation a plain rotary module applies now, as a position-agnostic ``Rotation``."""
        inv_freq = rotary.inv_freq.detach().float().clone()
        return Rotation(inv_freq, float(getattr(rotary, "attention_scaling", 1.0)), self.rotary_style)

    def layer_rotations(self, model: nn.Module) -> list[Rotation]:
        """The rotation of every decoder layer (``NO_ROTATION`` for layers that do not rotate).

        Raises:
            UnsupportedModelError: for rope types whose frequencies depend on the current sequence length
                (``dynamic``, ``longrope``): one fixed ``Rotation`` per layer cannot reproduce them.
        """
        rotary = self.rotary(model)
        rotations = [NO_ROTATION] * model.config.num_hidden_layers
        for slot in self.slots(model):
            plain = self.slot_rotary(rotary, slot.key)
            rope_type = str(getattr(plain, "rope_type", "default"))
            if any(kind in rope_type for kind in STATEFUL_ROPE_TYPES):
                raise UnsupportedModelError(
                    f"{self.family}: rope_type '{rope_type}' recomputes its frequencies from the sequence length in "
                    "every forward, so it cannot be applied as one fixed rotation inside attention"
                )
            rotation = self.rotation(plain)
            for index in slot.layers:
                rotations[index] = rotation
        return rotations

    def rotary_dim(self, model: nn.Module) -> int:
        """Width of the rotated part of each head (head_dim, or less under partial rotary)."""
        slot = self.slots(model)[0]
        return 2 * self.slot_rotary(self.rotary(model), slot.key).inv_freq.numel()

    def attention_features(self, model: nn.Module) -> frozenset[str]:
        """What the family's attention does beyond causal softmax attention, which a replacement computation must do
        too.

        ``softcap``: attention logits are soft-capped (``kwargs["softcap"]``); ``bidirectional``: no causal mask.
        """
        features = set()
        if self.attention_softcap and getattr(model.config, self.attention_softcap, None) is not None:
            features.add(SOFTCAP)
        if getattr(model.config, "use_bidirectional_attention", False):
            features.add(BIDIRECTIONAL)
        return frozenset(features)

    def native_attention(self, model: nn.Module) -> EagerAttention | None:
        """What lce's attention function runs when no method replaces attention: None (transformers' SDPA), or the
        family's own eager attention where SDPA cannot reproduce it (attention-logit soft-capping)."""
        if SOFTCAP not in self.attention_features(model):
            return None
        return EagerAttention(sys.modules[type(self.attention_modules(model)[0]).__module__].eager_attention_forward)

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states ``[..., C] -> [..., V]``, exactly as the family's forward forms them."""
        logits = model.get_output_embeddings()(hidden)
        if self.logit_scale is not None:
            logits = logits * getattr(model, self.logit_scale)
        if self.logit_divisor is not None:
            logits = logits / getattr(model.config, self.logit_divisor)
        cap = getattr(model.config, self.final_softcap, None) if self.final_softcap else None
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def logit_head(self, model: nn.Module) -> LogitHead | None:
        """The logits of ``logits()`` as data, for the fused cross-entropy (``lce.kernels.cross_entropy``): the output
        layer's weight and bias (the model's parameters themselves), the scale (Cohere) or divisor (Granite) as one
        multiplier, and the final soft-cap (Gemma2/3).

        None when the output layer is not exactly an ``nn.Linear`` run as written (quantised or LoRA-wrapped layers,
        forward hooks, accelerate's offloading hooks, weights on the meta device) or the scale is not a plain number:
        callers then keep the generic ``logits()`` path.
        """
        linear = model.get_output_embeddings()
        if (type(linear) is not nn.Linear or linear._forward_hooks or linear._forward_pre_hooks
                or hasattr(linear, "_hf_hook") or linear.weight.is_meta):
            return None
        multiplier = 1.0
        if self.logit_scale is not None:
            scale = getattr(model, self.logit_scale)
            if not isinstance(scale, (int, float)):
                return None
            multiplier *= scale
        if self.logit_divisor is not None:
            multiplier /= getattr(model.config, self.logit_divisor)
        cap = getattr(model.config, self.final_softcap, None) if self.final_softcap else None
        return LogitHead(linear.weight, linear.bias, float(multiplier), None if cap is None else float(cap))


@dataclass(frozen=True)
class LayerTypeAdapter(Adapter):
    """A family whose rotary module holds one rotation per layer type (Gemma3).

    ``config.rope_parameters`` is ``{layer_type: {...}}``. Position-extension methods change the layer types in
    ``extended_layer_types`` (Gemma3's full-attention layers, as its own long-context checkpoints scale only those:
    local layers never see a distance beyond their sliding window); all layer types if the model has none of them.

    Attributes:
        extended_layer_types: layer types that position-extension methods change.
    """

    extended_layer_types: tuple[str, ...] = ("full_attention",)

    def slots(self, model: nn.Module) -> list[RotarySlot]:
        layer_types = list(model.config.layer_types[: model.config.num_hidden_layers])
        rope = model.config.rope_parameters
        keys = [key for key in sorted(set(layer_types)) if rope.get(key) is not None]
        extend_all = not any(key in self.extended_layer_types for key in keys)
        return [
            RotarySlot(key, tuple(i for i, t in enumerate(layer_types) if t == key),
                       extend_all or key in self.extended_layer_types)
            for key in keys
        ]

    def slot_rotary(self, rotary: nn.Module, key: str | None) -> nn.Module:
        if isinstance(rotary, LayerTypeRotary):
            return rotary.slots[key]
        if key is None:
            raise UnsupportedModelError(f"{self.family} keeps one rotation per layer type; name the layer type")
        return LayerTypeView(rotary, key)

    def rotation(self, rotary: nn.Module) -> Rotation:
        if not hasattr(rotary, "inv_freq"):
            raise UnsupportedModelError(
                f"{self.family} keeps one rotation per layer type in {type(rotary).__name__}; take the rotation of a "
                "layer type (Adapter.slot_rotary) or of a layer (Adapter.layer_rotations)"
            )
        return super().rotation(rotary)

    def replaced_rotary(self, model: nn.Module, build) -> nn.Module:
        rotary = self.rotary(model)
        return LayerTypeRotary({
            slot.key: build(self.slot_rotary(rotary, slot.key)) if slot.extended else self.slot_rotary(rotary, slot.key)
            for slot in self.slots(model)
        })

    def _merge(self, model: nn.Module, original: Any, override: dict) -> dict:
        merged = copy.deepcopy(original)
        for slot in self.slots(model):
            if slot.extended:
                merged[slot.key] = {**merged[slot.key], **override}
        return merged


def _adapters(*adapters: Adapter) -> dict[str, Adapter]:
    return {adapter.family: adapter for adapter in adapters}


ADAPTERS: dict[str, Adapter] = _adapters(
    Adapter("llama"),
    Adapter("mistral"),
    Adapter("qwen2"),
    Adapter("qwen3"),
    Adapter("gemma"),
    Adapter("gemma2", final_softcap="final_logit_softcapping", attention_softcap="attn_logit_softcapping"),
    LayerTypeAdapter("gemma3_text", final_softcap="final_logit_softcapping"),
    Adapter("phi3"),
    Adapter("gpt_neox", attention_attr="attention"),
    Adapter("cohere", rotary_style="interleaved", logit_scale="logit_scale"),
    Adapter("olmo2"),
    Adapter("stablelm"),
    Adapter("starcoder2"),
    Adapter("granite", logit_divisor="logits_scaling"),
    Adapter("smollm3", rope_layer_flags="no_rope_layers"),
)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s family (its ``config.model_type``).

    Raises:
        UnsupportedModelError: ``model`` is not a transformers ``PreTrainedModel`` (an adapter reads transformers'
            module layout, which a look-alike with a ``config`` need not have), or its family has no adapter.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        kind = type(model)
        config = getattr(model, "config", None)
        has = f" (it has a .config of model_type {getattr(config, 'model_type', None)!r})" if config is not None else ""
        raise UnsupportedModelError(
            f"got a {kind.__module__}.{kind.__qualname__}{has}, not a Hugging Face transformers model: lce patches "
            "PreTrainedModel instances (from lce.load_model or AutoModelForCausalLM.from_pretrained) of the "
            f"families {', '.join(ADAPTERS)}"
        )
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"model family '{model_type}' ({type(model).__name__}) is not supported; "
            f"supported families: {', '.join(ADAPTERS)}"
        )
    return ADAPTERS[model_type]
