"""Retrieval evaluations on a depth x length grid: passkey retrieval (one key or several ordinal keys) and
needle-in-a-haystack in real text, with greedy decoding and a resumable JSONL result store.

Passkey (Landmark Attention's template, Mohtashami & Jaggi, arXiv:2305.16300; used by Position Interpolation,
arXiv:2306.15595, and YaRN, arXiv:2309.00071; code: jquesnelle/yarn ``eval/passkey.py``, LongLoRA
``passkey_retrivial.py`` and ChunkLlama ``passkey/test_passkey.py``): the lines

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you
    about the important information there.
    <filler before>
    The pass key is 12345. Remember it. 12345 is the pass key.
    <filler after>
    What is the pass key? The pass key is

joined with ``\\n``, where the filler repeats "The grass is green. The sky is blue. The sun is yellow. Here we go.
There and back again." The references size the prompt in characters and place the key at a random character; here
the prompt is sized in **tokens** and built from whole filler sentences: the haystack has the most sentences whose
prompt still fits in the target length (so the prompt is at most ``length`` tokens and less than one sentence
short of it), and the key line goes after ``round(depth * n)`` of the ``n`` sentences, so the fraction of haystack
tokens before the key is ``depth`` to within one sentence. Keys have exactly ``key_digits`` digits (the references
draw ``randint(1, 50000)``, one to five digits).

Multi-key (yarn ``eval/passkey_hard.py``): ``num_keys`` lines "The 2nd pass key is ... is the 2nd pass key.", the
question asks for one of them ("What is the 2nd pass key? The 2nd pass key is"); the asked key sits at the
requested depth, the others at random sentence boundaries; ordinals follow the order of appearance (English
ordinals; the reference's ``order()`` has typos that make it print "12st" or "3th"). ``haystack="corpus"`` uses real
text, as the reference does with RedPajama/PG19.

Needle-in-a-haystack (ChunkLlama ``needle_in_a_haystack/``, EasyContext ``eval_needle.py``): a needle sentence with a
``key_digits``-digit number inserted at a sentence boundary of real text from an lce data source, the question
appended; the answer is checked by integer or substring match.

Chat prompts (``chat``; ``auto``: when the tokenizer has a chat template, as an instruct model's does): the prompt
above without its answer lead is the one user message, rendered by the tokenizer's chat template with the generation
prompt, and the lead ("The pass key is") starts the assistant's reply, so that greedy decoding continues with the
digits, as in the plain prompt; SmolLM2-135M-Instruct's:

    <|im_start|>system
    You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
    <|im_start|>user
    There is an important info hidden inside a lot of irrelevant text. ...
    What is the pass key?<|im_end|>
    <|im_start|>assistant
    The pass key is

The system turn is the template's default unless ``system`` is set. The whole templated text is encoded at once, so
its special tokens become their ids and its tokens count in the length the haystack is fitted to; no BOS is added
(the template writes one if the model wants it: SmolLM2's BOS is ``<|im_start|>``, which would come twice); for
SmolLM2 the ids are exactly ``apply_chat_template(tokenize=True)``'s followed by the lead's. Generation stops at the
tokenizer's eos (``<|im_end|>``, the end of the assistant's turn). Rows of chat prompts hold ``chat: true`` and the
chat fields in their protocol; plain prompts are as before, and so are their rows.

Decoding is greedy (``max_new_tokens``, stop at eos) with the KV cache; the prefill keeps the logits of the last
position only, so a long prompt never builds ``T x V`` logits. The answer is the first integer in the generated text
(see ``parse_integer``). Every trial is one row appended to a ``lce.eval.sweep.ResultStore``; its identity is the
sweep's ``point_key`` plus ``depth`` and ``trial``, and prompts are a pure function of (seed, task, length, depth,
trial), so a killed evaluation resumes where it stopped, with the same prompts, no row lost or duplicated. As in the
sweep, two runs of one evaluation at once write each trial once (``ResultStore.append_unless_done``), and of a trial
a file already holds twice the first finished row counts (``lce.eval.sweep.first_finished``). No row holds a
non-finite number: a model whose logits are NaN still decodes some tokens, and its trials are ``ok`` and wrong.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from lce.config import check, check_at_least
from lce.errors import ConfigError, LceError
from lce.eval.memory import measure_peak_memory
from lce.eval.shard import Shard, current_shard
from lce.eval.sweep import META_FIELDS, OOM, ResultStore, is_out_of_memory, point_key
from lce.hf.cache import cache_keyword, returned_cache
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

KIND = "retrieval"
GRID_FIELDS = ("lengths", "depths", "trials")
# Fields that change nothing in a plain prompt: a row's protocol holds them only when the chat template was applied.
CHAT_FIELDS = ("chat", "system", "answer_lead")
TRIAL_FIELDS = ("depth", "trial")

GenerateFn = Callable[[torch.Tensor, int], list[int]]

_INTEGER = re.compile(r"(?<![0-9])[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+")
# A unit ends after sentence punctuation followed by whitespace (kept with the unit), or at a newline run.
_UNIT = re.compile(r"[^\n]*?(?:[.!?]+(?=\s|$)|(?=\n)|$)[^\S\n]*\n*")


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


def text_units(text: str) -> list[str]:
    """``text`` cut into sentences and lines, each keeping its trailing whitespace (``"".join(units) == text``)."""
    return [m.group(0) for m in _UNIT.finditer(text) if m.group(0)]


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


def build_retrieval(spec, where: str = "retrieval"):
    """A retrieval task config from a name, a mapping with ``name``, a config node or an instance."""
    return RETRIEVALS.build(spec, where)


@dataclass(frozen=True, eq=False)
class Prompt:
    """One trial's prompt.

    Attributes:
        text: the prompt text (without BOS).
        ids: ``[T]`` int64 token ids, BOS first when one is used.
        answer: the key to retrieve.
        key_offset: index in ``ids`` of the token holding the first character of the asked key's line.
        depth: requested depth.
        depth_actual: haystack tokens before the asked key / all haystack tokens.
        units: haystack sentences (or lines) in the prompt.
        keys: every key in order of appearance (one unless multi-key).
    """

    text: str
    ids: torch.Tensor
    answer: int
    key_offset: int
    depth: float
    depth_actual: float
    units: int
    keys: tuple[int, ...]


class PromptBuilder:
    """Prompts of one retrieval task for one tokenizer, sized in tokens (see the module docstring).

    Args:
        config: a ``PasskeyConfig`` or ``NeedleConfig``.
        tokenizer: ``encode(text) -> int64 tensor`` adding no special tokens of its own (``lce.data`` tokenizers);
            for chat prompts also ``has_chat_template`` and ``chat_prompt(user, system) -> str`` (``HFTokenizer``), and
            ``encode`` must turn the template's special tokens, written as text, into their ids.
        haystack_text: real text for ``needle`` and ``passkey`` with ``haystack=corpus``.
        bos_id: put before every plain prompt (and counted in its length) when given; a chat prompt starts as its
            template says (a template that wants a BOS writes it), so ``bos_id`` is not added to it.

    Attributes:
        chat: whether prompts are chat prompts (``config.chat`` resolved for this tokenizer).
    """

    def __init__(self, config, tokenizer, haystack_text: str | None = None, bos_id: int | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.chat = uses_chat(config, tokenizer)
        self.bos_id = None if self.chat else bos_id
        self._frame = chat_frame(tokenizer, config.system) if self.chat else ("", "")
        self._fitted: dict[int, int] = {}
        if config.needs_corpus:
            if not haystack_text:
                raise ConfigError(f"retrieval={config.name}: needs haystack_text (real text from a data source)")
            self._corpus: list[str] | None = text_units(haystack_text)
        else:
            self._corpus = None

    def units(self, n: int) -> list[str]:
        if self._corpus is None:
            return [FILLER[i % len(FILLER)] + " " for i in range(n)]
        return self._corpus[:n]

    @property
    def max_units(self) -> int | None:
        return None if self._corpus is None else len(self._corpus)

    def identity(self) -> dict:
        """The task's identity in result rows: ``config.identity()``, plus the chat fields for chat prompts."""
        if not self.chat:
            return self.config.identity()
        chat = {name: getattr(self.config, name) for name in CHAT_FIELDS if hasattr(self.config, name)}
        return {**self.config.identity(), **chat, "chat": True}

    def count(self, text: str) -> int:
        """Tokens of ``text`` as a prompt (BOS included)."""
        return self.tokenizer.encode(text).numel() + (self.bos_id is not None)

    def text(self, lines: list[str], lead: str) -> str:
        """The prompt text of ``_lines``: joined with newlines; for a chat prompt, the lines with the question
        without its answer lead as the user's message, then the lead opening the assistant's reply."""
        if not self.chat:
            return "\n".join(lines)
        question = lines[-1][: len(lines[-1]) - len(lead)].rstrip() if lead else lines[-1]
        head, tail = self._frame
        return head + "\n".join([*lines[:-1], question]) + tail + lead

    def _token_at(self, ids: torch.Tensor, char: int) -> int:
        """Index in ``ids`` (a prompt's, BOS first when used) of the token holding character ``char`` of its text,
        by bisection on the length of decoded prefixes. Counting the tokens of the text before ``char`` would be
        off by one when a BPE tokenizer splits the whitespace there differently at the end of a text (" \\n" one
        token) than inside it (" ", "\\n")."""
        start = int(self.bos_id is not None)
        low, high = start, ids.numel()  # decode(ids[start:low]) ends at or before char; decode(ids[start:high]) after
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if len(self.tokenizer.decode(ids[start:mid])) <= char else (low, mid)
        return low

    def _layout(self, rng: random.Random, n: int, depth: float) -> tuple[list[int], list[int], int]:
        """Keys, their unit positions (ascending) and the index of the asked one."""
        config = self.config
        num_keys = getattr(config, "num_keys", 1)
        target = int(depth * n + 0.5)
        others = [p for p in range(n + 1) if p != target]
        if len(others) < num_keys - 1:
            raise ConfigError(f"retrieval.num_keys: {num_keys} keys need at least {num_keys} sentence boundaries, "
                              f"the prompt has {n + 1}")
        positions = sorted([target, *rng.sample(others, num_keys - 1)])
        low, high = 10 ** (config.key_digits - 1), 10**config.key_digits - 1
        keys: list[int] = []
        while len(keys) < num_keys:
            key = rng.randint(low, high)
            if key not in keys or high - low + 1 < num_keys:
                keys.append(key)
        return keys, positions, positions.index(target)

    def _lines(self, n: int, keys: list[int], positions: list[int], asked: int) -> tuple[list[str], int, str]:
        """The plain prompt's lines (the question last), the index of the asked key's line and the answer lead the
        question ends with."""
        config = self.config
        units = self.units(n)
        if isinstance(config, NeedleConfig):
            head, needles, question = config.preamble, [config.needle.format(key=k) for k in keys], config.question
            lead = config.answer_lead
        elif len(keys) == 1:
            head, needles, question, lead = TASK_DESCRIPTION, [KEY_LINE.format(key=keys[0])], QUESTION, ANSWER_LEAD
        else:
            head = TASK_DESCRIPTION
            needles = [ORDINAL_KEY_LINE.format(nth=ordinal(i + 1), key=k) for i, k in enumerate(keys)]
            question = ORDINAL_QUESTION.format(nth=ordinal(asked + 1))
            lead = ORDINAL_ANSWER_LEAD.format(nth=ordinal(asked + 1))
        lines = [head] if head else []
        previous, asked_line = 0, -1
        for i, (position, needle) in enumerate(zip(positions, needles)):
            lines.append("".join(units[previous:position]))
            if i == asked:
                asked_line = len(lines)
            lines.append(needle)
            previous = position
        lines += ["".join(units[previous:n]), question]
        return lines, asked_line, lead

    @property
    def min_units(self) -> int:
        """Fewest haystack units: one sentence boundary per key."""
        return getattr(self.config, "num_keys", 1) - 1

    def _fit(self, length: int) -> int:
        """The most haystack units whose prompt (with a probe key at depth 0.5) fits in ``length`` tokens."""
        if length in self._fitted:
            return self._fitted[length]
        probe = random.Random(f"fit:{self.config.seed}:{length}")

        def size(n: int) -> int:
            keys, positions, asked = self._layout(probe, n, 0.5)
            lines, _, lead = self._lines(n, keys, positions, asked)
            return self.count(self.text(lines, lead))

        low, limit = self.min_units, self.max_units
        if limit is not None and limit < low:
            raise ConfigError(f"retrieval: the haystack text has {limit} sentences, fewer than the {low} needed")
        smallest = size(low)
        if smallest > length:
            raise ConfigError(f"retrieval.lengths: {length} tokens cannot hold the {self.config.name} prompt, which "
                              f"needs {smallest} tokens with the least haystack")
        # Exponential search for an upper bound, then bisection: the prompt grows with every unit.
        high = max(1, 2 * low)
        while (limit is None or high <= limit) and size(high) <= length:
            low, high = high, high * 2
        if limit is not None and high > limit:
            if size(limit) <= length:
                raise ConfigError(f"retrieval: the haystack text ({limit} sentences) is too short for {length} "
                                  "tokens; pass more text")
            high = limit
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if size(mid) <= length else (low, mid)
        self._fitted[length] = low
        return low

    def prompt(self, length: int, depth: float, trial: int) -> Prompt:
        """The prompt of one trial: a pure function of (task, seed, length, depth, trial) and the tokenizer."""
        rng = random.Random(f"{self.config.name}:{self.config.seed}:{length}:{float(depth)!r}:{trial}")
        n = self._fit(length)
        while True:
            state = rng.getstate()
            keys, positions, asked = self._layout(rng, n, depth)
            lines, asked_line, lead = self._lines(n, keys, positions, asked)
            text = self.text(lines, lead)
            ids = self.tokenizer.encode(text)
            if self.bos_id is not None:
                ids = torch.cat([torch.tensor([self.bos_id], dtype=ids.dtype), ids])
            # Another key (or key position) can tokenize longer than the probe: drop a unit and redraw the same keys.
            if ids.numel() <= length or n == self.min_units:
                break
            n -= 1
            rng.setstate(state)
        key_char = len(self._frame[0]) + sum(len(line) + 1 for line in lines[:asked_line])
        units = self.units(n)
        before = self.tokenizer.encode("".join(units[: positions[asked]])).numel()
        total = self.tokenizer.encode("".join(units)).numel()
        return Prompt(
            text=text, ids=ids, answer=keys[asked], key_offset=self._token_at(ids, key_char),
            depth=float(depth), depth_actual=before / total if total else 0.0, units=n, keys=tuple(keys),
        )


