"""Per-instance patching of Hugging Face models: ``patch``, ``unpatch`` and re-applying a saved patch.

A patch touches only the instance it is given (its config, its rotary module, its attention implementation
name), so a baseline and a patched model can live in one process. The originals are kept on the model
(``model._lce_patch``) and ``unpatch`` restores them exactly. The patch spec is written to ``config.lce`` (saved in
``config.json``) together with the original ``rope_parameters``, so ``lce.load_model(path)`` can re-apply it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from torch import nn

from lce.attention import ATTENTIONS
from lce.core.plan import (
    BIDIRECTIONAL,
    HIDDEN_STATES,
    RECURRENT_STATE,
    RESTRICTION,
    AttentionPlan,
    FusedAttention,
    LayerAttention,
    Restriction,
)
from lce.errors import ConfigError, LceError, UnsupportedModelError
from lce.hf.adapters import Adapter, adapter_for
from lce.hf.cache import partial_cache_layers
from lce.hf.dispatch import BlockwiseAttention, FunctionAttention, capture_hidden_states, capture_recurrent_state
from lce.hf.dispatch import register as register_attention
from lce.hf.rotary import NeutralRotary, keep_fp32, release_fp32, rotary_inv_freqs
from lce.kernels.rope import Rotation
from lce.posenc import POSENCS
from lce.posenc.logn import logn_scale, original_length

SPEC_VERSION = 1
#: Submodules a method attaches to attention modules (``PatchTarget.attach_parameters``) are named with this prefix.
ATTACHED_PREFIX = "lce_"


@dataclass
class PatchRecord:
    """What a patch replaced, to be put back by ``unpatch``."""

    rotary: nn.Module | None
    rope_parameters: Any
    attn_implementation: str | None


@dataclass(frozen=True)
class Claim:
    """A method's claim on one part of the attention computation (computing it, query scaling or restriction).

    Attributes:
        method: the method's name (it joins the registered attention function's name, ``lce_<method>_...``).
        owner: the method as its config names it, ``posenc=<name>`` or ``attention=<name>``, for error messages.
        value: what it installs (a per-layer ``LayerAttention`` builder, a log-n length, a per-layer restriction
            builder).
    """

    method: str
    owner: str
    value: Any


class PatchTarget:
    """The operations a position encoding or attention variant may perform on one model instance.

    Args:
        group: the config group of the method applying now (``posenc`` or ``attention``): error messages name a method
            as ``posenc=<name>`` or ``attention=<name>``. ``patch`` sets it before each group applies.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, group: Literal["posenc", "attention"] = "posenc"):
        self.model = model
        self.adapter = adapter
        self.group = group
        self._attention: Claim | None = None  # value: (layer_index, attention_module) -> LayerAttention | None
        self._q_scale: Claim | None = None  # value: the log-n training length
        self._restriction: Claim | None = None  # value: (layer_index, attention_module) -> Restriction | None
        self._rotations: list[Rotation] | None = None

    def owner(self, method: str) -> str:
        """``method`` as its config names it: ``posenc=<method>`` or ``attention=<method>``."""
        return f"{self.group}={method}"

    @property
    def config(self):
        return self.model.config

    def has_rotary(self) -> bool:
        return getattr(self.adapter.base_model(self.model), self.adapter.rotary_attr, None) is not None

    def require_rotary(self, method: str) -> nn.Module:
        """The model's rotary module; a clear error for a model without RoPE."""
        if not self.has_rotary():
            raise UnsupportedModelError(
                f"{self.owner(method)} changes rotary position embeddings, but {type(self.model).__name__} has none"
            )
        return self.adapter.rotary(self.model)

    def neutralize_rotary(self, method: str = "nope") -> None:
        """Replace the rotary module with one that makes rotation an exact identity."""
        self.adapter.set_rotary(self.model, NeutralRotary(self.require_rotary(method)).to(_device(self.model)))

    def set_rope_parameters(self, method: str, **override: Any) -> None:
        """Merge ``override`` into the model's original ``rope_parameters`` and rebuild its rotary module.

        Merging keeps ``rope_theta`` and any other original key (an override without it breaks from_pretrained).
        Families with one rotation per layer type (Gemma3) merge it into the layer types the adapter extends
        (``RotarySlot.extended``: Gemma3's full-attention layers).
        """
        self.require_rotary(method)
        original = copy.deepcopy(self.model._lce_original_rope_parameters)
        try:
            merged = self.adapter.merge_rope_parameters(self.model, original, override)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{self.owner(method)}: {e}") from None
        self.model.config.rope_parameters = merged
        self.adapter.set_rotary(self.model, self.adapter.build_rotary(self.model))

    def replace_rotary(self, method: str, build: Callable[[nn.Module], nn.Module]) -> None:
        """Replace the rotary module with ``build(current_rotary_module)``.

        ``build`` receives a plain rotary module (``inv_freq``, ``attention_scaling``, ``forward(x, position_ids)``);
        for families with one rotation per layer type it is called once per extended layer type.
        """
        self.require_rotary(method)
        self.adapter.set_rotary(self.model, self.adapter.replaced_rotary(self.model, build).to(_device(self.model)))

    def rotate_in_attention(self, method: str, layer: int | None = None) -> Rotation:
        """Make the model's rotary embedding an identity and return it as a ``Rotation`` for attention to apply.

        May be called again (e.g. once per layer from ``attention_for_layer``): the rotations are taken once, before the
        rotary module is neutralised.

        Args:
            method: the calling method's name, for error messages.
            layer: the decoder layer whose rotation to return. Needed for families whose layers do not all rotate
                alike (Gemma3's per-layer-type frequencies, SmolLM3's NoPE layers, whose rotation is the identity).

        Raises:
            UnsupportedModelError: ``layer`` is None but the layers rotate differently, or the rotation depends on
                the sequence length (dynamic NTK, LongRoPE).
        """
        self.require_rotary(method)
        if self._rotations is None:
            try:
                rotations = self.adapter.layer_rotations(self.model)
            except UnsupportedModelError as e:
                raise UnsupportedModelError(f"{self.owner(method)}: {e}") from None
            if layer is None:
                _same_rotation(rotations, self.adapter, self.owner(method))
            self._rotations = rotations
            self.neutralize_rotary(method)
        if layer is None:
            return _same_rotation(self._rotations, self.adapter, self.owner(method))
        return self._rotations[layer]

    def layer_rotations_in_attention(self, method: str) -> list[Rotation]:
        """``rotate_in_attention(method, layer=i)`` for every decoder layer, for methods that build each layer's
        attention from that layer's rotation (Gemma3's per-layer-type frequencies, SmolLM3's NoPE layers)."""
        return [self.rotate_in_attention(method, layer=index) for index in range(self.config.num_hidden_layers)]

    def compute_attention(self, method: str,
                          attention_for_layer: Callable[[int, nn.Module], LayerAttention | None]) -> None:
        """Compute attention in layer ``i`` with ``attention_for_layer(i, attention_module)`` (a
        ``lce.core.plan.LayerAttention``; None keeps that layer's own attention).

        One per model: two methods that both need to own the attention computation do not compose. What each
        layer's computation declares it handles (``LayerAttention.handles``) is checked when the model is patched
        (``finalize``): a model whose attention needs more (soft-capping, bidirectional attention), a restriction it
        would ignore, or a recurrent state over layers whose KV cache keeps only a window is refused rather than
        computed wrongly.
        """
        if self._attention is not None:
            raise LceError(f"{self.owner(method)} and {self._attention.owner} both replace the attention computation; "
                           "they cannot be combined")
        self._attention = Claim(method, self.owner(method), attention_for_layer)

    def use_kernel(self, method: str, kernel_for_layer: Callable, handles: Collection[str] = (),
                   fused_for_layer: Callable[[int, nn.Module], FusedAttention | None] | None = None) -> None:
        """Deprecated: ``compute_attention`` with a ``LayerAttention`` per layer. ``kernel_for_layer(i, module)``
        returns a function ``(module, query, key, value, attention_mask, scaling, dropout, q_pos, k_pos,
        **kwargs)`` handling ``handles``; ``fused_for_layer(i, module)`` its ``FusedAttention``."""
        warnings.warn("PatchTarget.use_kernel is deprecated; use compute_attention with a LayerAttention per layer "
                      "(lce.core.plan)", DeprecationWarning, stacklevel=2)

        def attention_for_layer(index: int, module: nn.Module) -> LayerAttention | None:
            function = kernel_for_layer(index, module)
            if function is None:
                return None
            fused = fused_for_layer(index, module) if fused_for_layer else None
            return FunctionAttention(function, frozenset(handles), fused)

        self.compute_attention(method, attention_for_layer)

    def attach_parameters(self, method: str, build: Callable[[int, nn.Module], nn.Module | None]) -> None:
        """Give layer ``i``'s attention module the new parameters ``build(i, attention_module)`` returns (None: none),
        as its submodule ``lce_<method>``: trained with the model, saved in its state dict (``lce.save_model``) and
        restored by ``lce.load_model`` (``restore_attached_parameters``); ``unpatch`` removes them."""
        for index, module in enumerate(self.adapter.attention_modules(self.model)):
            extra = build(index, module)
            if extra is not None:
                module.add_module(ATTACHED_PREFIX + method, extra)

    def scale_queries(self, method: str, logn_length: int) -> None:
        """Multiply each query at position ``p`` by ``max(1, ln(p + 1) / ln(logn_length))`` before attention (log-n
        scaling, ``lce.posenc.logn``)."""
        if self._q_scale is not None:
            raise LceError(f"{self.owner(method)} and {self._q_scale.owner} both scale queries; they cannot be "
                           "combined")
        self._q_scale = Claim(method, self.owner(method), logn_length)

    def restrict(self, method: str, restriction_for_layer: Callable[[int, nn.Module], Restriction | None]) -> None:
        """Let each query of layer ``i`` attend only the pairs ``restriction_for_layer(i, attention_module)`` makes
        visible (``lce.core.plan.Restriction``); a layer that gets None keeps its attention unchanged.

        Composes with the position encoding: its attention computation (``compute_attention``) receives the
        restriction as ``visible=`` and must declare that it handles ``RESTRICTION``, or ``finalize`` refuses the
        combination; without one, lce's block-wise attention (``lce.core.blockwise``) computes the restricted layers
        from the rotated queries and keys.

        Raises:
            UnsupportedModelError: the model's attention is bidirectional (the restrictions are causal).
            LceError: another method already restricts attention.
        """
        if BIDIRECTIONAL in self.adapter.attention_features(self.model):
            raise UnsupportedModelError(
                f"{self.owner(method)} restricts causal attention, but {self.adapter.family} attention is "
                "bidirectional"
            )
        if self._restriction is not None:
            raise LceError(f"{self.owner(method)} and {self._restriction.owner} both restrict attention; they cannot "
                           "be combined")
        self._restriction = Claim(method, self.owner(method), restriction_for_layer)

    def finalize(self) -> None:
        """Route attention through lce's function if any method asked to compute it, scale queries or restrict it.

        Raises:
            UnsupportedModelError: a layer's computation does not handle what the model's attention needs.
            LceError: a layer is restricted but its computation does not honour restrictions.
        """
        if self._attention is None and self._q_scale is None and self._restriction is None:
            return
        names = [claim.method for claim in (self._attention, self._q_scale, self._restriction) if claim is not None]
        logn_length = self._q_scale.value if self._q_scale else None
        q_scale = logn_scale(logn_length) if logn_length else None
        stateful = []
        for index, module in enumerate(self.adapter.attention_modules(self.model)):
            attention, fused = self._layer_attention(index, module)
            restriction = self._restriction.value(index, module) if self._restriction else None
            if restriction is not None:
                if self._attention is None:
                    attention = BlockwiseAttention(attention)
                elif RESTRICTION not in attention.handles:
                    raise LceError(
                        f"{self._restriction.owner} restricts which keys each query sees, but the attention "
                        f"computation of {self._attention.owner} does not honour restrictions, so it would attend to "
                        "every key; the two cannot be combined (those that honour restrictions: lce's block-wise "
                        "attention for rotary encodings such as rope/pi/yarn, alibi, and the segment methods dca, "
                        "self_extend, rerope)"
                    )
            hooks = []  # removed by unpatch
            if attention is not None and RECURRENT_STATE in attention.handles:
                stateful.append(index)
                hooks.append(functools.partial(capture_recurrent_state, index))
            if attention is not None and HIDDEN_STATES in attention.handles:
                hooks.append(capture_hidden_states)
            if hooks and not getattr(module, "lce_hooks", None):
                module.lce_hooks = [module.register_forward_pre_hook(hook, with_kwargs=True) for hook in hooks]
            module.lce_plan = AttentionPlan(attention=attention, q_scale=q_scale, restriction=restriction,
                                            logn_length=logn_length, fused=fused)
        self._refuse_windowed_cache(stateful)
        self.model.set_attn_implementation(register_attention("lce_" + "_".join(names)))

    def _layer_attention(self, index: int, module: nn.Module) -> tuple[LayerAttention | None, FusedAttention | None]:
        """Layer ``index``'s computation and its fused form: the claiming method's, checked against what the model's
        attention needs, or the model's own (fusable unless the family needs its eager attention: soft-capping)."""
        if self._attention is None:
            native = self.adapter.native_attention(self.model)
            return native, FusedAttention() if native is None else None
        attention = self._attention.value(index, module)
        if attention is None:
            return None, None
        missing = sorted(self.adapter.attention_features(self.model) - attention.handles - {RESTRICTION})
        if missing:
            raise UnsupportedModelError(
                f"{self._attention.owner} replaces the attention computation, but {self.adapter.family} attention "
                f"needs {', '.join(missing)}, which it does not handle"
            )
        return attention, attention.fused()

    def _refuse_windowed_cache(self, layers: list[int]) -> None:
        """A recurrent state covers every past token; a layer whose KV cache keeps only a window could not decode."""
        windowed = partial_cache_layers(self.config, layers) if layers else []
        if windowed:
            _, kind, kw = windowed[0]
            window = ", ".join(f"{key}={value}" for key, value in kw.items())
            raise UnsupportedModelError(
                f"{self._attention.owner} attends to every past token, but {self.adapter.family} layers "
                f"{[i for i, _, _ in windowed]} are {kind} layers ({window}): transformers' KV cache keeps only "
                "their window, so decoding could not see older tokens. Load the model with sliding_window=None, or "
                "leave those layers out with attention.layers"
            )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _same_rotation(rotations: list[Rotation], adapter: Adapter, owner: str) -> Rotation:
    """The one rotation every layer applies; a clear error (naming ``owner``, e.g. ``posenc=dca``) when layers
    rotate differently."""
    first = rotations[0]
    for index, rotation in enumerate(rotations):
        if (rotation.style, rotation.attention_scaling) != (first.style, first.attention_scaling) or not torch.equal(
                rotation.inv_freq, first.inv_freq):
            raise UnsupportedModelError(
                f"{owner} rotates every layer alike, but {adapter.family} layers 0 and {index} rotate "
                "differently (per-layer-type frequencies or NoPE layers); take each layer's rotation with "
                "rotate_in_attention(method, layer=index)"
            )
    return first


