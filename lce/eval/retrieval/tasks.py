"""The retrieval tasks (see the package docstring): typed, registered configs that know their prompt's fixed lines
(``texts``), their keys (``num_keys``), whether their haystack is real text (``needs_corpus``) and how an answer is
judged (``is_correct``), so that prompt building and the trial runner never ask which task they hold."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Literal, NamedTuple

from lce.config import check, check_at_least
from lce.registry import Registry

RETRIEVALS: Registry = Registry("retrieval")

TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
ANSWER_LEAD = "The pass key is"
QUESTION = f"What is the pass key? {ANSWER_LEAD}"
ORDINAL_KEY_LINE = "The {nth} pass key is {key}. Remember it. {key} is the {nth} pass key."
ORDINAL_ANSWER_LEAD = "The {nth} pass key is"
ORDINAL_QUESTION = f"What is the {{nth}} pass key? {ORDINAL_ANSWER_LEAD}"

GRID_FIELDS = ("lengths", "depths", "trials")
# Fields that change nothing in a plain prompt: a row's protocol holds them only when the chat template was applied.
CHAT_FIELDS = ("chat", "system", "answer_lead")

_INTEGER = re.compile(r"(?<![0-9])[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+")


def parse_integer(text: str) -> int | None:
    """The first integer in ``text``, or None.

    Rules: ASCII digits only; anything before the first digit is skipped (spaces, punctuation, leading words); the
    number ends at the first non-digit, except that comma thousands separators between groups of exactly three digits
    are read through ("12,345" -> 12345); signs and decimals are not part of it (" -42.5" -> 42).
    """
    match = _INTEGER.search(text)
    return int(match.group(0).replace(",", "")) if match else None


def ordinal(n: int) -> str:
    """English ordinal: 1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st, 22nd, 101st, 111th."""
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


class PromptTexts(NamedTuple):
    """The fixed lines of a task's prompt, around which the haystack is laid.

    Attributes:
        head: the first line (empty: none).
        needles: the key lines, in order of appearance.
        question: the last line, ending with ``lead``.
        lead: the end of the question that starts the answer (empty: the whole question is asked).
    """

    head: str
    needles: list[str]
    question: str
    lead: str


@dataclass(frozen=True)
class _GridConfig:
    """Fields and checks shared by every retrieval task; ``lengths`` in tokens, ``depths`` in [0, 1].

    Attributes:
        chat: wrap the prompt in the tokenizer's chat template (see "Chat prompts" in the module docstring): ``auto``
            when the tokenizer has one (``HFTokenizer.has_chat_template``; ``ByteTokenizer`` has none), ``true``
            (an error without a template) or ``false`` (the plain prompt).
        system: the system message of a chat prompt; None: none (the template's default, if it has one).
    """

    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 5
    key_digits: int = 5
    max_new_tokens: int = 10
    seed: int = 0
    chat: bool | Literal["auto"] = "auto"
    system: str | None = None

    # Not annotated, so not dataclass fields: the fields' order (a row's protocol) stays that of each subclass.
    num_keys = 1  # keys hidden in the haystack (a field of PasskeyConfig, whose multi-key variant has more)
    needs_corpus = False  # whether the haystack is real text (``haystack_text``) rather than filler

    def __post_init__(self):
        where = "retrieval"
        check(self.chat is True or self.chat is False or self.chat == "auto", f"{where}.chat",
              f"must be true, false or auto, got {self.chat!r}")
        check(len(self.lengths) > 0, f"{where}.lengths", "must list at least one length")
        check(len(set(self.lengths)) == len(self.lengths), f"{where}.lengths", f"has duplicates: {self.lengths}")
        for length in self.lengths:
            check(isinstance(length, int) and length >= 2, f"{where}.lengths",
                  f"each must be an integer >= 2, got {length!r}")
        check(len(self.depths) > 0, f"{where}.depths", "must list at least one depth")
        check(len(set(self.depths)) == len(self.depths), f"{where}.depths", f"has duplicates: {self.depths}")
        for depth in self.depths:
            check(0.0 <= depth <= 1.0, f"{where}.depths", f"each must be in [0, 1], got {depth}")
        check_at_least(self, where, 1, "trials", "key_digits", "max_new_tokens")
        check(self.key_digits <= 18, f"{where}.key_digits", f"must be <= 18, got {self.key_digits}")

    def identity(self) -> dict:
        """The task's fields that define what a plain prompt measures: name and parameters, not the grid, nor the
        chat fields (``PromptBuilder.identity`` adds those when the template is applied)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in GRID_FIELDS and f.name not in CHAT_FIELDS}

    def chat_identity(self) -> dict:
        """The ``CHAT_FIELDS`` a chat prompt adds to ``identity()``."""
        return {"chat": True, "system": self.system}

    def texts(self, keys: list[int], asked: int) -> PromptTexts:
        """The prompt's fixed lines for ``keys`` (in order of appearance) when the ``asked``-th one is asked for."""
        raise NotImplementedError

    def is_correct(self, output: str, answer: int) -> bool:
        """Whether ``output`` retrieves ``answer``: its first integer (``parse_integer``) is the key."""
        return parse_integer(output) == answer