def uses_chat(config, tokenizer) -> bool:
    """Whether ``config``'s prompts are chat prompts for ``tokenizer`` (``config.chat`` resolved).

    Raises:
        ConfigError: ``chat=true`` with a tokenizer that has no chat template.
    """
    has_template = bool(getattr(tokenizer, "has_chat_template", False))
    if config.chat is True and not has_template:
        raise ConfigError(f"retrieval.chat: true needs a tokenizer with a chat template; this "
                          f"{type(tokenizer).__name__} has none (set chat to false or auto)")
    return has_template if config.chat == "auto" else bool(config.chat)


_MARKER = "\x00lce user message\x00"


def chat_frame(tokenizer, system: str | None = None) -> tuple[str, str]:
    """The chat template's text before and after a user message (the generation prompt included), so that a chat
    prompt is ``head + message + tail``: the template rendered around a marker message, cut at the marker.

    Raises:
        ConfigError: the template does not write the message verbatim, once (it edits or repeats it).
    """
    rendered = tokenizer.chat_prompt(_MARKER, system=system)
    if rendered.count(_MARKER) != 1:
        raise ConfigError("retrieval.chat: the tokenizer's chat template does not write the user message verbatim "
                          "once, so the prompt cannot be sized; set chat to false")
    head, tail = rendered.split(_MARKER)
    return head, tail


