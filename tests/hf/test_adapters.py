"""Every model family's adapter on a tiny random model of that family: logits formed exactly as the model forms
them, nope/unpatch, rope re-implemented inside attention at the true positions (prefill and decode), the dispatcher
path with the family's attention arguments (soft-capping, sliding windows), frequency methods through
``rope_parameters`` and a replaced rotary module, save/load, and clear refusals for what lce cannot do."""

import pytest
import torch
from torch import nn

import lce
from lce.core.plan import SOFTCAP, LayerAttention
from lce.core.segments import SegmentLayer
from lce.errors import UnsupportedModelError
from lce.hf.adapters import ADAPTERS, NO_ROTATION, adapter_for
from lce.hf.lm import hidden_states, logits_from_hidden
from lce.hf.patch import PatchTarget
from lce.hf.rotary import NeutralRotary
from lce.kernels.rope import Rotation
from tests.conftest import assert_close_to_reference, assert_decode_matches_full, fp64_logits, logits

# Per family: the config class name and what makes its tiny model exercise the family's particulars. Sliding windows
# (8) are shorter than the test sequences (21 tokens) so that they change the result.
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    # eager: the attention that soft-caps logits (transformers 5.20 defaults Gemma2 to SDPA, which drops the cap;
    # 5.25 to eager).
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                                "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0,
                                "attn_implementation": "eager"}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                                         "layer_types": ["sliding_attention", "full_attention"],
                                         "final_logit_softcapping": 3.0}),
    "phi3": ("Phi3Config", {"partial_rotary_factor": 0.75}),
    "gpt_neox": ("GPTNeoXConfig", {"rotary_pct": 0.25, "num_key_value_heads": None}),
    "cohere": ("CohereConfig", {"logit_scale": 0.5, "use_qk_norm": True}),
    "olmo2": ("Olmo2Config", {}),
    "stablelm": ("StableLmConfig", {"partial_rotary_factor": 0.25, "qk_layernorm": True}),
    "starcoder2": ("Starcoder2Config", {"sliding_window": 8}),
    "granite": ("GraniteConfig", {"logits_scaling": 4.0, "attention_multiplier": 0.3, "embedding_multiplier": 2.0,
                                  "residual_multiplier": 0.5}),
    "smollm3": ("SmolLM3Config", {"no_rope_layer_interval": 2}),  # layer 0 rotates, layer 1 is a NoPE layer
}

# Expected rotation of each family's tiny model: (style, rotated dims of the 16-dim heads).
ROTATIONS = {family: ("half", 16) for family in FAMILIES}
ROTATIONS.update(cohere=("interleaved", 16), phi3=("half", 12), gpt_neox=("half", 4), stablelm=("half", 4))

IDS = torch.randint(3, 64, (2, 21), generator=torch.Generator().manual_seed(0))


