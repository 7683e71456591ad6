"""What every retrieval task shares (see the package docstring): the registry, the base config of a depth x length
grid, the prompt's fixed lines and answer parsing. Each task is one module of this package (``passkey``, ``needle``):
a typed, registered config that knows its prompt's fixed lines (``texts``), its keys (``num_keys``), whether its
haystack is real text (``needs_corpus``) and how an answer is judged (``is_correct``), so that prompt building and
the trial runner never ask which task they hold. They are the options of the config group ``eval/retrieval``
(``conf/eval/retrieval/<name>.yaml``), of which a run selects any number."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

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
class GridTask:
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
    has_depth = True  # whether a trial hides its key at a requested depth (else ``depths`` is empty, rows hold None)

    def __post_init__(self):
        where = "retrieval"
        check(self.chat is True or self.chat is False or self.chat == "auto", f"{where}.chat",
              f"must be true, false or auto, got {self.chat!r}")
        check(len(self.lengths) > 0, f"{where}.lengths", "must list at least one length")
        check(len(set(self.lengths)) == len(self.lengths), f"{where}.lengths", f"has duplicates: {self.lengths}")
        for length in self.lengths:
            check(isinstance(length, int) and length >= 2, f"{where}.lengths",
                  f"each must be an integer >= 2, got {length!r}")
        if not self.has_depth:
            check(not self.depths, f"{where}.depths", f"must be empty: {self.name} has no needle depth")
        else:
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

    def judge(self, output: str, answer) -> dict:
        """A trial row's verdict fields: ``parsed`` (the first integer of ``output``) and ``correct``; tasks with
        partial credit add ``score`` in [0, 1] (the accuracy of a cell is the mean score, ``correct`` counting 1)."""
        return {"parsed": parse_integer(output), "correct": self.is_correct(output, answer)}

    def prompt_builder(self, tokenizer, haystack_text: str | None = None, bos_id: int | None = None):
        """The builder of this task's prompts (``lce.eval.retrieval.prompt.PromptBuilder``)."""
        from lce.eval.retrieval.prompt import PromptBuilder

        return PromptBuilder(self, tokenizer, haystack_text, bos_id)


def build_retrieval(spec, where: str = "retrieval"):
    """A retrieval task config from a name, a mapping with ``name``, a config node or an instance."""
    return RETRIEVALS.build(spec, where)


def iter_cells(config) -> Iterator[tuple[int, float | None, int]]:
    """Every (length, depth, trial) of ``config`` in run order; depth None for a task without depth."""
    for length in sorted(config.lengths):
        for depth in config.depths if config.has_depth else [None]:
            for trial in range(config.trials):
                yield length, depth, trial