def greedy_generate(
    model: nn.Module, ids: torch.Tensor, max_new_tokens: int, eos_id: int | None = None,
    device: torch.device | str | None = None,
) -> list[int]:
    """Greedy continuation of ``ids [T]`` with the KV cache; the prefill keeps only the last position's logits.

    Returns:
        The generated token ids (at most ``max_new_tokens``; ``eos_id`` ends generation and is not returned).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    generated: list[int] = []
    keyword = cache_keyword(model)
    with torch.inference_mode():
        out = model(input_ids=ids[None].to(device), use_cache=True, logits_to_keep=1)
        for step in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            if token == eos_id:
                break
            generated.append(token)
            if step + 1 < max_new_tokens:
                step_ids = torch.tensor([[token]], device=device)
                out = model(input_ids=step_ids, use_cache=True, **{keyword: returned_cache(out)})
    return generated


def model_generate_fn(
    model: nn.Module, eos_id: int | None = None, device: torch.device | str | None = None
) -> GenerateFn:
    """``generate(ids [T], max_new_tokens) -> list[int]`` by ``greedy_generate`` on ``model``."""
    return lambda ids, max_new_tokens: greedy_generate(model, ids, max_new_tokens, eos_id, device)


def retrieval_key(row: dict) -> str:
    """Identity of one trial: ``point_key`` (run, method, params, model, length, seed, protocol) + depth and trial."""
    missing = [k for k in TRIAL_FIELDS if k not in row]
    if missing:
        raise ConfigError(f"retrieval row lacks field(s) {', '.join(missing)}")
    return point_key(row) + json.dumps({k: row[k] for k in TRIAL_FIELDS}, sort_keys=True, separators=(",", ":"))


def _trial_key(row: dict) -> str | None:
    """``retrieval_key`` of a retrieval row; None for the rows of other evaluations a store may hold."""
    return retrieval_key(row) if row.get("kind") == KIND else None


def is_correct(config, output: str, answer: int) -> bool:
    """Whether ``output`` retrieves ``answer`` under the task's match rule."""
    if getattr(config, "match", "integer") == "substring":
        return str(answer) in output
    return parse_integer(output) == answer


