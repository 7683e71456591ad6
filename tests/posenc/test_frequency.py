"""Frequency-scaling references (``lce.posenc.frequencies`` and, for the methods lce applies only as transformers'
rope types, ``tests.posenc.references``): parity with transformers' ``ROPE_INIT_FUNCTIONS`` over
random parameter draws, the patched model's rotary module == the reference, golden constants (METHODS §2.13), and
bad parameters as ConfigErrors naming the field.

Tolerances: exact (``torch.equal``) wherever the reference evaluates the same fp32 operations as transformers. YaRN
is the exception: the paper's blend ``theta/s * r + theta * (1 - r)`` differs from transformers'
``1/(s * b^x) * (1 - (1 - r)) + 1/b^x * (1 - r)`` by fp32 rounding only, at most ~2 ulp (rtol 3e-7 = 2.5 * 2^-23).
"""

import math
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers import logging as hf_logging
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import lce
from lce.errors import ConfigError
from lce.posenc import frequencies as F
from tests.posenc import references as R

YARN_RTOL = 3e-7  # ~2 fp32 ulp: same formula, different association of the blend (see module docstring)
DIMS = [8, 16, 20, 32, 48, 64, 72, 80, 96, 128, 160, 256]


def _draw(rng: random.Random) -> dict:
    """One random RoPE setting: head dim, base, training length, scale, YaRN/Llama-3/LongRoPE parameters."""
    dim = rng.choice(DIMS)
    beta_fast = rng.choice([32.0, rng.uniform(4, 128)])
    low = rng.uniform(0.25, 4)
    return {
        "dim": dim,
        "base": 10 ** rng.uniform(3, 7),
        "length": int(2 ** rng.uniform(6, 17)),
        "factor": rng.choice([1.0, float(rng.randint(2, 64)), rng.uniform(1, 64)]),
        "beta_fast": beta_fast,
        "beta_slow": rng.choice([1.0, rng.uniform(0.25, beta_fast / 2)]),
        "truncate": rng.random() < 0.7,
        "temperature": rng.choice([{}, {"attention_factor": rng.uniform(0.5, 2)},
                                   {"mscale": rng.uniform(0.5, 2), "mscale_all_dim": rng.uniform(0.5, 2)}]),
        "low": low,
        "high": low + rng.uniform(0.1, 8),
        "short": [rng.uniform(0.8, 2) for _ in range(dim // 2)],
        "long": [rng.uniform(1, 64) for _ in range(dim // 2)],
    }


DRAWS = [_draw(random.Random(seed)) for seed in range(60)]
IDS = [f"d{p['dim']}-b{p['base']:.0e}-L{p['length']}-s{p['factor']:.3g}" for p in DRAWS]


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    """transformers logs rope-validation warnings (e.g. llama3's original length >= max_position_embeddings)."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(level)


def hf_config(p: dict, max_position_embeddings: int | None = None, **rope) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=p["dim"],
                       max_position_embeddings=max_position_embeddings or p["length"],
                       rope_parameters={"rope_theta": p["base"], **rope})


# Reference == transformers' ROPE_INIT_FUNCTIONS


@pytest.mark.parametrize("p", DRAWS, ids=IDS)
def test_pi_matches_transformers_linear(p):
    expected, scaling = ROPE_INIT_FUNCTIONS["linear"](hf_config(p, rope_type="linear", factor=p["factor"]))
    assert torch.equal(R.pi_inv_freq(F.rope_inv_freq(p["dim"], p["base"]), p["factor"]), expected)
    assert scaling == 1.0


@pytest.mark.parametrize("p", DRAWS, ids=IDS)
def test_yarn_matches_transformers_yarn(p):
    config = hf_config(p, rope_type="yarn", factor=p["factor"], original_max_position_embeddings=p["length"],
                       beta_fast=p["beta_fast"], beta_slow=p["beta_slow"], truncate=p["truncate"], **p["temperature"])
    expected, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    inv_freq, mscale = F.yarn_inv_freq(p["dim"], p["base"], p["factor"], p["length"], p["beta_fast"], p["beta_slow"],
                                       p["truncate"])
    torch.testing.assert_close(inv_freq, expected, rtol=YARN_RTOL, atol=0)
    assert mscale == F.yarn_mscale(p["factor"])
    assert F.yarn_attention_factor(p["factor"], **p["temperature"]) == expected_factor


@pytest.mark.parametrize("p", DRAWS, ids=IDS)
def test_llama3_matches_transformers_llama3(p):
    config = hf_config(p, 2 * p["length"], rope_type="llama3", factor=p["factor"], low_freq_factor=p["low"],
                       high_freq_factor=p["high"], original_max_position_embeddings=p["length"])
    expected, scaling = ROPE_INIT_FUNCTIONS["llama3"](config)
    assert torch.equal(R.llama3_inv_freq(p["dim"], p["base"], p["factor"], p["length"], p["low"], p["high"]), expected)
    assert scaling == 1.0


@pytest.mark.parametrize("p", DRAWS, ids=IDS)
def test_longrope_matches_transformers_longrope(p):
    config = hf_config(p, rope_type="longrope", factor=p["factor"], short_factor=p["short"], long_factor=p["long"],
                       original_max_position_embeddings=p["length"])
    short, scaling = ROPE_INIT_FUNCTIONS["longrope"](config)
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, seq_len=p["length"] + 1)
    assert torch.equal(R.longrope_inv_freq(p["dim"], p["base"], p["short"]), short)
    assert torch.equal(R.longrope_inv_freq(p["dim"], p["base"], p["long"]), long)
    assert R.longrope_mscale(p["factor"], p["length"]) == scaling


@pytest.mark.parametrize("p", DRAWS, ids=IDS)
def test_dynamic_ntk_matches_transformers_dynamic(p):
    config = hf_config(p, rope_type="dynamic", factor=p["factor"])
    for length in (1, p["length"], p["length"] + 1, 3 * p["length"] + 7):
        expected, scaling = ROPE_INIT_FUNCTIONS["dynamic"](config, seq_len=length)
        base = F.dynamic_ntk_base(p["base"], p["factor"], p["dim"], length, p["length"])
        assert torch.equal(F.rope_inv_freq(p["dim"], base), expected), length
        assert scaling == 1.0


@pytest.mark.parametrize("p", DRAWS, ids=IDS)
def test_ntk_base_scales_lowest_frequency_like_pi(p):
    """NTK-aware (YaRN App. A.1): theta_0 = 1 is kept, the lowest frequency is divided by exactly s."""
    theta = F.rope_inv_freq(p["dim"], p["base"]).double()
    scaled = 1.0 / F.ntk_base(p["base"], p["factor"], p["dim"]) ** (torch.arange(0, p["dim"], 2).double() / p["dim"])
    assert scaled[0] == 1.0
    torch.testing.assert_close(scaled[-1], theta[-1] / p["factor"], rtol=1e-6, atol=0)  # theta in fp32


@pytest.mark.parametrize("p", DRAWS[:20], ids=IDS[:20])
def test_dynamic_yarn_at_length_equals_yarn_at_that_scale(p):
    """Dynamic YaRN's frequencies at length l are YaRN's at s = max(1, l / L) (checked against transformers)."""
    from lce.posenc.dynamic import DynamicYarnRotary

    module = DynamicYarnRotary(p["dim"], p["base"], p["length"], p["beta_fast"], p["beta_slow"], p["truncate"],
                               None, None, None)
    for length in (p["length"] // 2, p["length"], int(p["length"] * p["factor"]) + 1):
        scale = max(1.0, length / p["length"])
        expected, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config(
            p, rope_type="yarn", factor=scale, original_max_position_embeddings=p["length"],
            beta_fast=p["beta_fast"], beta_slow=p["beta_slow"], truncate=p["truncate"]))
        inv_freq, scaling = module.frequencies(length)
        torch.testing.assert_close(inv_freq, expected, rtol=YARN_RTOL, atol=0)
        assert scaling == expected_factor


# The patched model's rotary module == the reference


def tiny_model(dim: int, base: float, length: int) -> LlamaForCausalLM:
    """A one-layer Llama with head dim ``dim`` whose training length (max_position_embeddings) is ``length``."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=dim, max_position_embeddings=length,
                         rope_theta=base)
    return LlamaForCausalLM(config).eval()


def rotary_state(model, length: int):
    """(inv_freq, attention_scaling) the rotary module uses in a forward of ``length`` tokens."""
    rotary = model.model.rotary_emb
    rotary(torch.zeros(1, 1, 1), torch.tensor([[length - 1]]))  # longrope picks its list in the forward
    if hasattr(rotary, "frequencies"):
        return rotary.frequencies(length)
    return rotary.inv_freq, float(rotary.attention_scaling)


@pytest.mark.parametrize("p", DRAWS[:12], ids=IDS[:12])
def test_patched_rotary_equals_reference(p):
    dim, base, length, s = p["dim"], p["base"], p["length"], p["factor"]
    theta = F.rope_inv_freq(dim, base)
    model = tiny_model(dim, base, length)
    beyond = 2 * length + 1

    lce.patch(model, "pi", factor=s)
    inv_freq, scaling = rotary_state(model, beyond)
    assert torch.equal(inv_freq, R.pi_inv_freq(theta, s)) and scaling == 1.0

    lce.patch(model, "ntk", factor=s)
    inv_freq, scaling = rotary_state(model, beyond)
    assert torch.equal(inv_freq, F.rope_inv_freq(dim, F.ntk_base(base, s, dim))) and scaling == 1.0
    assert model.config.rope_parameters["rope_theta"] == F.ntk_base(base, s, dim)

    lce.patch(model, "yarn", factor=s, beta_fast=p["beta_fast"], beta_slow=p["beta_slow"], truncate=p["truncate"])
    inv_freq, scaling = rotary_state(model, beyond)
    expected, mscale = F.yarn_inv_freq(dim, base, s, length, p["beta_fast"], p["beta_slow"], p["truncate"])
    torch.testing.assert_close(inv_freq, expected, rtol=YARN_RTOL, atol=0)
    assert scaling == mscale

    lce.patch(model, "llama3", factor=s, low_freq_factor=p["low"], high_freq_factor=p["high"])
    inv_freq, scaling = rotary_state(model, beyond)
    assert torch.equal(inv_freq, R.llama3_inv_freq(dim, base, s, length, p["low"], p["high"])) and scaling == 1.0

    lce.patch(model, "longrope", factor=s, short_factor=p["short"], long_factor=p["long"])
    for n, factors in ((length, p["short"]), (beyond, p["long"])):
        inv_freq, scaling = rotary_state(model, n)
        assert torch.equal(inv_freq, R.longrope_inv_freq(dim, base, factors))
        assert scaling == R.longrope_mscale(s, length)

    lce.patch(model, "dynamic_ntk", factor=s)
    for n in (length, beyond):
        inv_freq, scaling = rotary_state(model, n)
        assert torch.equal(inv_freq, F.rope_inv_freq(dim, F.dynamic_ntk_base(base, s, dim, n, length)))
        assert scaling == 1.0

    lce.patch(model, "dynamic_yarn", beta_fast=p["beta_fast"], beta_slow=p["beta_slow"], truncate=p["truncate"])
    inv_freq, scaling = rotary_state(model, beyond)
    expected, mscale = F.yarn_inv_freq(dim, base, beyond / length, length, p["beta_fast"], p["beta_slow"],
                                       p["truncate"])
    assert torch.equal(inv_freq, expected) and scaling == mscale


def test_cos_sin_of_patched_rotary_equal_the_reference_rotation():
    """End to end through the module's forward: cos/sin == Rotation(reference).cos_sin at every position."""
    from lce.kernels.rope import Rotation

    model = tiny_model(16, 1e4, 32)
    positions = torch.arange(80)[None]
    lce.patch(model, "yarn", factor=3.0)
    cos, sin = model.model.rotary_emb(torch.zeros(1, 1, 1), positions)
    inv_freq, mscale = F.yarn_inv_freq(16, 1e4, 3.0, 32)
    ref_cos, ref_sin = Rotation(model.model.rotary_emb.inv_freq, mscale).cos_sin(positions, torch.float32)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, inv_freq, rtol=YARN_RTOL, atol=0)


def test_original_length_defaults_to_the_model_and_can_be_set():
    model = tiny_model(16, 1e4, 48)
    lce.patch(model, "yarn", factor=2.0)
    assert model.config.rope_parameters["original_max_position_embeddings"] == 48
    lce.patch(model, "llama3", original_max_position_embeddings=24)
    assert model.config.rope_parameters["original_max_position_embeddings"] == 24
    assert model.config.rope_parameters["rope_theta"] == 1e4  # merged into the original dict


def test_patch_overrides_every_key_of_a_previous_rope_type():
    """A model that already has YaRN with attention_factor: posenc=yarn must not inherit that stale key."""
    model = tiny_model(16, 1e4, 32)
    model.config.rope_parameters = {"rope_theta": 1e4, "rope_type": "yarn", "factor": 2.0, "attention_factor": 0.5,
                                    "original_max_position_embeddings": 32}
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    lce.patch(model, "yarn", factor=4.0)
    assert model.model.rotary_emb.attention_scaling == F.yarn_mscale(4.0)


def test_longrope_default_factors():
    """short_factor null = ones (RoPE within L); long_factor null = YaRN's ramp in scale space, monotone 1 -> s."""
    model = tiny_model(16, 1e4, 64)
    lce.patch(model, "longrope", factor=4.0)
    rope = model.config.rope_parameters
    assert rope["short_factor"] == [1.0] * 8
    assert rope["long_factor"] == F.longrope_init_factors(16, 1e4, 4.0, 64)
    assert rope["long_factor"][0] == 1.0 and rope["long_factor"][-1] == 4.0
    assert all(a <= b for a, b in zip(rope["long_factor"], rope["long_factor"][1:]))


# Golden constants (METHODS §2.13)


@pytest.mark.parametrize("base,length,expected", [
    (1e4, 4096, (20, 46)),     # Llama-2
    (5e5, 8192, (18, 35)),     # Llama-3
    (1e4, 8192, (25, 50)),     # Mistral-v0.1
    (1e6, 32768, (23, 40)),    # Qwen2.5
], ids=["llama2", "llama3", "mistral", "qwen2.5"])
def test_yarn_correction_range(base, length, expected):
    assert F.yarn_correction_range(32, 1, 128, base, length) == expected


def test_yarn_correction_dims_before_truncation():
    assert F.find_correction_dim(32, 128, 1e4, 4096) == pytest.approx(20.94, abs=5e-3)
    assert F.find_correction_dim(1, 128, 1e4, 4096) == pytest.approx(45.03, abs=5e-3)


def test_yarn_mscale_and_logit_scale():
    expected = [1.0693, 1.1386, 1.2079, 1.2773, 1.3466, 1.4159]
    assert [round(F.yarn_mscale(s), 4) for s in (2, 4, 8, 16, 32, 64)] == expected
    # logits scale by mscale^2; METHODS lists 1.143, 1.297, 1.459, 1.631 (squares of the 3-decimal mscales)
    assert [F.yarn_mscale(s) ** 2 for s in (2, 4, 8, 16)] == pytest.approx([1.143, 1.297, 1.459, 1.631], abs=1e-3)
    assert F.yarn_mscale(1) == F.yarn_mscale(0.5) == 1.0


def test_longrope_su_mscale():
    expected = [1.0408, 1.0801, 1.1180, 1.1547, 1.1902, 1.2247]
    assert [round(R.longrope_mscale(s, 4096), 4) for s in (2, 4, 8, 16, 32, 64)] == expected
    # su^2 = log_L(s * L): log-n scaling evaluated at the target length
    assert R.longrope_mscale(8, 4096) ** 2 == pytest.approx(math.log(8 * 4096, 4096))


def test_ntk_bases():
    assert [round(F.ntk_base(1e4, s, 128)) for s in (2, 4, 8, 16, 32)] == [20221, 40890, 82685, 167199, 338097]


def test_llama3_bands():
    """Llama 3.1 (d=128, b=5e5, factor 8, low 1, high 4, L=8192): 29 pairs unchanged, 29 scaled, 6 smoothed."""
    theta = F.rope_inv_freq(128, 5e5)
    scaled = R.llama3_inv_freq(128, 5e5, 8.0, 8192, 1.0, 4.0)
    unchanged, divided = scaled == theta, scaled == theta / 8
    assert (int(unchanged.sum()), int(divided.sum()), int((~unchanged & ~divided).sum())) == (29, 29, 6)
    assert unchanged[:29].all() and divided[-29:].all()  # high frequencies first


# Bad parameters


@pytest.mark.parametrize("name,params,field", [
    ("pi", {"factor": 0.5}, r"posenc\.factor: must be a finite number >= 1"),
    ("ntk", {"factor": 0.0}, r"posenc\.factor"),
    ("ntk", {"rope_theta": -1.0}, r"posenc\.rope_theta: must be > 0"),
    ("yarn", {"factor": float("nan")}, r"posenc\.factor"),
    ("yarn", {"beta_fast": 1.0, "beta_slow": 1.0}, r"posenc\.beta_fast: must be > beta_slow"),
    ("yarn", {"beta_slow": 0.0}, r"posenc\.beta_slow: must be > 0"),
    ("yarn", {"attention_factor": 0.0}, r"posenc\.attention_factor: must be > 0"),
    ("yarn", {"mscale": 1.0}, r"posenc\.mscale: set both mscale and mscale_all_dim"),
    ("yarn", {"original_max_position_embeddings": 0}, r"posenc\.original_max_position_embeddings: must be >= 1"),
    ("dynamic_yarn", {"beta_fast": 0.5}, r"posenc\.beta_fast: must be > beta_slow"),
    ("dynamic_yarn", {"mscale_all_dim": -1.0, "mscale": 1.0}, r"posenc\.mscale_all_dim: must be > 0"),
    ("dynamic_ntk", {"factor": 0.9}, r"posenc\.factor"),
    ("dynamic_ntk", {"original_max_position_embeddings": -4}, r"posenc\.original_max_position_embeddings"),
    ("llama3", {"low_freq_factor": 4.0, "high_freq_factor": 4.0}, r"posenc\.low_freq_factor: must be < high_freq"),
    ("llama3", {"low_freq_factor": 0.0}, r"posenc\.low_freq_factor: must be > 0"),
    ("llama3", {"factor": -8.0}, r"posenc\.factor"),
    ("longrope", {"factor": 0.25}, r"posenc\.factor"),
    ("longrope", {"short_factor": [1.0, 0.0]}, r"posenc\.short_factor\[1\]: must be > 0"),
    ("longrope", {"attention_factor": -1.0}, r"posenc\.attention_factor"),
    ("longrope", {"original_max_position_embeddings": 1}, r"posenc\.original_max_position_embeddings: must be >= 2"),
])
def test_bad_parameters_name_the_field(name, params, field):
    with pytest.raises(ConfigError, match=field):
        lce.POSENCS.build(name, **params)


def test_longrope_factor_lists_must_fit_the_model():
    model = tiny_model(16, 1e4, 32)
    before = dict(model.config.rope_parameters)
    with pytest.raises(ConfigError, match=r"posenc\.long_factor: must have 8 values \(rotary dim / 2.*got 3"):
        lce.patch(model, "longrope", long_factor=[1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match=r"posenc\.short_factor: must have 8 values.*got 64"):
        lce.patch(model, "longrope", short_factor=[1.0] * 64)
    assert model.config.rope_parameters == before and not hasattr(model, "_lce_patch")


def test_unknown_field_and_wrong_type_are_named():
    with pytest.raises(ConfigError, match=r"posenc\.beta_fst: unknown key \(did you mean 'beta_fast'\?\)"):
        lce.POSENCS.build("yarn", beta_fst=16)
    with pytest.raises(ConfigError, match=r"posenc\.factor: expected a number"):
        lce.POSENCS.build("pi", factor="big")
