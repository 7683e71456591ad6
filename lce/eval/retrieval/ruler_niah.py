"""RULER's needle-in-a-haystack tasks (NVIDIA/RULER ``scripts/data/synthetic/niah.py``, variants in
``scripts/synthetic.yaml``; shared parts in ``lce.eval.retrieval.ruler``): needles "One of the special magic
{numbers} for {key} is: {value}." hidden in a haystack, the question asking for the values of one or more keys.

    ruler_niah_single_1   noise haystack,  word key, number value
    ruler_niah_single_2   essay haystack,  word key, number value
    ruler_niah_single_3   essay haystack,  word key, UUID value
    ruler_niah_multikey_1 essay haystack,  4 word keys, one asked
    ruler_niah_multikey_2 needle haystack (every line a distractor needle), word key, number value
    ruler_niah_multikey_3 needle haystack, UUID key, UUID value
    ruler_niah_multivalue essay haystack,  one key with 4 values, all asked
    ruler_niah_multiquery essay haystack,  4 keys, all asked

The prompt (RULER's template; with one value asked, RULER's edits "Some" -> "A", "are all" -> "is", "are" -> "is",
"numbers" -> "number")::

    A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you about the
    number afterwards.
    <context>
    What is the special magic number for <key> mentioned in the provided text? The special magic number for <key>
    mentioned in the provided text is

Haystacks, sized in units (see ``lce.eval.retrieval.ruler``): ``noise``: lines of RULER's noise paragraph, needles as
lines between them; ``essay``: words of the run's real text (repeated when too short, as RULER does), needles inserted
between its sentences and joined with spaces; ``needle``: lines that are needles of random keys and values.
Keys are ``<word>-<word>`` (RULER: adjective-noun), 7-digit numbers or UUIDs (version 4, from the trial's random
generator); values are 7-digit numbers (``key_digits``) or UUIDs. Needles appear in random order.

Depth (lce's grid; RULER draws every needle's depth at random): one asked needle sits after ``round(depth * n)`` of the
``n`` haystack units (lines or sentences); every other needle at a random other boundary, distinct when there are
enough. Keys and values within a prompt are distinct (RULER does not check), so the answer is unambiguous.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from lce.config import check
from lce.eval.retrieval.ruler import (
    NIAH_NEEDLE,
    NIAH_PREFIX,
    NIAH_TEMPLATE,
    NOISE,
    Haystack,
    RulerTask,
    Sample,
    insert_at_sentences,
    insert_lines,
    sentences,
)
from lce.eval.retrieval.tasks import RETRIEVALS

NeedleType = Literal["words", "numbers", "uuids"]
HaystackKind = Literal["noise", "essay", "needle"]


def niah_template(singular: bool) -> tuple[str, str]:
    """RULER's NIAH template and answer prefix, with its edits for a single asked value (``niah.py``)."""
    template, prefix = NIAH_TEMPLATE, NIAH_PREFIX
    if singular:
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix = template.replace(old, new), prefix.replace(old, new)
    return template, prefix