def _stamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_retrieval(
    generate_fn: GenerateFn,
    tokenizer,
    config,
    store: ResultStore | str | Path,
    *,
    meta: dict,
    haystack_text: str | None = None,
    bos_id: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    shard: Shard | None = None,
) -> list[dict]:
    """Run every (length, depth, trial) of ``config`` not yet in ``store``, appending one row per trial.

    Under a multi-process launcher only the main process runs the trials and writes ``store`` (trials are not
    shared out), the others wait and get its rows, so no trial is run or written twice.

    Args:
        generate_fn: ``generate(ids [T], max_new_tokens) -> list[int]``; ``model_generate_fn(model, eos_id)``.
        tokenizer: an ``lce.data`` tokenizer (``encode``/``decode``).
        config: a ``PasskeyConfig`` or ``NeedleConfig``.
        store: the JSONL result file (or its path).
        meta: fields written into every row; must hold run, method, params, model and seed; an optional
            ``protocol`` dict is merged into the task's identity (e.g. the data source of the haystack).
        haystack_text: real text (``needle``, ``passkey`` with ``haystack=corpus``); see ``corpus_text``.
        bos_id: put before every plain prompt when given (not before a chat prompt: see ``PromptBuilder``).
        device: where memory is measured; None: CUDA when available.
        progress: show a progress bar.
        shard: this process's place among several; None: ``lce.eval.shard.current_shard()``.

    Returns:
        Every finished row of this identity in the store (earlier runs' and new; of a trial written twice, the
        first), ordered by length, depth, trial; the same on every process and in every run that wrote concurrently.

    Raises:
        LceError: ``store`` cannot be written (``ResultStore.check_writable``, before running any trial).

    Row schema: the ``meta`` fields, ``protocol`` (``PromptBuilder.identity()`` + meta's protocol), ``kind``
    ("retrieval"), ``task``, ``length``, ``depth``, ``trial``, ``status`` ("ok" | "oom"), ``prompt_tokens``,
    ``key_offset``, ``depth_actual``, ``answer``, ``output`` (decoded generation), ``parsed`` (its first integer),
    ``correct``, ``seconds``, ``peak_mem_mb``, ``mem_kind``, ``time`` and, for OOM, ``error``. After an OOM, the
    remaining trials of that length and longer are recorded as OOM without running.
    """
    missing = [k for k in META_FIELDS if k not in meta and k != "protocol"]
    check(not missing, "meta", f"missing identity field(s) {', '.join(missing)}")
    shard = shard if shard is not None else current_shard()
    if not shard.is_main:
        rows = shard.broadcast(None)
        if isinstance(rows, str):
            raise LceError(f"retrieval failed on the main process: {rows}")
        return rows
    try:
        rows = _run_missing_trials(generate_fn, tokenizer, config, store, meta, haystack_text, bos_id, device,
                                   progress)
    except BaseException as e:
        shard.broadcast(f"{type(e).__name__}: {e}")  # the other processes wait for the rows: release them
        raise
    return shard.broadcast(rows)