@RETRIEVALS.register("passkey")
@dataclass(frozen=True)
class PasskeyConfig(_GridConfig):
    """Passkey retrieval (see the module docstring); ``num_keys > 1`` is the multi-key hard variant.

    Attributes:
        num_keys: ordinal keys in the haystack; one of them (the one at the requested depth) is asked for.
        haystack: ``filler`` (the grass-is-green sentences) or ``corpus`` (real text passed to ``run_retrieval``).
    """

    name: str = "passkey"
    num_keys: int = 1
    haystack: Literal["filler", "corpus"] = "filler"

    @property
    def needs_corpus(self) -> bool:
        """Whether prompts are built from real text (``haystack_text``) rather than filler sentences."""
        return self.haystack == "corpus"

    def __post_init__(self):
        super().__post_init__()
        check(self.num_keys >= 1, "retrieval.num_keys", f"must be >= 1, got {self.num_keys}")
        check(self.haystack in ("filler", "corpus"), "retrieval.haystack",
              f"must be filler or corpus, got {self.haystack!r}")

    def texts(self, keys: list[int], asked: int) -> PromptTexts:
        """Landmark Attention's template with one key; with several, yarn's ``passkey_hard.py`` ordinal keys."""
        if self.num_keys == 1:
            return PromptTexts(TASK_DESCRIPTION, [KEY_LINE.format(key=keys[0])], QUESTION, ANSWER_LEAD)
        nth = ordinal(asked + 1)
        needles = [ORDINAL_KEY_LINE.format(nth=ordinal(i + 1), key=key) for i, key in enumerate(keys)]
        return PromptTexts(TASK_DESCRIPTION, needles, ORDINAL_QUESTION.format(nth=nth),
                           ORDINAL_ANSWER_LEAD.format(nth=nth))


@RETRIEVALS.register("needle")
@dataclass(frozen=True)
class NeedleConfig(_GridConfig):
    """Needle-in-a-haystack in real text (see the module docstring).

    Attributes:
        needle: the inserted sentence; ``{key}`` is replaced by the number.
        question: appended after the haystack, phrased so that the answer is its continuation.
        answer_lead: the end of ``question`` that starts the answer; a chat prompt asks the rest of the question in
            the user's turn and puts this at the start of the assistant's reply. Empty: the whole question is asked.
        preamble: a first line before the haystack; empty for none.
        match: ``integer`` (the first integer of the output equals the key) or ``substring`` (the key's digits occur
            anywhere in the output).
    """

    name: str = "needle"
    key_digits: int = 7
    max_new_tokens: int = 12
    needle: str = "The special magic number is {key}."
    question: str = "What is the special magic number? The special magic number is"
    answer_lead: str = "The special magic number is"
    preamble: str = ""
    match: Literal["integer", "substring"] = "integer"

    needs_corpus: ClassVar[bool] = True  # the needle is hidden in real text

    def __post_init__(self):
        super().__post_init__()
        check("{key}" in self.needle, "retrieval.needle", f"must contain '{{key}}', got {self.needle!r}")
        check(self.match in ("integer", "substring"), "retrieval.match",
              f"must be integer or substring, got {self.match!r}")
        check(self.question.endswith(self.answer_lead), "retrieval.answer_lead",
              f"must be the end of the question {self.question!r} (or empty), got {self.answer_lead!r}")

    def chat_identity(self) -> dict:
        return {**super().chat_identity(), "answer_lead": self.answer_lead}

    def texts(self, keys: list[int], asked: int) -> PromptTexts:
        return PromptTexts(self.preamble, [self.needle.format(key=key) for key in keys], self.question,
                           self.answer_lead)

    def is_correct(self, output: str, answer: int) -> bool:
        """By ``match``: the first integer of ``output`` is the key, or the key's digits occur anywhere in it."""
        if self.match == "substring":
            return str(answer) in output
        return super().is_correct(output, answer)


def build_retrieval(spec, where: str = "retrieval"):
    """A retrieval task config from a name, a mapping with ``name``, a config node or an instance."""
    return RETRIEVALS.build(spec, where)


def iter_cells(config) -> Iterator[tuple[int, float, int]]:
    """Every (length, depth, trial) of ``config`` in run order."""
    for length in sorted(config.lengths):
        for depth in config.depths:
            for trial in range(config.trials):
                yield length, depth, trial