def family_model(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random causal LM of ``family``: 2 layers, hidden 64, 4 heads of 16 dims (2 KV heads where the family
    has GQA), vocabulary 64. Weights are larger than the usual 0.02 init so that attention is far from uniform and
    positions, soft-caps and windows visibly matter."""
    import transformers

    name, particular = FAMILIES[family]
    params = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "initializer_range": 0.25, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    params.update(particular)
    params.update(overrides)
    config = getattr(transformers, name)(**{k: v for k, v in params.items() if v is not None})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(config).eval()


def eager_reference(query, key, value, mask, scaling, q_pos, k_pos, softcap=None):
    """Causal softmax attention written out: ``query [B, H, Tq, D]``, ``key/value [B, HKV, Tk, D]``, boolean or
    absent mask, optional logit soft-cap ``c * tanh(s / c)``; returns ``[B, Tq, H, D]``."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = (k_pos[:, None, :] <= q_pos[:, :, None])[:, None]
    if mask is not None:
        visible = visible & mask
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.matmul(probs, value).transpose(1, 2)


class RopeByHand(LayerAttention):
    """RoPE applied inside attention by the test itself, then the eager reference (soft-capping too)."""

    handles = frozenset({SOFTCAP})

    def __init__(self, rotation: Rotation):
        self.rotation = rotation

    def __call__(self, module, query, key, value, mask, scaling, dropout, *, q_pos, k_pos, **kwargs):
        query, key = self.rotation.apply(query, q_pos), self.rotation.apply(key, k_pos)
        return eager_reference(query, key, value, mask, scaling, q_pos, k_pos, kwargs.get("softcap")), None


def rope_in_attention(model) -> None:
    """Neutralise the rotary module and rotate q/k inside attention at the true positions, layer by layer."""
    target = PatchTarget(model, adapter_for(model))

    target.rotate_in_attention("test", layer=0)
    target.compute_attention("test_rope",
                             lambda index, module: RopeByHand(target.rotate_in_attention("test", layer=index)))
    target.finalize()


class HalfAngleRotary(nn.Module):
    """A replacement rotary module rotating at half the angles of the one it replaces (= linear interpolation 2)."""

    def __init__(self, replaced: nn.Module, rotation: Rotation):
        super().__init__()
        self.rotation = Rotation(replaced.inv_freq.float() / 2, rotation.attention_scaling, rotation.style)

    def forward(self, x, position_ids):
        return self.rotation.cos_sin(position_ids, x.dtype)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_rope_nope_unpatch(family):
    """Logits from hidden states equal the model's own (soft-caps, scales); rope is the identity; nope changes the
    output; unpatch restores the original rotary module and output exactly."""
    model = family_model(family)
    before = logits(model, IDS)
    with torch.no_grad():
        assert torch.equal(logits_from_hidden(model, hidden_states(model, IDS)), before)
    rotary = adapter_for(model).rotary(model)
    lce.patch(model, "rope")
    assert torch.equal(logits(model, IDS), before)
    lce.patch(model, "nope")
    assert isinstance(adapter_for(model).rotary(model), NeutralRotary)
    assert not torch.equal(logits(model, IDS), before)
    lce.unpatch(model)
    assert adapter_for(model).rotary(model) is rotary
    assert torch.equal(logits(model, IDS), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_inside_attention_equals_stock_model(family):
    model, reference = family_model(family), family_model(family)
    rope_in_attention(model)
    # Eager fp32 attention vs the stock SDPA/eager kernel: same math, another summation order, so as close to the
    # stock model in fp64 as the stock fp32 model is (conftest.assert_close_to_reference).
    assert_close_to_reference(logits(model, IDS), logits(reference, IDS), fp64_logits(reference, IDS))
    # Prefill then decoding over the cache (sliding-window layers keep only the window) == one full forward.
    assert_decode_matches_full(model, IDS, 13)


def test_reference_budget_is_the_fp32_models_own_error():
    """The tolerance helper: the fp32 result passes, an error of 10x the fp32 model's own error against fp64 does
    not (a wrong rotation or mask errs by 1e-3 and more)."""
    model = family_model("starcoder2")
    fp32, fp64 = logits(model, IDS), fp64_logits(model, IDS)
    own = (fp32.double() - fp64).abs().max().item()
    assert 0 < own < 1e-4
    assert_close_to_reference(fp32, fp32, fp64)
    with pytest.raises(AssertionError, match="against the fp64 reference exceeds 3.0 x the fp32 computation's own"):
        assert_close_to_reference(fp32 + 10 * own, fp32, fp64)


@pytest.mark.parametrize("family", FAMILIES)
def test_logn_goes_through_the_dispatcher_with_the_familys_attention(family):
    """Within the training length log-n is the identity: lce's attention function (which receives the family's
    softcap and sliding window) reproduces the stock model exactly. Below it, queries are scaled."""
    model = family_model(family)
    before, implementation = logits(model, IDS), model.config._attn_implementation
    lce.patch(model, "logn", logn_length=IDS.shape[1])
    assert model.config._attn_implementation == "lce_logn"
    assert torch.equal(logits(model, IDS), before)
    lce.patch(model, "logn", logn_length=4)
    scaled = logits(model, IDS)
    assert not torch.equal(scaled, before)
    assert_decode_matches_full(model, IDS, 13)
    lce.unpatch(model)
    assert model.config._attn_implementation == implementation
    assert torch.equal(logits(model, IDS), before)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "phi3"])
def test_rope_parameters_equal_a_model_built_with_them(family):
    """External parity: linear interpolation through ``set_rope_parameters`` == the family built with that config
    (Gemma3: in its full-attention layers only)."""
    model = family_model(family)
    before = logits(model, IDS)
    lce.patch(model, "rope")  # records the original rope_parameters
    target = PatchTarget(model, adapter_for(model))
    target.set_rope_parameters("test", rope_type="linear", factor=2.0)
    expected = family_model(family, rope_parameters=model.config.rope_parameters)
    if family == "gemma3_text":
        assert model.config.rope_parameters["full_attention"]["rope_type"] == "linear"
        assert model.config.rope_parameters["sliding_attention"]["rope_type"] == "default"
    scaled = logits(model, IDS)
    assert torch.equal(scaled, logits(expected, IDS))
    assert not torch.equal(scaled, before)


