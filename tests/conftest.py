"""Shared fixtures: tiny randomly initialised HF models built from configs (no downloads, HF_HUB_OFFLINE=1)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels (lce.kernels) run on CPU tensors in Triton's interpreter. The flag is read when a kernel is defined
# (triton.jit), so it is set before anything imports a kernel module; on a CUDA machine the compiled kernels run.
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test tensors are tiny: intra-op threads cost more in synchronisation than they save (and thrash on a loaded
# machine), so the suite runs single-threaded; measured 2x faster on 2 cores.
torch.set_num_threads(1)


def make_tiny_llama(seed: int = 0, **overrides):
    """A 2-layer Llama with GQA (4 query heads, 2 KV heads), head_dim 16 and a 259-token byte vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    params = {
        "vocab_size": 259, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None,
    }
    params.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**params)).eval()


@pytest.fixture
def tiny_model():
    return make_tiny_llama()


def logits(model, ids, **kwargs):
    """Model logits without autograd."""
    with torch.no_grad():
        return model(ids, **kwargs).logits


def decode_logits(model, ids, prefill: int):
    """Logits of a prefill of ``prefill`` tokens followed by token-by-token decoding with the KV cache."""
    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    return torch.cat(steps, dim=1)


def assert_decode_matches_full(model, ids, prefill: int, tol: float = 2e-5):
    """Prefill + token-by-token decoding == one full forward. The default tolerance allows fp32 reduction-order
    differences (a query attending one at a time over the cache sums the same terms in another order)."""
    torch.testing.assert_close(decode_logits(model, ids, prefill), logits(model, ids), atol=tol, rtol=tol)


def assert_checkpointed_training_step(model, ids):
    """One training step with activation checkpointing: finite loss, every parameter a finite, non-zero gradient."""
    model.train()
    model.activation_checkpointing_enable()
    model.config.use_cache = False
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def scale_queries(model, factor):
    """Multiply every layer's queries by ``factor [T]`` (per position) with a hook on ``q_proj``: an independent
    reference for log-n scaling (RoPE is linear, so scaling before or after rotation is the same)."""
    for layer in model.model.layers:
        layer.self_attn.q_proj.register_forward_hook(lambda mod, inp, out: out * factor[None, :, None])
    return model
