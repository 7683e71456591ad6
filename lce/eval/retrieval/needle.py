"""Needle-in-a-haystack in real text (the package docstring has its sources)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from lce.config import check
from lce.eval.retrieval.tasks import RETRIEVALS, GridTask, PromptTexts


@RETRIEVALS.register("needle")
@dataclass(frozen=True)
class NeedleConfig(GridTask):
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