@dataclass(frozen=True)
class RulerNiah(RulerTask):
    """A RULER NIAH task (see the module docstring); the registered variants below differ only in defaults.

    Attributes:
        haystack: ``noise`` (RULER's paragraph), ``essay`` (the run's real text) or ``needle`` (distractor needles).
        key_type, value_type: ``words``, ``numbers`` (``key_digits`` digits) or ``uuids``.
        num_needle_k: keys in the haystack (at least ``num_needle_q``, as RULER makes it).
        num_needle_v: values per key.
        num_needle_q: keys asked for; the answer is all their values.
    """

    name: str = "ruler_niah"
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 5
    key_digits: int = 7
    max_new_tokens: int = 128
    haystack: HaystackKind = "essay"
    key_type: NeedleType = "words"
    value_type: NeedleType = "numbers"
    num_needle_k: int = 1
    num_needle_v: int = 1
    num_needle_q: int = 1

    has_depth: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        where = "retrieval"
        check(self.haystack in ("noise", "essay", "needle"), f"{where}.haystack",
              f"must be noise, essay or needle, got {self.haystack!r}")
        for name in ("key_type", "value_type"):
            check(getattr(self, name) in ("words", "numbers", "uuids"), f"{where}.{name}",
                  f"must be words, numbers or uuids, got {getattr(self, name)!r}")
        for name in ("num_needle_k", "num_needle_v", "num_needle_q"):
            check(getattr(self, name) >= 1, f"{where}.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.num_needle_q <= self.num_needle_k, f"{where}.num_needle_q",
              f"must be <= num_needle_k ({self.num_needle_k}), got {self.num_needle_q}")

    @property
    def needs_corpus(self) -> bool:
        return self.haystack == "essay"

    @property
    def uses_words(self) -> bool:
        return "words" in (self.key_type, self.value_type)

    def max_units(self, haystack: Haystack) -> int | None:
        return None  # an essay shorter than the prompt is repeated, as RULER does

    def _draw(self, rng: random.Random, kind: str, words: tuple[str, ...]) -> str:
        if kind == "numbers":
            return str(rng.randint(10 ** (self.key_digits - 1), 10**self.key_digits - 1))
        if kind == "words":
            return f"{rng.choice(words)}-{rng.choice(words)}"
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def _distinct(self, rng: random.Random, kind: str, count: int, words: tuple[str, ...], taken: set) -> list[str]:
        out: list[str] = []
        while len(out) < count:
            item = self._draw(rng, kind, words)
            if item not in taken:
                taken.add(item)
                out.append(item)
        return out

    def sample(self, rng: random.Random, n: int, depth: float | None, length: int, haystack: Haystack) -> Sample:
        taken: set[str] = set()
        keys = self._distinct(rng, self.key_type, self.num_needle_k, haystack.words, taken)
        values = [self._distinct(rng, self.value_type, self.num_needle_v, haystack.words, taken) for _ in keys]
        needles = [NIAH_NEEDLE.format(type_needle_v=self.value_type, key=k, value=v)
                   for k, vs in zip(keys, values) for v in vs]
        asked = rng.sample(range(self.num_needle_k), self.num_needle_q)
        answers = [v for i in asked for v in values[i]]
        at_depth = NIAH_NEEDLE.format(type_needle_v=self.value_type, key=keys[asked[0]], value=values[asked[0]][0])
        rng.shuffle(needles)
        needles.remove(at_depth)
        if self.haystack == "essay":
            words = haystack.essay * (-(-n // len(haystack.essay)))
            units = sentences(" ".join(words[:n]))
        elif self.haystack == "noise":
            units = [NOISE] * n
        else:
            distractors = self._distinct(rng, self.key_type, n, haystack.words, taken)
            units = [NIAH_NEEDLE.format(type_needle_v=self.value_type, key=key,
                                        value=self._draw(rng, self.value_type, haystack.words)) for key in distractors]
        boundaries = len(units)
        target = int(depth * boundaries + 0.5)
        others = [p for p in range(boundaries + 1) if p != target]
        positions = (rng.sample(others, len(needles)) if len(others) >= len(needles)
                     else [rng.randint(0, boundaries) for _ in needles])
        placed = sorted(zip([target, *positions], [at_depth, *needles]), key=lambda pair: pair[0])
        order = [needle for _, needle in placed]
        if self.haystack == "essay":
            context = insert_at_sentences(units, order, [p for p, _ in placed])
        else:
            context = "\n".join(insert_lines(units, order, [p for p, _ in placed]))
        queries = [keys[i] for i in asked]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        singular = self.num_needle_q * self.num_needle_v == 1
        template, prefix = niah_template(singular)
        kind = self.value_type[:-1] if singular else self.value_type
        body = template.format(type_needle_v=kind, context=context, query=query)
        return Sample(body, prefix.format(type_needle_v=kind, query=query), answers, at_depth, context, tuple(keys))


# RULER's variants (``scripts/synthetic.yaml``): RulerNiah's defaults are niah_single_2's (essay haystack, one word key,
# one 7-digit number); each variant sets what differs.


@RETRIEVALS.register("ruler_niah_single_1")
@dataclass(frozen=True)
class RulerNiahSingle1(RulerNiah):
    """RULER's ``niah_single_1``."""

    name: str = "ruler_niah_single_1"
    haystack: HaystackKind = "noise"


@RETRIEVALS.register("ruler_niah_single_2")
@dataclass(frozen=True)
class RulerNiahSingle2(RulerNiah):
    """RULER's ``niah_single_2``."""

    name: str = "ruler_niah_single_2"


@RETRIEVALS.register("ruler_niah_single_3")
@dataclass(frozen=True)
class RulerNiahSingle3(RulerNiah):
    """RULER's ``niah_single_3``."""

    name: str = "ruler_niah_single_3"
    value_type: NeedleType = "uuids"


@RETRIEVALS.register("ruler_niah_multikey_1")
@dataclass(frozen=True)
class RulerNiahMultikey1(RulerNiah):
    """RULER's ``niah_multikey_1``."""

    name: str = "ruler_niah_multikey_1"
    num_needle_k: int = 4


@RETRIEVALS.register("ruler_niah_multikey_2")
@dataclass(frozen=True)
class RulerNiahMultikey2(RulerNiah):
    """RULER's ``niah_multikey_2``."""

    name: str = "ruler_niah_multikey_2"
    haystack: HaystackKind = "needle"


@RETRIEVALS.register("ruler_niah_multikey_3")
@dataclass(frozen=True)
class RulerNiahMultikey3(RulerNiah):
    """RULER's ``niah_multikey_3``."""

    name: str = "ruler_niah_multikey_3"
    haystack: HaystackKind = "needle"
    key_type: NeedleType = "uuids"
    value_type: NeedleType = "uuids"


@RETRIEVALS.register("ruler_niah_multivalue")
@dataclass(frozen=True)
class RulerNiahMultivalue(RulerNiah):
    """RULER's ``niah_multivalue``."""

    name: str = "ruler_niah_multivalue"
    num_needle_v: int = 4


@RETRIEVALS.register("ruler_niah_multiquery")
@dataclass(frozen=True)
class RulerNiahMultiquery(RulerNiah):
    """RULER's ``niah_multiquery``."""

    name: str = "ruler_niah_multiquery"
    num_needle_k: int = 4
    num_needle_q: int = 4