def _spec(posenc, attention) -> dict:
    return {
        "version": SPEC_VERSION,
        "posenc": dataclasses.asdict(posenc),
        "attention": dataclasses.asdict(attention),
    }


def patch(model: nn.Module, posenc: Any = "rope", attention: Any = None, **params: Any) -> nn.Module:
    """Patch ``model`` in place with a position encoding (and optionally an attention variant); returns it.

    Args:
        model: a Hugging Face causal LM of a supported family.
        posenc: a registered name (``"nope"``), a mapping with ``name``, a config node, or a config instance.
        attention: the same for an attention variant; ``None`` keeps the model's attention (``"full"``).
        **params: parameters of the position encoding, overriding those in ``posenc``.

    A model that is already patched is unpatched first: patches replace each other, they never stack. The patched
    model's rotary frequencies stay float32 through any later cast (``model.half()``, ``.to(torch.bfloat16)``;
    ``lce.hf.rotary.keep_fp32``), as ``from_pretrained(dtype=...)`` keeps them; ``unpatch`` removes that guard.

    Raises:
        UnsupportedModelError: ``model`` is not a Hugging Face model of a supported family.
        ConfigError: a bad method config, or the model's ``rope_parameters`` hold an unusable ``rope_theta``.
        LceError: the model's rotary frequencies were already cast below float32, or the methods do not combine.
    """
    adapter = adapter_for(model)
    pe = POSENCS.build(posenc, **params)
    att = ATTENTIONS.build(attention if attention is not None else "full")
    if getattr(model, "_lce_patch", None) is not None:
        unpatch(model)
    check_rope_theta(model)
    check_rotary_precision(model)  # before any method takes its frequencies (rotate-in-attention copies them)
    target = PatchTarget(model, adapter, group="posenc")
    model._lce_original_rope_parameters = copy.deepcopy(getattr(model.config, "rope_parameters", None))
    record = PatchRecord(
        rotary=adapter.rotary(model) if target.has_rotary() else None,
        rope_parameters=copy.deepcopy(getattr(model.config, "rope_parameters", None)),
        attn_implementation=model.config._attn_implementation,
    )
    try:
        pe.apply(target)
        if pe.logn:
            target.scale_queries("logn", pe.logn_length or original_length(model.config))
        target.group = "attention"
        att.apply(target)
        target.finalize()
    except Exception:
        _restore(model, adapter, record)
        del model._lce_original_rope_parameters
        raise
    model._lce_patch = record
    model.config.lce = {**_spec(pe, att), "rope_parameters": copy.deepcopy(record.rope_parameters)}
    if target.has_rotary():
        keep_fp32(adapter.rotary(model))
    return model


