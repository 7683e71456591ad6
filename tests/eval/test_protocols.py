"""Perplexity protocols on hand-computed examples, at their window boundaries, and on the tiny model.

The fake ``nll_fn`` gives the prediction made at window position ``t`` (0-based index of the predicting token) of
target token ``v`` the NLL ``v + t / 100``: a scored NLL names both the token and where in its window it was scored,
so every expected number below is a sum written out by hand.
"""

import dataclasses
import math

import pytest
import torch

from lce.errors import ConfigError
from lce.eval.perplexity import score_documents
from lce.eval.protocols import (
    MEAN_OF_BATCH_MEANS,
    MEAN_OF_WINDOW_MEANS,
    PROTOCOLS,
    TOKEN_MEAN,
    CanonicalProtocol,
    FairseqProtocol,
    LongLoraStreamProtocol,
    ProtocolScore,
    SlidingProtocol,
    YarnProtocol,
    build_protocol,
    model_nll_fn,
    protocol_meta,
)
from tests.conftest import make_tiny_llama

BOS = 0


def fake_nll(input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T] -> [B, T-1]``: target token value + predicting position / 100."""
    positions = torch.arange(input_ids.shape[1] - 1, dtype=torch.float64)
    return input_ids[:, 1:].double() + positions / 100


class Recorder:
    """``fake_nll`` that also records the windows it was called on."""

    def __init__(self):
        self.windows: list[list[int]] = []

    def __call__(self, input_ids):
        self.windows += input_ids.tolist()
        return fake_nll(input_ids)


def arange(a, b):
    return torch.arange(a, b, dtype=torch.int64)


def test_registry_names_and_configs():
    assert PROTOCOLS.names() == ["canonical", "fairseq", "longlora_stream", "sliding", "streaming", "yarn"]
    assert build_protocol({"name": "yarn", "stride": 64, "truncate": True}) == YarnProtocol(stride=64, truncate=True)
    assert protocol_meta(SlidingProtocol(stride=8)) == {"name": "sliding", "stride": 8}
    with pytest.raises(ConfigError, match=r"protocol\.strid: unknown key.*stride"):
        build_protocol({"name": "yarn", "strid": 3})
    with pytest.raises(ConfigError, match=r"unknown protocol 'yran' \(did you mean 'yarn'\?\)"):
        build_protocol("yran")
    for bad in ({"name": "yarn", "stride": 0}, {"name": "canonical", "confidence": 1.0},
                {"name": "fairseq", "context_window": -2}, {"name": "longlora_stream", "reference_batch_size": 0}):
        with pytest.raises(ConfigError, match=r"protocol\."):
            build_protocol(bad)



def test_canonical_hand_computed_with_buckets_and_interval():
    docs = [arange(1, 6), torch.full((5,), 2)]
    score = CanonicalProtocol(bucket_size=2, n_bootstrap=1000, seed=0).score(fake_nll, docs, 4)
    # doc 0 -> [1,2,3,4]: 2.00 + 3.01 + 4.02 = 9.03; doc 1 -> [2,2,2,2]: 2.00 + 2.01 + 2.02 = 6.03.
    assert score.aggregation == TOKEN_MEAN and score.tokens == 6 and score.windows == 2
    assert score.nll_sum == pytest.approx(15.06)
    assert score.nll == pytest.approx(15.06 / 6) and score.ppl == pytest.approx(math.exp(15.06 / 6))
    # Positions 0-1: 2.00 + 3.01 + 2.00 + 2.01; position 2: 4.02 + 2.02.
    assert score.bucket_tokens == [4, 2] and score.bucket_nll == pytest.approx([9.02, 6.04])
    # Two documents with means 3.01 and 2.01: a resample is both copies of one (p = 1/4 each) or one of each, so
    # the 2.5% and 97.5% quantiles are exactly the two document means.
    assert score.confidence == 0.95
    assert score.ppl_low == pytest.approx(math.exp(2.01)) and score.ppl_high == pytest.approx(math.exp(3.01))
    assert CanonicalProtocol(n_bootstrap=0).score(fake_nll, docs, 4).ppl_low is None


def test_canonical_interval_is_seeded_and_brackets_the_estimate():
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 50, (20,), generator=generator) for _ in range(12)]
    a = CanonicalProtocol(seed=3).score(fake_nll, docs, 16)
    b = CanonicalProtocol(seed=3).score(fake_nll, docs, 16, batch_size=5)
    assert (a.ppl_low, a.ppl_high) == (b.ppl_low, b.ppl_high)
    assert a.ppl_low < a.ppl < a.ppl_high
    wider = CanonicalProtocol(seed=3, confidence=0.99).score(fake_nll, docs, 16)
    assert wider.ppl_low <= a.ppl_low and wider.ppl_high >= a.ppl_high


def test_canonical_rejects_short_documents():
    with pytest.raises(ConfigError, match=r"docs\[1\].*3 tokens.*4"):
        CanonicalProtocol().score(fake_nll, [arange(1, 6), arange(1, 4)], 4)



def test_yarn_sliding_windows_with_bos():
    rec = Recorder()
    score = YarnProtocol(stride=2).score(rec, [arange(1, 11)], 5, bos_id=BOS)
    # L=5: BOS + 4 tokens per window, a window every 2 tokens; only tokens not covered before are scored.
    assert rec.windows == [[0, 1, 2, 3, 4], [0, 3, 4, 5, 6], [0, 5, 6, 7, 8], [0, 7, 8, 9, 10]]
    window_means = [(1.00 + 2.01 + 3.02 + 4.03) / 4, (5.02 + 6.03) / 2, (7.02 + 8.03) / 2, (9.02 + 10.03) / 2]
    assert score.aggregation == MEAN_OF_WINDOW_MEANS and score.windows == 4 and score.tokens == 10
    assert score.nll == pytest.approx(sum(window_means) / 4)  # 6.2725, not the token mean
    assert score.token_nll == pytest.approx((10.06 + 11.05 + 15.05 + 19.05) / 10)
    assert score.nll != pytest.approx(score.token_nll)


def test_yarn_last_window_shorter():
    rec = Recorder()
    score = YarnProtocol(stride=2).score(rec, [arange(1, 12)], 5, bos_id=BOS)
    assert rec.windows[-1] == [0, 9, 10, 11]  # 3 tokens left; only token 11 is new
    assert score.windows == 5 and score.tokens == 11
    assert score.nll == pytest.approx((2.515 + 5.525 + 7.525 + 9.525 + 11.02) / 5)


def test_yarn_stride_equal_to_window_and_truncate():
    score = YarnProtocol(stride=4).score(fake_nll, [arange(1, 11)], 5, bos_id=BOS)
    # Non-overlapping: [BOS,1..4] all scored, [BOS,5..8] all scored, [BOS,9,10] all scored.
    assert score.tokens == 10 and score.windows == 3
    assert score.nll == pytest.approx((10.06 / 4 + 26.06 / 4 + 19.01 / 2) / 3)
    rec = Recorder()
    truncated = YarnProtocol(truncate=True).score(rec, [arange(1, 11), arange(2, 12)], 5, bos_id=BOS)
    assert rec.windows == [[0, 1, 2, 3, 4], [0, 2, 3, 4, 5]]
    assert truncated.nll == pytest.approx((10.06 / 4 + 14.06 / 4) / 2)


def test_yarn_without_start_token():
    rec = Recorder()
    score = YarnProtocol(stride=3).score(rec, [arange(1, 9)], 4)  # no bos_id: no BOS, windows of L tokens
    assert rec.windows == [[1, 2, 3, 4], [4, 5, 6, 7], [7, 8]]
    assert score.tokens == 7  # tokens 2..8, each once
    assert score.nll == pytest.approx(((2.00 + 3.01 + 4.02) / 3 + (5.00 + 6.01 + 7.02) / 3 + 8.00) / 3)
    with pytest.raises(ConfigError, match=r"add_start_token=true needs a bos_id"):
        YarnProtocol(add_start_token=True).score(fake_nll, [arange(1, 9)], 4)
    assert YarnProtocol(stride=3, add_start_token=False).score(fake_nll, [arange(1, 9)], 4, bos_id=BOS).tokens == 7
    # As in the reference, a stride beyond the window leaves the tokens between windows unscored.
    assert YarnProtocol(stride=256, add_start_token=False).score(fake_nll, [arange(1, 9)], 4).tokens == 3


def test_yarn_rejects_documents_shorter_than_a_window():
    with pytest.raises(ConfigError, match=r"docs\[0\]: has 3 tokens, fewer than the 4"):
        YarnProtocol().score(fake_nll, [arange(1, 4)], 5, bos_id=BOS)



def test_longlora_stream_hand_computed():
    rec = Recorder()
    score = LongLoraStreamProtocol(stride=3).score(rec, arange(0, 20), 4)
    # starts range(0, 16, 3) = 0..15 minus the last (15); every prediction of a window is scored.
    assert [w[0] for w in rec.windows] == [0, 3, 6, 9, 12] and all(len(w) == 4 for w in rec.windows)
    # Window i predicts i+1, i+2, i+3 at positions 0, 1, 2: mean i + 2.01.
    assert score.aggregation == MEAN_OF_BATCH_MEANS and score.windows == 5 and score.tokens == 15
    assert score.nll == pytest.approx((2.01 + 5.01 + 8.01 + 11.01 + 14.01) / 5)
    assert score.base == 2.71828 and score.ppl == pytest.approx(2.71828**8.01)
    # Reference batches of 2 windows: [0, 3], [6, 9], [12] -> the partial last batch weighs as much as a full one.
    batched = LongLoraStreamProtocol(stride=3, reference_batch_size=2).score(fake_nll, arange(0, 20), 4, batch_size=3)
    assert batched.nll == pytest.approx((3.51 + 9.51 + 14.01) / 3)
    assert batched.token_nll == pytest.approx(score.token_nll)


def test_longlora_stream_joins_documents_and_needs_two_starts():
    joined = LongLoraStreamProtocol(stride=3).score(fake_nll, [arange(0, 7), arange(7, 20)], 4)
    assert joined.nll == pytest.approx(8.01)
    assert LongLoraStreamProtocol(stride=3).score(fake_nll, arange(0, 8), 4).windows == 1  # L + S + 1 tokens
    with pytest.raises(ConfigError, match=r"7 tokens are too few.*at least length \+ stride \+ 1 = 8"):
        LongLoraStreamProtocol(stride=3).score(fake_nll, arange(0, 7), 4)
    capped = LongLoraStreamProtocol(stride=3, max_tokens=11).score(fake_nll, arange(0, 20), 4)
    assert capped.windows == 2  # starts range(0, 7, 3) = [0, 3, 6] minus the last



def test_sliding_scores_every_token_once():
    rec = Recorder()
    score = SlidingProtocol(stride=2).score(rec, [arange(1, 11)], 4)
    assert rec.windows == [[1, 2, 3, 4], [3, 4, 5, 6], [5, 6, 7, 8], [7, 8, 9, 10]]
    # First window: 3 predictions; then the 2 new tokens of each window, at positions 1 and 2.
    assert score.tokens == 9 and score.windows == 4 and score.aggregation == TOKEN_MEAN
    assert score.nll_sum == pytest.approx(9.03 + 11.03 + 15.03 + 19.03)
    assert score.nll == pytest.approx(54.12 / 9)


def test_sliding_stride_equal_to_window_is_non_overlapping():
    docs = [arange(1, 11), arange(3, 15)]
    score = SlidingProtocol(stride=4).score(fake_nll, docs, 4)
    # Windows [1..4], [5..8], [9, 10] and [3..6], [7..10], [11..14]: each predicts all but its first token.
    chunks = [arange(1, 5), arange(5, 9), arange(9, 11), arange(3, 7), arange(7, 11), arange(11, 15)]
    expected = sum(fake_nll(c[None]).sum().item() for c in chunks)
    assert score.tokens == 3 + 3 + 1 + 3 + 3 + 3 and score.nll_sum == pytest.approx(expected)
    # The last window [9, 10] is shorter: one prediction (10 at position 0).
    assert score.windows == 6
    # A one-token last window has no prediction and is skipped (HF's loss would be NaN there).
    assert SlidingProtocol(stride=4).score(fake_nll, [arange(1, 10)], 4).windows == 2


def test_sliding_default_stride_and_bad_stride():
    assert SlidingProtocol().score(fake_nll, [arange(1, 11)], 4).windows == 4  # stride L // 2 = 2
    with pytest.raises(ConfigError, match=r"protocol\.stride: 5 exceeds the window length 4"):
        SlidingProtocol(stride=5).score(fake_nll, [arange(1, 11)], 4)
    with pytest.raises(ConfigError, match=r"docs\[0\]: has 3 tokens, fewer than the window length 4"):
        SlidingProtocol().score(fake_nll, [arange(1, 4)], 4)



def test_fairseq_non_overlapping():
    rec = Recorder()
    score = FairseqProtocol().score(rec, arange(1, 11), 4)
    # Targets 2..10 in blocks of 4: inputs [1..4] -> 2..5, [5..8] -> 6..9, [9] -> 10 (last block shorter).
    assert rec.windows == [[1, 2, 3, 4, 5], [5, 6, 7, 8, 9], [9, 10]]
    assert score.tokens == 9 and score.windows == 3 and score.aggregation == TOKEN_MEAN
    assert score.nll_sum == pytest.approx(14.06 + 30.06 + 10.00)


def test_fairseq_start_token_scores_the_first_token():
    score = FairseqProtocol().score(fake_nll, arange(1, 11), 4, bos_id=BOS)
    # Stream [</s>, 1..10]: inputs [</s>,1,2,3] -> 1..4, [4..7] -> 5..8, [8, 9] -> 9, 10.
    assert score.tokens == 10 and score.nll_sum == pytest.approx(10.06 + 26.06 + 19.01)


def test_fairseq_sliding_by_one_scores_only_the_last_token():
    rec = Recorder()
    score = FairseqProtocol(context_window=-1).score(rec, arange(1, 11), 4)
    # C = L - 1 = 3: one new token per window, with up to 3 tokens of context before its input token.
    assert rec.windows[:5] == [[1, 2], [1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4, 5], [2, 3, 4, 5, 6]]
    assert rec.windows[-1] == [6, 7, 8, 9, 10]
    assert score.tokens == 9 and score.windows == 9
    # Target v scored at position min(v - 2, 3): 2.00 + 3.01 + 4.02, then 5..10 each at position 3.
    assert score.nll_sum == pytest.approx(9.03 + sum(range(5, 11)) + 6 * 0.03)
    assert FairseqProtocol(context_window=3).score(fake_nll, arange(1, 11), 4).nll == pytest.approx(score.nll)


def test_fairseq_boundaries():
    with pytest.raises(ConfigError, match=r"stream: 3 scorable tokens are fewer than one window of 4"):
        FairseqProtocol().score(fake_nll, arange(1, 5), 4)
    assert FairseqProtocol().score(fake_nll, arange(1, 5), 4, bos_id=BOS).tokens == 4
    with pytest.raises(ConfigError, match=r"context_window: 4 must be smaller than the length 4"):
        FairseqProtocol(context_window=4).score(fake_nll, arange(1, 11), 4)


def test_protocol_score_overflow_and_row_fields():
    score = ProtocolScore(protocol="x", aggregation=TOKEN_MEAN, nll=1e4, nll_sum=1e4, tokens=1, windows=1)
    assert score.ppl == math.inf
    row = score.row_fields()
    assert {"ppl", "nll", "tokens", "bucket_size", "bucket_nll", "bucket_tokens", "aggregation"} <= set(row)



@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


@pytest.fixture(scope="module")
def docs():
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 259, (n,), generator=generator) for n in (40, 47, 52)]


def test_model_nll_fn_matches_full_logits(model, docs):
    ids = torch.stack([d[:24] for d in docs])
    with torch.no_grad():
        logprobs = model(ids).logits.double().log_softmax(-1)
    expected = -logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    got = model_nll_fn(model, chunk_size=7)(ids)
    assert got.shape == (3, 23)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_canonical_equals_score_documents(model, docs):
    score = CanonicalProtocol(bucket_size=8).score(model_nll_fn(model), docs, 32, batch_size=2)
    reference = score_documents(model, docs, 32, bucket_size=8, batch_size=2)
    assert score.tokens == reference.tokens and score.nll_sum == pytest.approx(reference.nll_sum, rel=1e-12)
    assert score.ppl == pytest.approx(reference.ppl, rel=1e-12)
    assert score.bucket_nll == pytest.approx(reference.bucket_nll, rel=1e-12)
    assert score.ppl_low < score.ppl < score.ppl_high


@pytest.mark.parametrize("protocol", [
    YarnProtocol(stride=8), YarnProtocol(truncate=True), LongLoraStreamProtocol(stride=16), SlidingProtocol(stride=8),
    FairseqProtocol(), FairseqProtocol(context_window=24),
], ids=lambda p: f"{p.name}:" + ",".join(f"{k}={v}" for k, v in dataclasses.asdict(p).items() if k != "name"))
def test_protocols_run_on_the_tiny_model(model, docs, protocol):
    score = protocol.score(model_nll_fn(model), docs, 32, bos_id=1, batch_size=3)
    assert score.tokens > 0 and math.isfinite(score.ppl) and 1 < score.ppl < 259 * 10


def test_protocol_invariants_on_the_model(model, docs):
    nll_fn = model_nll_fn(model)
    canonical = CanonicalProtocol(n_bootstrap=0).score(nll_fn, docs, 32)
    # Equal windows make the mean of window means the token mean: yarn --truncate without BOS is canonical.
    yarn = YarnProtocol(truncate=True, add_start_token=False).score(nll_fn, docs, 32)
    assert yarn.nll == pytest.approx(canonical.nll, rel=1e-6)
    # Documents of exactly L tokens: one sliding window each, the canonical window.
    exact = [d[:32] for d in docs]
    assert SlidingProtocol(stride=7).score(nll_fn, exact, 32).nll == pytest.approx(canonical.nll, rel=1e-6)
    # Batching never changes a protocol's windows.
    one = SlidingProtocol(stride=8).score(nll_fn, docs, 32, batch_size=1)
    many = SlidingProtocol(stride=8).score(nll_fn, docs, 32, batch_size=4)
    assert (one.tokens, one.windows) == (many.tokens, many.windows)
    assert many.nll == pytest.approx(one.nll, rel=1e-5)
