"""Passkey retrieval (the package docstring has the template and its sources), one key or several ordinal keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lce.config import check
from lce.eval.retrieval.tasks import (
    ANSWER_LEAD,
    KEY_LINE,
    ORDINAL_ANSWER_LEAD,
    ORDINAL_KEY_LINE,
    ORDINAL_QUESTION,
    QUESTION,
    RETRIEVALS,
    TASK_DESCRIPTION,
    GridTask,
    PromptTexts,
    ordinal,
)


@RETRIEVALS.register("passkey")
@dataclass(frozen=True)
class PasskeyConfig(GridTask):
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