def _restore(model: nn.Module, adapter: Adapter, record: PatchRecord) -> None:
    for module in adapter.attention_modules(model):
        if hasattr(module, "lce_plan"):
            del module.lce_plan
        for handle in getattr(module, "lce_hooks", ()):
            handle.remove()
        if hasattr(module, "lce_hooks"):
            del module.lce_hooks
        for name in [name for name in module._modules if name.startswith(ATTACHED_PREFIX)]:
            delattr(module, name)
    if PatchTarget(model, adapter).has_rotary():
        release_fp32(adapter.rotary(model))
    if record.rotary is not None:
        adapter.set_rotary(model, release_fp32(record.rotary).to(_device(model)))
    if record.rope_parameters is not None:
        model.config.rope_parameters = copy.deepcopy(record.rope_parameters)
    if model.config._attn_implementation != record.attn_implementation:
        model.set_attn_implementation(record.attn_implementation)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: the original rotary module, ``rope_parameters`` and attention implementation come back."""
    record = getattr(model, "_lce_patch", None)
    if record is None:
        raise LceError(f"{type(model).__name__} is not patched by lce")
    _restore(model, adapter_for(model), record)
    del model._lce_patch, model._lce_original_rope_parameters
    if hasattr(model.config, "lce"):
        del model.config.lce
    return model


def patch_spec(model: nn.Module) -> dict | None:
    """The lce patch recorded in ``model.config`` (after ``patch`` or loading a patched checkpoint), or None."""
    spec = getattr(model.config, "lce", None)
    return copy.deepcopy(spec) if spec else None


def reapply_saved_patch(model: nn.Module) -> nn.Module:
    """Re-apply the patch a loaded checkpoint records in ``config.lce`` (``_attn_implementation`` is not saved)."""
    spec = patch_spec(model)
    if spec is None:
        return model
    if spec.get("version") != SPEC_VERSION:
        raise LceError(f"config.lce has spec version {spec.get('version')!r}; this lce reads version {SPEC_VERSION}")
    saved_original = spec.get("rope_parameters")
    if saved_original is not None and saved_original != model.config.rope_parameters:
        # Frequency methods saved their merged rope_parameters; patch again from the original, not on top of it.
        model.config.rope_parameters = saved_original
        adapter = adapter_for(model)
        adapter.set_rotary(model, adapter.build_rotary(model))
    del model.config.lce
    return patch(model, spec["posenc"], attention=spec["attention"])


def attached_parameter_names(model: nn.Module) -> list[str]:
    """The state-dict names of the parameters and buffers patches attached (``PatchTarget.attach_parameters``)."""
    marker = "." + ATTACHED_PREFIX
    return [name for name in model.state_dict() if marker in name]


def restore_attached_parameters(model: nn.Module, directory: str | Path, where: str) -> None:
    """Load the attached parameters of a re-applied patch from the safetensors files of checkpoint ``directory``
    (transformers drops them on loading: its model classes do not have them).

    Raises:
        LceError: the checkpoint lacks some of them (it was saved before the patch attached them).
    """
    names = set(attached_parameter_names(model))
    if not names:
        return
    found = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            stored = set(weights.keys())
            found.update({key: weights.get_tensor(key) for key in names & stored})
    missing = sorted(names - found.keys())
    if missing:
        raise LceError(f"{where}: the checkpoint's config records {model.config.lce['attention']['name']!r}, whose "
                       f"parameters are missing from its weights ({missing[0]} and {len(missing) - 1} more); save "
                       "patched models with lce.save_model")
    model.load_state_dict(found, strict=False)


def check_rope_theta(model: nn.Module) -> None:
    """Every ``rope_theta`` in ``model.config.rope_parameters`` (one per layer type where they nest) must be a finite
    number > 0: RoPE's frequencies are ``rope_theta ** (-2i / d)``, NaN for a negative base, and a model with them
    trains and evaluates on NaN without complaint.

    Raises:
        ConfigError: naming ``config.rope_parameters`` (and the layer type) and the bad value.
    """
    params = getattr(model.config, "rope_parameters", None)
    if not isinstance(params, dict):
        return
    nested = {f"[{key!r}]": value for key, value in params.items() if isinstance(value, dict)}
    for where, values in {"": params, **nested}.items():
        theta = values.get("rope_theta")
        if theta is None:
            continue
        try:
            value = math.nan if isinstance(theta, bool) else float(theta)
        except (TypeError, ValueError):
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(
                f"config.rope_parameters{where}: rope_theta={theta!r} must be a finite number > 0 (RoPE's base, "
                f"e.g. 10000.0); fix rope_theta in the model's config.json ({type(model).__name__})"
            )


def check_rotary_precision(model: nn.Module) -> None:
    """Rotary frequencies must be fp32 when lce patches or loads a model: a bf16 ``inv_freq`` destroys position
    information at long lengths (and methods that rotate inside attention would copy the damaged frequencies)."""
    adapter = adapter_for(model)
    if not PatchTarget(model, adapter).has_rotary():
        return
    for name, inv_freq in rotary_inv_freqs(adapter.rotary(model)).items():
        if inv_freq.dtype != torch.float32:
            raise LceError(
                f"rotary {name} is {inv_freq.dtype}, not float32: the model was cast with .to()/.half() before lce "
                "patched it; load it with lce.load_model(..., dtype=...) or from_pretrained(dtype=...), or cast it "
                "after lce.patch (a patched model's rotary frequencies stay float32)"
            )
