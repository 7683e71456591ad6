"""What RULER's synthetic tasks share (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context
Language Models?", arXiv:2404.06654; code: NVIDIA/RULER ``scripts/data/synthetic/*.py``, prompts in
``scripts/data/synthetic/constants.py``, metrics in ``scripts/eval/synthetic/constants.py``): the noise haystack, the
word list, RULER's prompt templates, its scorers, and the prompt builder that sizes a task's haystack to a length.

Each task family is one module of this package (``ruler_niah``, ``ruler_vt``, ``ruler_cwe``, ``ruler_fwe``) whose
config says how a sample is drawn (``RulerTask.sample``); one registered config per RULER task (``ruler_niah_single_1``
... ``ruler_fwe``), an option of ``eval/retrieval`` like ``passkey``, whose rows go to the same store and report.

Generated offline and deterministically: a prompt is a pure function of (task, seed, length, depth, trial) and the
tokenizer (``random.Random`` seeded with their text, as passkey's). Nothing is downloaded:

- the noise haystack is RULER's fixed paragraph ``NOISE``;
- RULER's "essay" haystack (Paul Graham's essays) is the run's own real text (``haystack_text``: the ``data=`` source,
  the stdlib by default), cut into words and sentences as RULER cuts the essays;
- RULER's word lists (``wonderwords``' nouns, adjectives and verbs) are replaced by ``ruler_words()``: the distinct
  lowercase words of 4 to 10 letters that occur at least twice in the running Python's standard-library source
  (``lce.data.StdlibData``), sorted (8 354 on CPython 3.11): English words and identifiers, where RULER's are
  English only. It changes with the Python version, so rows record its fingerprint (``words`` in their protocol) and
  never mix word lists.

Lengths are counted as RULER counts them: the prompt's tokens (by the model's tokenizer, with its chat template and
answer prefix, plus the BOS lce puts first) **plus ``max_new_tokens``** must not exceed the length; the haystack has
the most units (noise paragraphs, essay words, distractor needles, list words, coded words: see each task) for which
it fits. RULER searches the same largest size and, when a sample overflows, drops ``incremental`` units (5 to 500);
here the search is to one unit, so the tolerance is: ``length - (one haystack unit + the difference between this
sample's needles and the probe's) < prompt_tokens + max_new_tokens <= length``. Below RULER's smallest haystack a
length is a ``ConfigError``.

Chat prompts (``chat``: ``auto`` when the tokenizer has a template): RULER writes its model templates around the task
text and appends the answer prefix after them (``scripts/data/prepare.py``: ``model_template.format(task_template)
+ answer_prefix``); here the tokenizer's own template plays that part: the task text is the user message and the
answer prefix, verbatim (leading space included), starts the assistant's reply. The plain prompt is RULER's ``base``
template: the task text followed by the answer prefix. Two RULER quirks of its model templates are not reproduced:
its NIAH edits for one value ("are" -> "is") also rewrite the model template, and its CWE example carries the model
template inside the prompt; here the chat template wraps the whole task text (examples included) once.

Scoring (RULER's ``postprocess_pred`` then its metric): ``string_match_all`` (the fraction of references found in the
prediction, case-insensitive) for every synthetic task; ``string_match_part`` (1 if any is found; RULER's QA metric)
is here for completeness. A row's ``score`` is the sample's metric in [0, 1], ``correct`` is ``score == 1``, and a
cell's accuracy is the mean score, which is RULER's task score / 100.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch

from lce.eval.retrieval.prompt import Prompt, framed, largest_fitting, token_at
from lce.eval.retrieval.tasks import GridTask

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# RULER's scripts/data/synthetic/constants.py: the task template (with {context} and {query}) and the answer prefix.
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will quiz "
    "you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for {query} "
    "mentioned in the provided text?"
)
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned the "
    "value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that "
    "appear most often.\n{context}\nQuestion: What are the {num_cw} most common words in the above list?"
)
CWE_PREFIX = " Answer: The top {num_cw} words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

_CONTROL = re.compile(r"[\x00-\x1f]")
_WORD = re.compile(r"(?<![A-Za-z_])[a-z]{4,10}(?![A-Za-z_0-9])")


def postprocess_pred(text: str) -> str:
    """RULER's ``postprocess_pred``: strip, control characters to newlines, strip again."""
    return _CONTROL.sub("\n", text.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER's ``string_match_all`` of one sample: the fraction of ``references`` that occur in ``prediction``,
    case-insensitively (RULER averages it over samples and reports percent)."""
    prediction = prediction.lower()
    return sum(r.lower() in prediction for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """RULER's ``string_match_part`` of one sample: 1 if any of ``references`` occurs in ``prediction``
    (case-insensitive), else 0."""
    prediction = prediction.lower()
    return float(any(r.lower() in prediction for r in references))


@functools.cache
def ruler_words() -> tuple[str, ...]:
    """The word list RULER's ``wonderwords`` lists are replaced by (see the module docstring): the distinct lowercase
    words of 4 to 10 letters that occur at least twice in the standard-library source, sorted."""
    from lce.data.sources import StdlibData

    counts: Counter[str] = Counter()
    for _, path in StdlibData().files():
        counts.update(_WORD.findall(path.read_text(encoding="utf-8", errors="ignore")))
    return tuple(sorted(word for word, count in counts.items() if count >= 2))


def words_fingerprint(words: tuple[str, ...]) -> str:
    """``stdlib-<count>-<sha256 prefix>`` of a word list, written into rows so that word lists never mix."""
    return f"stdlib-{len(words)}-{hashlib.sha256(chr(10).join(words).encode()).hexdigest()[:12]}"


def essay_words(text: str) -> list[str]:
    """``text`` cut as RULER cuts its essays: whitespace runs to one space, split at spaces."""
    return re.sub(r"\s+", " ", text).strip().split(" ")


def sentences(text: str) -> list[str]:
    """Sentences of whitespace-normalised ``text``: cut after ``.``, ``!`` or ``?`` followed by a space (RULER uses
    NLTK's ``sent_tokenize``, which also knows abbreviations; this needs no model)."""
    return [s for s in re.split(r"(?<=[.!?]) ", text.strip()) if s]


def insert_at_sentences(sents: list[str], needles: list[str], positions: list[int]) -> str:
    """RULER's essay insertion: ``needles`` (in order) after ``positions`` (ascending) sentences, every piece joined
    with one space (an empty stretch between two needles leaves two spaces, as in RULER)."""
    bounds = [0, *positions, len(sents)]
    parts = []
    for i in range(1, len(bounds)):
        parts.append(" ".join(sents[bounds[i - 1]: bounds[i]]))
        if i - 1 < len(needles):
            parts.append(needles[i - 1])
    return " ".join(parts)


def insert_lines(lines: list[str], needles: list[str], positions: list[int]) -> list[str]:
    """``lines`` with ``needles[i]`` before ``lines[positions[i]]`` (``len(lines)``: at the end)."""
    out = list(lines)
    for position, needle in sorted(zip(positions, needles), key=lambda pair: pair[0], reverse=True):
        out.insert(position, needle)
    return out


def zeta(alpha: float) -> float:
    """Riemann zeta for ``alpha > 1`` (FWE's normalisation, ``scipy.special.zeta`` in RULER): the partial sum to
    ``N = 1000`` plus the Euler-Maclaurin tail, accurate to ~1e-15 relative."""
    n = 1000
    head = sum(k**-alpha for k in range(1, n))
    return head + n ** (1 - alpha) / (alpha - 1) + 0.5 * n**-alpha + alpha * n ** (-alpha - 1) / 12


class Sample(NamedTuple):
    """One drawn prompt of a RULER task, before the chat template.

    Attributes:
        body: the task text (RULER's ``input``): template with context and query, without the answer prefix.
        lead: RULER's answer prefix, which the model continues.
        answers: the references the scorer looks for.
        needle: the text of the needle at the requested depth (searched in ``context``); None for tasks without depth.
        context: the haystack with its needles, as it appears in ``body``.
        keys: the needles' keys (NIAH), variables (VT) or the answers, for the row.
    """

    body: str
    lead: str
    answers: list[str]
    needle: str | None
    context: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class RulerTask(GridTask):
    """Fields and behaviour shared by RULER's tasks; each task module subclasses it (see the module docstring).

    A subclass draws a sample from a haystack size ``n`` (``sample``), says the smallest ``n`` (``min_units``) and
    the largest (``max_units``, None: unbounded); the builder finds the ``n`` of each length.
    """

    lengths: list[int] = field(default_factory=lambda: [4096, 8192, 16384])
    trials: int = 25

    has_depth: ClassVar[bool] = False
    uses_words: ClassVar[bool] = False  # whether samples draw from ``ruler_words()`` (rows then record its fingerprint)

    def sample(self, rng: random.Random, n: int, depth: float | None, length: int, haystack: Haystack) -> Sample:
        """One sample with haystack size ``n``; ``length`` only for RULER's length-dependent settings."""
        raise NotImplementedError

    def min_units(self, length: int) -> int:
        return 1

    def max_units(self, haystack: Haystack) -> int | None:
        return None

    def judge(self, output: str, answer: list[str]) -> dict:
        """RULER's verdict: the postprocessed prediction (``parsed``), its ``string_match_all`` score and whether
        it found every reference (``correct``)."""
        parsed = postprocess_pred(output)
        score = string_match_all(parsed, answer)
        return {"parsed": parsed, "correct": score == 1.0, "score": score}

    def is_correct(self, output: str, answer: list[str]) -> bool:
        return self.judge(output, answer)["correct"]

    def prompt_builder(self, tokenizer, haystack_text: str | None = None, bos_id: int | None = None):
        return RulerPromptBuilder(self, tokenizer, haystack_text, bos_id)


@dataclass(frozen=True)
class Haystack:
    """What samples are drawn from: the word list (when the task uses it), the real text's words (essay), the
    tokenizer's count of a text's tokens (no BOS, no template: RULER's ``text_to_tokens``) and a cache for what a
    task derives from them once (VT's in-context example)."""

    words: tuple[str, ...] = ()
    essay: tuple[str, ...] = ()
    count: Callable[[str], int] | None = None
    cache: dict = field(default_factory=dict, compare=False)


class RulerPromptBuilder:
    """Prompts of one RULER task for one tokenizer, sized as RULER sizes them (see the module docstring); the same
    interface as ``PromptBuilder`` (``prompt``, ``identity``, ``chat``).

    Args:
        config: a ``RulerTask``.
        tokenizer: an ``lce.data`` tokenizer (``encode``/``decode``; for chat prompts also the chat template).
        haystack_text: real text for the essay haystack (``config.needs_corpus``).
        bos_id: put before every plain prompt (and counted) when given; not before a chat prompt.
    """

    def __init__(self, config: RulerTask, tokenizer, haystack_text: str | None = None, bos_id: int | None = None):
        framed(self, config, tokenizer, haystack_text, bos_id)
        essay = tuple(essay_words(haystack_text)) if config.needs_corpus else ()
        self.haystack = Haystack(ruler_words() if config.uses_words else (), essay,
                                 lambda text: tokenizer.encode(text).numel())

    def identity(self) -> dict:
        """``config.identity()``, the word list's fingerprint when the task uses it, and the chat fields."""
        identity = self.config.identity()
        if self.config.uses_words:
            identity["words"] = words_fingerprint(self.haystack.words)
        return {**identity, **self.config.chat_identity()} if self.chat else identity

    def text(self, sample: Sample) -> str:
        """The prompt text: RULER's base template (body + answer prefix) or the chat template around the body."""
        head, tail = self._frame
        return head + sample.body + tail + sample.lead

    def encode(self, text: str) -> torch.Tensor:
        ids = self.tokenizer.encode(text)
        if self.bos_id is not None:
            ids = torch.cat([torch.tensor([self.bos_id], dtype=ids.dtype), ids])
        return ids

    def total(self, sample: Sample) -> int:
        """RULER's length of a sample: its prompt's tokens plus the tokens to generate."""
        return self.encode(self.text(sample)).numel() + self.config.max_new_tokens

    def fit(self, length: int) -> int:
        """The largest haystack size whose probe sample (seeded by task, seed and length) fits ``length``."""
        if length in self._fitted:
            return self._fitted[length]
        config = self.config

        def size(n: int) -> int:
            probe = random.Random(f"fit:{config.name}:{config.seed}:{length}")
            return self.total(config.sample(probe, n, 0.5 if config.has_depth else None, length, self.haystack))

        limit = config.max_units(self.haystack)
        self._fitted[length] = largest_fitting(
            size, config.min_units(length), limit, length,
            f"{length} tokens cannot hold the {config.name} prompt and its {config.max_new_tokens} new tokens, which "
            "need {} with the least haystack",
            f"retrieval={config.name}: {limit} haystack units (the most there are) do not fill {length} tokens")
        return self._fitted[length]

    def prompt(self, length: int, depth: float | None, trial: int) -> Prompt:
        """The prompt of one trial: a pure function of (task, seed, length, depth, trial) and the tokenizer."""
        config = self.config
        depth_text = "-" if depth is None else repr(float(depth))
        n = self.fit(length)
        while True:
            rng = random.Random(f"{config.name}:{config.seed}:{length}:{depth_text}:{trial}")
            sample = config.sample(rng, n, depth, length, self.haystack)
            text = self.text(sample)
            ids = self.encode(text)
            # This sample's needles can tokenize longer than the probe's: one unit less, the same draws.
            if ids.numel() + config.max_new_tokens <= length or n == config.min_units(length):
                break
            n -= 1
        key_offset = depth_actual = None
        if sample.needle is not None:
            at = sample.context.index(sample.needle)
            start = len(self._frame[0]) + sample.body.index(sample.context)
            key_offset = token_at(self.tokenizer, ids, start + at, start=int(self.bos_id is not None))
            before = self.tokenizer.encode(sample.context[:at]).numel()
            depth_actual = before / max(1, self.tokenizer.encode(sample.context).numel())
        return Prompt(text=text, ids=ids, answer=sample.answers, key_offset=key_offset,
                      depth=None if depth is None else float(depth), depth_actual=depth_actual, units=n,
                      keys=sample.keys)
