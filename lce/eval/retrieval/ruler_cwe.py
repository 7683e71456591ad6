"""RULER's common words extraction, ``cwe`` (NVIDIA/RULER ``scripts/data/synthetic/common_words_extraction.py``;
shared parts in ``lce.eval.retrieval.ruler``): a numbered list of words in which ``num_cw`` words appear
``freq_cw`` times and the others ``freq_ucw`` times; the model names the ``num_cw`` most common::

    <answered example>
    Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that
    appear most often.
    1. word 2. other 3. word ...
    Question: What are the 10 most common words in the above list? Answer: The top 10 words that appear most often in
    the list are:

As in RULER: distinct words drawn from the word list (``ruler_words()``, in place of ``wonderwords``), the list
shuffled and numbered; one answered example first (``num_fewshot``: 40 words, 10 and 3 repeats); below 4096 tokens
RULER's short setting (example of 20 words, 3 and 1 repeats; the task with 6 and 1 repeats). The haystack unit is one
distinct word (``freq_ucw`` list entries); a length that needs more words than the list has is a ``ConfigError``.
RULER samples its few-shot and list order with a fixed seed; here every draw comes from the trial's generator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from lce.config import check
from lce.eval.retrieval.ruler import CWE_PREFIX, CWE_TEMPLATE, Haystack, RulerTask, Sample
from lce.eval.retrieval.tasks import RETRIEVALS

SHORT = 4096  # RULER's max_seq_length below which the repeats are fewer


@RETRIEVALS.register("ruler_cwe")
@dataclass(frozen=True)
class RulerCwe(RulerTask):
    """RULER's common words extraction (see the module docstring); ``key_digits`` is unused.

    Attributes:
        freq_cw: repeats of each common word (at lengths >= 4096; 6 below).
        freq_ucw: repeats of each uncommon word (at lengths >= 4096; 1 below).
        num_cw: common words, the answer.
        num_fewshot: answered examples before the task.
    """

    name: str = "ruler_cwe"
    depths: list[float] = field(default_factory=list)
    max_new_tokens: int = 120
    freq_cw: int = 30
    freq_ucw: int = 3
    num_cw: int = 10
    num_fewshot: int = 1

    uses_words = True

    def __post_init__(self):
        super().__post_init__()
        check(self.num_cw >= 1, "retrieval.num_cw", f"must be >= 1, got {self.num_cw}")
        check(self.num_fewshot >= 0, "retrieval.num_fewshot", f"must be >= 0, got {self.num_fewshot}")
        check(self.freq_cw > self.freq_ucw >= 1, "retrieval.freq_cw",
              f"must exceed freq_ucw ({self.freq_ucw}, >= 1), got {self.freq_cw}")

    def min_units(self, length: int) -> int:
        return self.num_cw + 1

    def max_units(self, haystack: Haystack) -> int | None:
        return len(haystack.words)

    def _example(self, rng: random.Random, words: tuple[str, ...], n: int, common: int,
                 uncommon: int) -> tuple[str, list[str]]:
        """RULER's ``get_example``: the numbered list and its common words."""
        chosen = rng.sample(words, n)
        answer = chosen[: self.num_cw]
        listed = answer * common + chosen[self.num_cw:] * uncommon
        rng.shuffle(listed)
        return " ".join(f"{i + 1}. {word}" for i, word in enumerate(listed)), answer

    def sample(self, rng: random.Random, n: int, depth: float | None, length: int, haystack: Haystack) -> Sample:
        short = length < SHORT
        shots = []
        for _ in range(self.num_fewshot):
            context, answer = self._example(rng, haystack.words, 20 if short else 40, 3 if short else 10,
                                            1 if short else 3)
            shots.append(CWE_TEMPLATE.format(num_cw=self.num_cw, context=context) + CWE_PREFIX.format(
                num_cw=self.num_cw) + " " + " ".join(f"{i + 1}. {word}" for i, word in enumerate(answer)))
        common, uncommon = (6, 1) if short else (self.freq_cw, self.freq_ucw)
        context, answer = self._example(rng, haystack.words, n, common, uncommon)
        body = "\n".join([*shots, CWE_TEMPLATE.format(num_cw=self.num_cw, context=context)])
        return Sample(body, CWE_PREFIX.format(num_cw=self.num_cw), answer, None, context, tuple(answer))
