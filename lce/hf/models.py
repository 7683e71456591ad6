"""Models (the ``model`` config group): a tiny Llama built from a config, or any HF causal LM by name or path."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from lce.config import check, check_at_least
from lce.data.tokenizer import ByteTokenizer, HFTokenizer
from lce.errors import LceError
from lce.hf.patch import check_rotary_precision, reapply_saved_patch
from lce.registry import Registry

MODELS: Registry = Registry("model")

# Written into config.json of models that use ByteTokenizer, so a saved checkpoint reloads with the same tokenizer.
TOKENIZER_KEY = "lce_tokenizer"


class Loaded(NamedTuple):
    model: nn.Module
    tokenizer: Any


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


@MODELS.register("tiny_llama")
@dataclass(frozen=True)
class TinyLlama:
    """A small Llama (RMSNorm, SwiGLU, RoPE, GQA) with a byte vocabulary, randomly initialised from a seed.

    Sized to train at 128 tokens in minutes on 2 CPU cores. ``max_position_embeddings`` is the training context: RoPE
    scaling methods read it as the original length.
    """

    name: str = "tiny_llama"
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 128
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    attn_implementation: str = "sdpa"

    def __post_init__(self):
        check_at_least(self, "model", 1, "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "intermediate_size", "max_position_embeddings")
        check(self.hidden_size % self.num_attention_heads == 0, "model.hidden_size",
              f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        check(self.num_attention_heads % self.num_key_value_heads == 0, "model.num_key_value_heads",
              f"num_attention_heads={self.num_attention_heads} is not a multiple of {self.num_key_value_heads}")
        head_dim = self.hidden_size // self.num_attention_heads
        check(head_dim % 2 == 0, "model.hidden_size", f"head dim {head_dim} must be even for RoPE")

    def load(self, seed: int = 0) -> Loaded:
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = ByteTokenizer()
        config = LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta,
            initializer_range=self.initializer_range,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_id,
            eos_token_id=tokenizer.eos_id,
            bos_token_id=None,
            attn_implementation=self.attn_implementation,
        )
        setattr(config, TOKENIZER_KEY, tokenizer.kind)
        # Seed a private generator state: building a model must not depend on (or disturb) earlier random draws.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        return Loaded(model.eval(), tokenizer)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@MODELS.register("hf")
@dataclass(frozen=True)
class HFModel:
    """Any Hugging Face causal LM by hub id or local path, with its own tokenizer.

    ``dtype`` is passed to ``from_pretrained`` (never ``.to()`` after loading: that would cast the fp32 rotary
    frequencies). ``trust_remote_code`` stays off unless set. With ``HF_HUB_OFFLINE=1`` only local files are tried,
    and a missing model is an immediate error rather than a retry loop. A checkpoint saved by lce re-applies its
    recorded patch (``config.lce``).
    """

    name: str = "hf"
    path: str = "???"
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    tokenizer: str | None = None

    def __post_init__(self):
        check(self.path != "???", "model.path",
              "set a hub id or a local directory, e.g. model.path=meta-llama/Llama-2-7b-hf")

    def load(self, seed: int = 0) -> Loaded:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        common = {"revision": self.revision, "trust_remote_code": self.trust_remote_code,
                  "local_files_only": hub_offline()}
        where = f"model.path={self.path!r}"
        local = Path(os.path.expanduser(self.path))
        if (local.exists() or self.path.startswith((".", "/", "~"))) and not (local / "config.json").is_file():
            raise LceError(f"{where}: {local} has no config.json (not a Hugging Face model directory)")
        path = str(local) if local.exists() else self.path
        try:
            config = AutoConfig.from_pretrained(path, **common)
        except (OSError, ValueError) as e:
            hint = (" and HF_HUB_OFFLINE=1: it must be a local directory or already in the HF cache"
                    if hub_offline() else "")
            raise LceError(f"{where} could not be loaded{hint} ({str(e).splitlines()[0]})") from None
        dtype = "auto" if self.dtype == "auto" else DTYPES[self.dtype]
        kwargs = dict(config=config, dtype=dtype, **common)
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except ValueError as e:
            raise LceError(f"{where}: {str(e).splitlines()[0]}") from None
        if getattr(config, TOKENIZER_KEY, None) == ByteTokenizer.kind:
            tokenizer = ByteTokenizer()
        else:
            try:
                tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(self.tokenizer or path, **common))
            except (OSError, ValueError) as e:
                raise LceError(f"{where}: its tokenizer could not be loaded ({str(e).splitlines()[0]})") from None
        check_rotary_precision(model)
        return Loaded(reapply_saved_patch(model).eval(), tokenizer)


def load_model(spec: Any = "tiny_llama", *, seed: int = 0, **params: Any) -> Loaded:
    """Load a model and its tokenizer: ``(model, tokenizer)``.

    Args:
        spec: a registered model name (``"tiny_llama"``), a hub id or local path (loaded as ``model=hf``), a mapping
            with ``name``, a config node or a model config instance.
        seed: initialisation seed for models built from a config.
        **params: fields of the model config (e.g. ``dtype="bfloat16"``, ``hidden_size=256``).
    """
    if isinstance(spec, (str, os.PathLike)) and str(spec) not in MODELS:
        spec = {"name": "hf", "path": str(spec)}
    return MODELS.build(spec, "model", **params).load(seed=seed)


def save_model(model: nn.Module, tokenizer, path: str | Path) -> Path:
    """Save weights (safetensors), config (with the lce patch spec) and tokenizer so ``load_model(path)`` restores
    all."""
    path = Path(path)
    if isinstance(tokenizer, ByteTokenizer):
        setattr(model.config, TOKENIZER_KEY, tokenizer.kind)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save(path)
    return path