def _run_missing_trials(generate_fn: GenerateFn, tokenizer, config, store: ResultStore | str | Path, meta: dict,
                        haystack_text: str | None, bos_id: int | None, device, progress: bool) -> list[dict]:
    store = store if isinstance(store, ResultStore) else ResultStore(store)
    store.check_writable()
    builder = PromptBuilder(config, tokenizer, haystack_text, bos_id)
    base = {**meta, "protocol": {**builder.identity(), **meta.get("protocol", {})}, "kind": KIND,
            "task": config.name}
    identity = point_key({**base, "length": None})

    done = store.finished(_trial_key)

    cells = list(iter_cells(config))
    oom_at: int | None = None
    bar = tqdm(cells, desc=f"{config.name} retrieval", unit="trial", disable=not progress)
    for length, depth, trial in bar:
        trial_id = {**base, "length": length, "depth": depth, "trial": trial}
        key = retrieval_key(trial_id)
        if key in done:
            continue
        bar.set_postfix_str(f"length={length} depth={depth:g}")
        if oom_at is not None and length >= oom_at:
            row = {**trial_id, **_oom_fields(f"not run: length {oom_at} ran out of memory")}
        else:
            prompt = builder.prompt(length, depth, trial)
            row = {**trial_id, **_run_trial(generate_fn, tokenizer, config, prompt, device)}
        # Another run of this evaluation may have written the trial meanwhile: then its row is the result.
        row = done[key] = store.append_unless_done(row, _trial_key)
        if row["status"] == OOM and oom_at is None:
            oom_at = length
    mine = [row for row in done.values() if point_key({**row, "length": None}) == identity]
    return sorted(mine, key=lambda r: (r["length"], r["depth"], r["trial"]))


