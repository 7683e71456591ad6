"""RULER's frequent words extraction, ``fwe`` (NVIDIA/RULER ``scripts/data/synthetic/freq_words_extraction.py``;
shared parts in ``lce.eval.retrieval.ruler``): a text of random coded words whose frequencies follow a Zeta
(Zipf) distribution; the model names the three most frequent, the most frequent of all being the noise ``...``::

    Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared
    coded words. ... xkqzpe ... wqjvab ...
    Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently
    appeared words in the above coded text? Answer: According to the coded text above, the three most frequently
    appeared words are:

As in RULER: a vocabulary of ``vocab_size`` distinct random words of ``coded_wordlen`` lowercase letters (-1:
``(length - max_new_tokens) // 50``), shuffled, its first word replaced by ``...``; for ``n`` words the ``k``-th word
appears ``floor(n * k^-alpha / zeta(alpha))`` times, shuffled; the answer is words 2 to 4. The haystack unit is
``n`` (RULER's search steps by ``length // 32``), and ``n`` is at least what makes the 4th word strictly more frequent
than the 5th, so the answer is unambiguous. RULER shuffles with a fixed seed; here every draw comes from the trial's
generator. No depth.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field

from lce.config import check
from lce.errors import ConfigError
from lce.eval.retrieval.ruler import FWE_PREFIX, FWE_TEMPLATE, Haystack, RulerTask, Sample, zeta
from lce.eval.retrieval.tasks import RETRIEVALS


@RETRIEVALS.register("ruler_fwe")
@dataclass(frozen=True)
class RulerFwe(RulerTask):
    """RULER's frequent words extraction (see the module docstring); ``key_digits`` is unused.

    Attributes:
        alpha: the Zeta distribution's exponent (> 1).
        coded_wordlen: letters per coded word.
        vocab_size: distinct coded words; -1: ``(length - max_new_tokens) // 50``, RULER's default.
    """

    name: str = "ruler_fwe"
    depths: list[float] = field(default_factory=list)
    max_new_tokens: int = 50
    alpha: float = 2.0
    coded_wordlen: int = 6
    vocab_size: int = -1

    def __post_init__(self):
        super().__post_init__()
        check(self.alpha > 1.0, "retrieval.alpha", f"must be > 1, got {self.alpha}")
        check(self.coded_wordlen >= 1, "retrieval.coded_wordlen", f"must be >= 1, got {self.coded_wordlen}")
        check(self.vocab_size == -1 or self.vocab_size >= 5, "retrieval.vocab_size",
              f"must be -1 or >= 5, got {self.vocab_size}")

    def vocabulary_size(self, length: int) -> int:
        size = (length - self.max_new_tokens) // 50 if self.vocab_size == -1 else self.vocab_size
        if size < 5:
            raise ConfigError(f"retrieval.lengths: {length} tokens give {self.name} a vocabulary of {size} words "
                              "((length - max_new_tokens) // 50); it needs 5")
        return size

    def counts(self, n: int, size: int) -> list[int]:
        """How often each of the ``size`` vocabulary words appears among ``n`` words."""
        norm = zeta(self.alpha)
        return [int(n * k**-self.alpha / norm) for k in range(1, size + 1)]

    def min_units(self, length: int) -> int:
        n, size = 1, self.vocabulary_size(length)
        while (counts := self.counts(n, size))[3] <= counts[4]:
            n += 1
        return n

    def sample(self, rng: random.Random, n: int, depth: float | None, length: int, haystack: Haystack) -> Sample:
        size = self.vocabulary_size(length)
        vocab: set[str] = set()
        while len(vocab) < size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=self.coded_wordlen)))
        words = sorted(vocab)
        rng.shuffle(words)
        words[0] = "..."  # the most frequent word is noise
        text = [word for word, count in zip(words, self.counts(n, size)) for _ in range(count)]
        rng.shuffle(text)
        context = " ".join(text)
        return Sample(FWE_TEMPLATE.format(context=context), FWE_PREFIX, words[1:4], None, context, tuple(words[1:4]))
