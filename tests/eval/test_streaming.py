"""The ``streaming`` protocol (StreamingLLM's token-by-token perplexity): its windows on a hand-computable fake, the
evicting cache, and the model-level equalities that must hold (no eviction == full forward; sinks posenc with
eviction == the sinks model's full forward; eviction without pos-shift == a hand-built forward of what is kept)."""

import copy

import pytest
import torch

import lce
from lce.errors import ConfigError, UnsupportedModelError
from lce.eval.config import EvalConfig
from lce.eval.protocols import TOKEN_MEAN, StreamingProtocol, build_protocol, model_nll_fn, protocol_nll_fn
from lce.eval.streaming import StartRecentLayer, start_recent_cache, streaming_nll_fn
from lce.eval.sweep import run_sweep
from tests.conftest import assert_close_to_reference, make_tiny_llama
from tests.eval.test_protocols import BOS, Recorder, arange

# Token-by-token decoding and one full forward sum the same fp32 terms in another order (a query at a time over the
# cache): observed differences are ~1e-6 on logits of magnitude ~1 here, so 2e-5 is an ample fixed budget.
DECODE_TOL = 2e-5


def test_windows_and_aggregation_hand_computed():
    rec = Recorder()
    score = StreamingProtocol(bucket_size=2).score(rec, [arange(1, 8), arange(10, 15)], 4, bos_id=BOS)
    # L=4 with BOS: BOS + the first 3 tokens of each document, 3 predictions each; fake NLL = target + position/100.
    assert rec.windows == [[0, 1, 2, 3], [0, 10, 11, 12]]
    assert score.aggregation == TOKEN_MEAN and score.tokens == 6 and score.windows == 2
    assert score.nll_sum == pytest.approx((1.00 + 2.01 + 3.02) + (10.00 + 11.01 + 12.02))
    assert score.bucket_tokens == [4, 2] and score.bucket_nll == pytest.approx([1.00 + 2.01 + 10.00 + 11.01,
                                                                                 3.02 + 12.02])
    without_bos = StreamingProtocol().score(Recorder(), [arange(1, 8)], 4)
    assert without_bos.nll_sum == pytest.approx(2.00 + 3.01 + 4.02)


def test_config_errors_and_selection():
    assert build_protocol({"name": "streaming", "start_size": 1, "recent_size": 256}) == StreamingProtocol(
        start_size=1, recent_size=256)
    assert EvalConfig(protocol={"name": "streaming", "recent_size": 64}).protocol_config().recent_size == 64
    for bad, key in (({"recent_size": 0}, "recent_size"), ({"start_size": -1}, "start_size"),
                     ({"bucket_size": 0}, "bucket_size")):
        with pytest.raises(ConfigError, match=rf"protocol\.{key}: must be"):
            build_protocol({"name": "streaming", **bad})
    with pytest.raises(ConfigError, match=r"docs\[0\]: has 2 tokens, fewer than the 3 streamed"):
        StreamingProtocol().score(Recorder(), [arange(1, 3)], 4, bos_id=BOS)


def test_start_recent_layer_keeps_the_first_and_last_entries():
    layer = StartRecentLayer(start_size=2, keep_recent=3)
    seen = []
    for t in range(9):
        entry = torch.full((1, 1, 1, 1), float(t))
        keys, _ = layer.update(entry, entry)
        seen.append(keys.flatten().int().tolist())
    # Step t attends what the cache held plus itself; afterwards the cache keeps tokens 0, 1 and the last three.
    assert seen[4] == [0, 1, 2, 3, 4] and seen[5] == [0, 1, 2, 3, 4, 5] and seen[6] == [0, 1, 3, 4, 5, 6]
    assert seen[8] == [0, 1, 5, 6, 7, 8]
    assert layer.keys.flatten().int().tolist() == [0, 1, 6, 7, 8] == layer.values.flatten().int().tolist()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 259, (2, 30), generator=torch.Generator().manual_seed(0))


def full_nlls(model, ids):
    """The full forward's NLL ``[B, T - 1]`` in fp32, and from a float64 copy of the model (the reference its own
    rounding error is measured against)."""
    with torch.no_grad():
        logits = copy.deepcopy(model).double()(ids).logits[:, :-1]
    reference = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return model_nll_fn(model)(ids), reference


def test_without_eviction_equals_the_full_forward(ids):
    model = make_tiny_llama()
    assert_close_to_reference(streaming_nll_fn(model)(ids), *full_nlls(model, ids))


def test_sinks_with_eviction_equals_the_sinks_full_forward(ids):
    """The pos-shift semantics: posenc=sinks computes in one forward what an evicting, pos-shifted cache computes."""
    model = make_tiny_llama()
    lce.patch(model, {"name": "sinks", "start_size": 2, "recent_size": 8})
    full, reference = full_nlls(model, ids)
    assert_close_to_reference(streaming_nll_fn(model, 2, 8)(ids), full, reference)
    # The window matters: one entry fewer is another model (a check that the comparison can fail).
    assert (streaming_nll_fn(model, 2, 7)(ids) - full).abs().max() > 100 * DECODE_TOL


def test_eviction_without_pos_shift_equals_a_forward_of_the_kept_tokens(ids):
    """One layer of plain RoPE: the cached keys are the tokens' own (rotated at the cache length when fed), so step
    t equals a forward of the kept tokens at those positions, the query at the cache length (the script's
    behaviour without --enable_pos_shift)."""
    model = make_tiny_llama(num_hidden_layers=1)
    start, recent = 2, 4
    got = streaming_nll_fn(model, start, recent)(ids)
    cache_size = start + recent - 1
    expected = []
    for t in range(ids.shape[1] - 1):
        kept = list(range(t)) if t <= cache_size else [*range(start), *range(t - recent + 1, t)]
        tokens = ids[:, [*kept, t]]
        positions = torch.tensor([[min(j, cache_size) for j in kept] + [min(t, cache_size)]]).expand(2, -1)
        with torch.no_grad():
            logits = model(tokens, position_ids=positions, attention_mask=torch.ones_like(tokens)).logits[:, -1]
        expected.append(torch.nn.functional.cross_entropy(logits, ids[:, t + 1], reduction="none"))
    torch.testing.assert_close(got, torch.stack(expected, dim=1), atol=DECODE_TOL, rtol=0)


def test_eviction_refuses_caches_that_are_not_full_attention():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=8)
    with pytest.raises(UnsupportedModelError, match=r"layer 0 of MistralForCausalLM caches with Dynamic"):
        start_recent_cache(MistralForCausalLM(config), 4, 16)


def test_sweep_scores_the_streaming_protocol(ids, tmp_path):
    model = make_tiny_llama()
    protocol = StreamingProtocol(start_size=2, recent_size=8, bucket_size=8)
    meta = {"run": "r", "method": "rope", "params": {}, "model": "tiny", "seed": 0, "protocol": {"name": "streaming"}}
    rows = run_sweep(model, list(ids), [16, 30], tmp_path / "rows.jsonl", meta=meta, protocol=protocol,
                     progress=False)
    direct = protocol.score(protocol_nll_fn(protocol, model), list(ids), 30)
    assert [row["length"] for row in rows] == [16, 30] and rows[1]["tokens"] == 2 * 29
    assert rows[1]["nll"] == pytest.approx(direct.nll, rel=1e-12)
