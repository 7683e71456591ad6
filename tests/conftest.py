"""Shared fixtures: tiny randomly initialised HF models built from configs (no downloads, HF_HUB_OFFLINE=1)."""

import copy
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


def _interpreter_scalars_as_numpy_24_wants() -> None:
    """Triton before 3.9: its interpreter turns a runtime scalar (a shape-(1,) array) into a Python int with
    ``int(array)``, which NumPy 2.4 refuses for arrays of ndim > 0, so every ``range()`` over a loaded bound fails
    (``TypeError: only 0-dimensional arrays can be converted``). Triton 3.9 squeezes first; this does the same on
    older releases (lce supports Triton >= 3.3; the H200 image has 3.6). Test-only: compiled kernels are unaffected."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "lce_squeezes", False):
        return

    def index(self):
        return int(self.handle.data.squeeze())

    def patch_with_squeeze(tensor, *scope):  # Triton 3.6 passes a patch scope, 3.3 patches the class directly
        patch(tensor, *scope)
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    patch_with_squeeze.lce_squeezes = True
    interpreter._patch_lang_tensor = patch_with_squeeze


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _interpreter_scalars_as_numpy_24_wants()

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


def forward_cached(model, ids, cache=None, **kwargs):
    """One forward with the KV cache ``cache`` (None: a new one), passed and read back under the name this
    transformers uses (``lce.hf.cache``): ``(output, cache)``."""
    from lce.hf.cache import cache_keyword, returned_cache

    if cache is not None:
        kwargs[cache_keyword(model)] = cache
    out = model(ids, use_cache=True, **kwargs)
    return out, returned_cache(out)


def decode_logits(model, ids, prefill: int):
    """Logits of a prefill of ``prefill`` tokens followed by token-by-token decoding with the KV cache."""
    with torch.no_grad():
        out, cache = forward_cached(model, ids[:, :prefill])
        steps = [out.logits]
        for t in range(prefill, ids.shape[1]):
            out, cache = forward_cached(model, ids[:, t : t + 1], cache)
            steps.append(out.logits)
    return torch.cat(steps, dim=1)


def fp64_logits(model, ids, **kwargs):
    """Logits of a float64 copy of ``model`` (same weights, same patch; rotary frequencies stay fp32 as transformers
    computes the angles in fp32 anyway): the reference the fp32 model's own rounding error is measured against."""
    return logits(copy.deepcopy(model).double(), ids, **kwargs)


# How much larger than the fp32 model's own error an fp32 result computed another way may be. FlashAttention's rule
# ("at most 2x the error of plain PyTorch in the same dtype"), with room for the two rounding paths (another summation
# order, decoding over a cache) adding their errors: the stock fp32 forward's error against fp64 plus another path's
# error of the same size is 2x, and the maximum over a few thousand logits fluctuates between runs and CPUs.
REFERENCE_ERROR_MULTIPLE = 3.0


def assert_close_to_reference(actual, expected_fp32, expected_fp64, multiple: float = REFERENCE_ERROR_MULTIPLE):
    """``actual`` (fp32, computed another way: lce's kernel, decoding over a cache) is as close to the float64
    reference ``expected_fp64`` as the fp32 computation it stands for (``expected_fp32``, same inputs) is: its largest
    error is at most ``multiple`` times that computation's largest error, plus one fp32 ulp of the largest reference
    value (the floor for a computation exact in fp32). A model-level tolerance relative to the error of the same
    computation in the same dtype, not a fixed number that a faster or slower CPU kernel crosses."""
    reference = expected_fp64.to(torch.float64)
    own = (expected_fp32.to(torch.float64) - reference).abs().max().item()
    floor = torch.finfo(torch.float32).eps * reference.abs().max().item()
    error = (actual.to(torch.float64) - reference).abs().max().item()
    budget = multiple * own + floor
    assert error <= budget, (f"max error {error:.3g} against the fp64 reference exceeds {multiple} x the fp32 "
                             f"computation's own {own:.3g} + {floor:.3g} = {budget:.3g}")


def assert_decode_matches_full(model, ids, prefill: int):
    """Prefill + token-by-token decoding == one full forward, to within the full forward's own fp32 error against a
    float64 copy of the model (``assert_close_to_reference``): a query attending one at a time over the cache sums
    the same terms in another order."""
    assert_close_to_reference(decode_logits(model, ids, prefill), logits(model, ids), fp64_logits(model, ids))


def assert_checkpointed_training_step(model, ids):
    """One training step with activation checkpointing: finite loss, every parameter a finite, non-zero gradient."""
    from lce.train.loop import enable_activation_checkpointing

    model.train()
    enable_activation_checkpointing(model)
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