def _oom_fields(error: str) -> dict:
    return {
        "status": OOM, "prompt_tokens": None, "key_offset": None, "depth_actual": None, "answer": None,
        "output": None, "parsed": None, "correct": None, "seconds": None, "peak_mem_mb": None, "mem_kind": None,
        "time": _stamp(), "error": error,
    }


def _run_trial(generate_fn: GenerateFn, tokenizer, config, prompt: Prompt, device) -> dict:
    start = time.perf_counter()
    error = None
    with measure_peak_memory(device) as mem:
        try:
            generated = generate_fn(prompt.ids, config.max_new_tokens)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            error = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if error is not None:
        return {**_oom_fields(error), "prompt_tokens": prompt.ids.numel(), "answer": prompt.answer,
                "peak_mem_mb": mem.peak_mb, "mem_kind": mem.kind}
    output = tokenizer.decode(generated)
    return {
        "status": "ok", "prompt_tokens": prompt.ids.numel(), "key_offset": prompt.key_offset,
        "depth_actual": prompt.depth_actual, "answer": prompt.answer, "output": output,
        "parsed": parse_integer(output), "correct": is_correct(config, output, prompt.answer),
        "seconds": time.perf_counter() - start, "peak_mem_mb": mem.peak_mb, "mem_kind": mem.kind, "time": _stamp(),
    }


def cell_accuracy(rows: Iterable[dict], label: Callable[[dict], str] = lambda row: str(row["run"])) -> list[dict]:
    """Accuracy per (series, task, length, depth) cell.

    Returns:
        One dict per cell, in order of first appearance: ``series``, ``task``, ``length``, ``depth``, ``trials``
        (finished trials), ``correct``, ``accuracy`` (None when every trial ran out of memory) and ``status``
        ("ok" or "oom").
    """
    cells: dict[tuple, dict] = {}
    for row in rows:
        if row.get("kind") != KIND:
            continue
        key = (label(row), row["task"], int(row["length"]), float(row["depth"]))
        cell = cells.setdefault(key, {"series": key[0], "task": key[1], "length": key[2], "depth": key[3],
                                      "trials": 0, "correct": 0, "oom": 0})
        if row["status"] == "oom":
            cell["oom"] += 1
        else:
            cell["trials"] += 1
            cell["correct"] += bool(row["correct"])
    out = []
    for cell in cells.values():
        oom = cell.pop("oom")
        cell["accuracy"] = cell["correct"] / cell["trials"] if cell["trials"] else None
        cell["status"] = "ok" if cell["trials"] else ("oom" if oom else "ok")
        out.append(cell)
    return out


def corpus_text(source, tokenizer, min_tokens: int, split: str = "test") -> str:
    """Documents of ``source``'s ``split`` (in the source's order) joined with blank lines until the text has at
    least ``min_tokens`` tokens, for needle and corpus-passkey haystacks.

    Raises:
        ConfigError: if the whole split is shorter.
    """
    pieces, tokens = [], 0
    for _, text in source.documents(split):
        pieces.append(text)
        tokens += tokenizer.encode(text).numel()
        if tokens >= min_tokens:
            return "\n\n".join(pieces)
    raise ConfigError(f"data: the {split!r} split of data={source.name} has {tokens} tokens, fewer than the "
                      f"{min_tokens} the longest retrieval length needs")


def iter_cells(config) -> Iterator[tuple[int, float, int]]:
    """Every (length, depth, trial) of ``config`` in run order."""
    for length in sorted(config.lengths):
        for depth in config.depths:
            for trial in range(config.trials):
                yield length, depth, trial
