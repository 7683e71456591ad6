"""Tiny GGUF files written the way llama.cpp's ``convert_hf_to_gguf.py`` writes a Llama: a byte-level (GPT-2 style)
BPE vocabulary, float32 tensors under llama.cpp's names, Q and K rows permuted into llama.cpp's rotary layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# A byte-level BPE vocabulary: the 256 byte symbols in byte order, a few merges, then the special tokens.
MERGES = ["Ġ t", "h e", "Ġt he", "i n"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}")
NORMAL, CONTROL = 1, 3  # llama.cpp's token types


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of every byte (``openai/gpt-2: encoder.py``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def vocabulary() -> list[str]:
    spelling = bytes_to_unicode()
    return [spelling[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES] + SPECIAL


VOCAB_SIZE = len(vocabulary())
EOS_ID = VOCAB_SIZE - 1  # <|im_end|>
BOS_ID = VOCAB_SIZE - 2  # <|im_start|>


def make_source_model(seed: int = 0, tie_word_embeddings: bool = False):
    """A tiny random Llama (hidden 64, 2 layers, 4 query / 2 KV heads, head_dim 16) over ``vocabulary()``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie_word_embeddings,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: random ones show a misplaced norm
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``): each head's two rotary halves
    interleaved, as GGML's rotation pairs neighbouring dimensions."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_gguf(path: Path, model=None, architecture: str = "llama") -> Path:
    """Write ``model`` (a ``LlamaForCausalLM``; None: ``make_source_model()``) as a float32 GGUF file at ``path``.
    Only the generic writer calls (``add_uint32``, ``add_array``, ...) are used, which every gguf release has."""
    import gguf

    model = make_source_model() if model is None else model
    config = model.config
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // n_head
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_string("general.name", "tiny")
    arch = architecture
    writer.add_uint32(f"{arch}.context_length", config.max_position_embeddings)
    writer.add_uint32(f"{arch}.embedding_length", config.hidden_size)
    writer.add_uint32(f"{arch}.block_count", config.num_hidden_layers)
    writer.add_uint32(f"{arch}.feed_forward_length", config.intermediate_size)
    writer.add_uint32(f"{arch}.attention.head_count", n_head)
    writer.add_uint32(f"{arch}.attention.head_count_kv", n_kv)
    writer.add_float32(f"{arch}.rope.freq_base", float(config.rope_parameters["rope_theta"]))
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    writer.add_uint32("general.file_type", 0)  # ALL_F32
    tokens = vocabulary()
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", [CONTROL if t in SPECIAL else NORMAL for t in tokens])
    writer.add_array("tokenizer.ggml.merges", MERGES)
    writer.add_uint32("tokenizer.ggml.bos_token_id", BOS_ID)
    writer.add_uint32("tokenizer.ggml.eos_token_id", EOS_ID)
    writer.add_uint32("tokenizer.ggml.padding_token_id", tokens.index("<|endoftext|>"))
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    writer.add_string("tokenizer.chat_template", CHAT_TEMPLATE)

    def add(name: str, tensor: torch.Tensor, heads: int | None = None) -> None:
        array = tensor.detach().to(torch.float32).numpy().copy()
        writer.add_tensor(name, permute(array, heads) if heads else array)

    add("token_embd.weight", model.model.embed_tokens.weight)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        add(f"blk.{i}.attn_q.weight", attn.q_proj.weight, n_head)
        add(f"blk.{i}.attn_k.weight", attn.k_proj.weight, n_kv)
        add(f"blk.{i}.attn_v.weight", attn.v_proj.weight)
        add(f"blk.{i}.attn_output.weight", attn.o_proj.weight)
        add(f"blk.{i}.ffn_gate.weight", mlp.gate_proj.weight)
        add(f"blk.{i}.ffn_up.weight", mlp.up_proj.weight)
        add(f"blk.{i}.ffn_down.weight", mlp.down_proj.weight)
        add(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
        add(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
    add("output_norm.weight", model.model.norm.weight)
    if not config.tie_word_embeddings:
        add("output.weight", model.lm_head.weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