def test_rope_parameters_the_config_rejects_are_refused():
    """Phi-3's config accepts only ``longrope``: a linear-scaled checkpoint would not reload, so it is refused."""
    model = family_model("phi3")
    with pytest.raises(UnsupportedModelError, match=r"posenc=pi: phi3 config rejects rope_parameters"):
        lce.patch(model, "rope")
        PatchTarget(model, adapter_for(model)).set_rope_parameters("pi", rope_type="linear", factor=2.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_replaced_rotary_goes_where_the_model_calls_it(family):
    """``replace_rotary`` hands each extended slot to the builder as a plain rotary module and puts the results where
    the family's model calls them: a module rotating at half the angles == the stock model with its extended
    frequencies halved in place."""
    replaced, expected = family_model(family), family_model(family)
    adapter = adapter_for(replaced)
    lce.patch(replaced, "rope")
    PatchTarget(replaced, adapter).replace_rotary("test", lambda old: HalfAngleRotary(old, adapter.rotation(old)))
    for slot in adapter.slots(expected):
        if slot.extended:
            adapter.slot_rotary(adapter.rotary(expected), slot.key).inv_freq.div_(2)
    assert torch.equal(logits(replaced, IDS), logits(expected, IDS))


@pytest.mark.parametrize("family", FAMILIES)
def test_rotation_style_width_and_layers(family):
    model = family_model(family)
    adapter = adapter_for(model)
    style, width = ROTATIONS[family]
    rotations = adapter.layer_rotations(model)
    rotating = [r for r in rotations if r.rotary_dim]
    assert all((r.style, r.rotary_dim) == (style, width) for r in rotating)
    assert adapter.rotary_dim(model) == width
    assert len(rotating) == (1 if family == "smollm3" else 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip(family, tmp_path):
    model = family_model(family)
    lce.patch(model, "logn", logn_length=4)
    lce.save_model(model, lce.data.ByteTokenizer(), tmp_path / "m")
    # attn_implementation=None: the family's default (lce.load_model's "sdpa" is refused by Gemma2, which has none).
    loaded, _ = lce.load_model(str(tmp_path / "m"), attn_implementation=None)
    assert type(loaded) is type(model)
    assert loaded.config.lce["posenc"]["name"] == "logn"
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_unsupported_family_lists_every_supported_one():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*supported families: llama, mistral") as info:
        lce.patch(model, "nope")
    assert all(family in str(info.value) for family in FAMILIES)
    assert set(ADAPTERS) == set(FAMILIES)


def test_gemma3_rotates_each_layer_type_with_its_own_frequencies():
    model = family_model("gemma3_text")
    adapter = adapter_for(model)
    slots = {slot.key: slot for slot in adapter.slots(model)}
    assert slots["sliding_attention"].layers == (0,) and not slots["sliding_attention"].extended
    assert slots["full_attention"].layers == (1,) and slots["full_attention"].extended
    local, global_ = adapter.layer_rotations(model)
    torch.testing.assert_close(local.inv_freq[1] / global_.inv_freq[1], torch.tensor(100.0 ** (2 / 16)))
    with pytest.raises(UnsupportedModelError, match=r"posenc=dca rotates every layer alike, but gemma3_text"):
        PatchTarget(model, adapter).rotate_in_attention("dca")
    with pytest.raises(UnsupportedModelError, match="one rotation per layer type"):
        adapter.rotation(adapter.rotary(model))
    neutral = NeutralRotary(adapter.rotary(model))
    cos, sin = neutral(torch.zeros(1, 5, 64), torch.arange(5)[None], "sliding_attention")
    assert cos.shape == (1, 5, 16) and torch.equal(cos, torch.ones_like(cos)) and not sin.any()


def test_smollm3_nope_layers_do_not_rotate_in_attention():
    model = family_model("smollm3")
    target = PatchTarget(model, adapter_for(model))
    with pytest.raises(UnsupportedModelError, match=r"posenc=dca rotates every layer alike, but smollm3"):
        target.rotate_in_attention("dca")
    assert target.rotate_in_attention("dca", layer=0).rotary_dim == 16
    assert target.rotate_in_attention("dca", layer=1) is NO_ROTATION
    x = torch.randn(1, 2, 3, 16)
    assert torch.equal(NO_ROTATION.apply(x, torch.arange(3)[None]), x)


def test_gemma2_kernel_that_ignores_softcap_is_refused():
    model = family_model("gemma2")
    target = PatchTarget(model, adapter_for(model))
    target.rotate_in_attention("dca")
    with pytest.raises(UnsupportedModelError, match="posenc=dca replaces the attention computation, but gemma2 "
                                                    "attention needs softcap"):
        target.compute_attention("dca", lambda index, module: SegmentLayer("dca", (), handles=frozenset()))
        target.finalize()


def test_length_dependent_rope_is_refused_inside_attention():
    model = family_model("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(UnsupportedModelError, match=r"posenc=dca: llama: rope_type 'dynamic' recomputes"):
        PatchTarget(model, adapter_for(model)).rotate_in_attention("dca")


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_head_reproduces_the_models_logits(family):
    """The head as data gives the model's own logits bit for bit (its multipliers are 1, 0.5 and 1/4: exact)."""
    model = family_model(family)
    head = adapter_for(model).logit_head(model)
    assert head.weight is model.get_output_embeddings().weight
    with torch.no_grad():
        assert torch.equal(head(hidden_states(model, IDS)), logits(model, IDS))


def test_logit_head_multiplier_and_softcap_per_family():
    assert adapter_for(model := family_model("cohere")).logit_head(model).multiplier == 0.5
    assert adapter_for(model := family_model("granite")).logit_head(model).multiplier == 0.25
    assert adapter_for(model := family_model("gemma2")).logit_head(model).softcap == 3.0
    head = adapter_for(model := family_model("llama")).logit_head(model)
    assert (head.multiplier, head.softcap, head.bias) == (1.0, None, None)


def test_logit_head_divisor_that_is_not_a_power_of_two():
    model = family_model("granite", logits_scaling=3.0)
    head = adapter_for(model).logit_head(model)
    with torch.no_grad():
        # Granite divides by 3, the head multiplies by a rounded 1/3: three roundings of 2^-24 each, 1.8e-7 relative.
        torch.testing.assert_close(head(hidden_states(model, IDS)), logits(model, IDS), rtol=2.4e-7, atol=0)


class QuantisedLinear(nn.Linear):
    """Stands for an output layer lce cannot express as a weight (bitsandbytes and LoRA layers subclass Linear)."""


def test_logit_head_is_none_for_heads_it_cannot_express():
    model = family_model("llama")
    linear = model.get_output_embeddings()
    handle = linear.register_forward_hook(lambda module, args, out: out * 2)
    assert adapter_for(model).logit_head(model) is None
    handle.remove()
    assert adapter_for(model).logit_head(model) is not None
    model.set_output_embeddings(QuantisedLinear(linear.in_features, linear.out_features, bias=False))
    assert adapter_for(model).logit_head(model) is None


ROTATE_IN_ATTENTION = {  # each reduces to plain RoPE on the 21-token test sequences (every distance is in range)
    "dca": {"name": "dca"},  # c = 64: chunks of stride 40 hold the whole sequence
    "self_extend": {"name": "self_extend", "group_size": 2, "neighbor_window": 32},
    "rerope": {"name": "rerope", "window": 32},
    "sinks": {"name": "sinks", "start_size": 2, "recent_size": 32},
}


@pytest.mark.parametrize("family", ["gemma3_text", "smollm3", "gemma2"])
@pytest.mark.parametrize("method", list(ROTATE_IN_ATTENTION))
def test_methods_rotate_each_layer_with_its_own_rotation(family, method):
    """Gemma3 (local and global frequencies), SmolLM3 (NoPE layers) and Gemma2 (attention-logit soft-capping, sliding
    layers) under the rotate-in-attention methods: with windows covering the sequence each is the unpatched model, so
    every layer used its own rotation (or none) and soft-capped its logits."""
    model, reference = family_model(family), family_model(family)
    lce.patch(model, ROTATE_IN_ATTENTION[method])
    ids = torch.randint(3, 64, (2, 21), generator=torch.Generator().manual_seed(1))
    # Block-wise eager softmax over segments vs the family's SDPA attention: same math, fp32 summation order.
    assert_close_to_reference(logits(model, ids), logits(reference, ids), fp64_logits(reference, ids))


def test_nope_layers_take_the_fused_kernel_without_segments():
    from lce.kernels.backend import use_backend

    model, reference = family_model("smollm3"), family_model("smollm3")
    lce.patch(model, ROTATE_IN_ATTENTION["dca"])
    fused = [layer.self_attn.lce_plan.fused for layer in model.model.layers]
    assert fused[0].segments and not fused[1].segments  # layer 1 is a NoPE layer
    ids = torch.randint(3, 64, (1, 21), generator=torch.Generator().manual_seed(1))
    with use_backend("triton"):  # Triton's interpreter on CPU
        got = logits(model, ids)
    # The fused kernel's online softmax vs the family's SDPA attention, both fp32.
    assert_close_to_reference(got, logits(reference, ids), fp64_logits(reference, ids))
