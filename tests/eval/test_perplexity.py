"""score_documents against NLL computed by hand from the model's full logits."""

import math

import pytest
import torch

from lce.errors import ConfigError
from lce.eval.perplexity import PointScore, score_documents
from tests.conftest import make_tiny_llama

# score_documents accumulates in float64 and the reference sums fp32 log-probs from a differently shaped matmul,
# so agreement is to fp32 rounding, not bitwise.
RTOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


def make_docs(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 259, (n,), generator=generator) for n in lengths]


def reference_nll(model, docs, length):
    """``[n_docs, length - 1]`` NLL of each prediction, from ``model(...).logits`` and ``log_softmax``."""
    ids = torch.stack([doc[:length] for doc in docs])
    with torch.no_grad():
        logprobs = model(ids).logits.double().log_softmax(-1)
    return -logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)


def test_matches_hand_computed_nll_and_buckets(model):
    docs, length, bucket_size = make_docs([20, 31]), 17, 5
    score = score_documents(model, docs, length, bucket_size=bucket_size, chunk_size=7)
    nll = reference_nll(model, docs, length)

    assert score.tokens == 2 * (length - 1)
    assert score.nll_sum == pytest.approx(nll.sum().item(), rel=RTOL)
    assert score.nll == pytest.approx(nll.mean().item(), rel=RTOL)
    assert score.ppl == pytest.approx(math.exp(nll.mean().item()), rel=RTOL)
    # 16 predicting positions in buckets of 5: t = 0-4, 5-9, 10-14, 15.
    assert score.bucket_size == bucket_size
    assert score.bucket_tokens == [10, 10, 10, 2]
    expected = [nll[:, t : t + bucket_size].sum().item() for t in range(0, length - 1, bucket_size)]
    assert score.bucket_nll == pytest.approx(expected, rel=RTOL)
    assert sum(score.bucket_nll) == pytest.approx(score.nll_sum, rel=1e-12)


def test_default_is_one_bucket(model):
    score = score_documents(model, make_docs([12, 12]), 12)
    assert score.bucket_size == 12 and score.bucket_tokens == [22]
    assert score.bucket_nll == pytest.approx([score.nll_sum], rel=1e-12)


def test_loss_is_summed_then_divided_once():
    # Buckets of unequal size: the mean of bucket means (1.5) is not the per-token mean (13 / 7).
    score = PointScore(nll_sum=13.0, tokens=7, bucket_size=3, bucket_nll=[6.0, 6.0, 1.0], bucket_tokens=[3, 3, 1])
    assert score.nll == pytest.approx(13 / 7)
    assert score.ppl == pytest.approx(math.exp(13 / 7))
    assert score.bucket_mean_nll == pytest.approx([2.0, 2.0, 1.0])
    assert sum(score.bucket_mean_nll) / 3 != pytest.approx(score.nll)


def test_huge_nll_gives_infinite_perplexity():
    assert PointScore(1e6, 1, 1, [1e6], [1]).ppl == math.inf


def test_batch_size_does_not_change_the_result(model):
    docs = make_docs([16, 18, 21, 30], seed=3)
    one = score_documents(model, docs, 16, batch_size=1, bucket_size=4)
    three = score_documents(model, docs, 16, batch_size=3, bucket_size=4)
    assert one.tokens == three.tokens and one.bucket_tokens == three.bucket_tokens
    # Batched matmuls may round differently from unbatched ones.
    assert three.nll_sum == pytest.approx(one.nll_sum, rel=RTOL)
    assert three.bucket_nll == pytest.approx(one.bucket_nll, rel=RTOL)


def test_too_short_document_names_its_index(model):
    with pytest.raises(ConfigError, match=r"docs\[1\].*9 tokens.*10"):
        score_documents(model, make_docs([12, 9, 15]), 10)


@pytest.mark.parametrize("kwargs", [{"length": 1}, {"batch_size": 0}, {"bucket_size": 0}], ids=str)
def test_bad_arguments_are_config_errors(model, kwargs):
    with pytest.raises(ConfigError):
        score_documents(model, make_docs([8]), **{"length": 8, **kwargs})
