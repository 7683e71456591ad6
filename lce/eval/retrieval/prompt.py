"""Prompts of a retrieval task sized in tokens, plain or in the tokenizer's chat template (see the package
docstring), and the real text their haystacks are cut from."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from lce.errors import ConfigError
from lce.eval.retrieval.tasks import FILLER

# A unit ends after sentence punctuation followed by whitespace (kept with the unit), or at a newline run.
_UNIT = re.compile(r"[^\n]*?(?:[.!?]+(?=\s|$)|(?=\n)|$)[^\S\n]*\n*")


def text_units(text: str) -> list[str]:
    """``text`` cut into sentences and lines, each keeping its trailing whitespace (``"".join(units) == text``)."""
    return [m.group(0) for m in _UNIT.finditer(text) if m.group(0)]


@dataclass(frozen=True, eq=False)
class Prompt:
    """One trial's prompt.

    Attributes:
        text: the prompt text (without BOS).
        ids: ``[T]`` int64 token ids, BOS first when one is used.
        answer: the key to retrieve (RULER's tasks: the list of references, ``lce.eval.retrieval.ruler``).
        key_offset: index in ``ids`` of the token holding the first character of the asked key's line (None for a
            task without depth).
        depth: requested depth (None for a task without depth).
        depth_actual: haystack tokens before the asked key / all haystack tokens (None without depth).
        units: haystack sentences (or lines) in the prompt.
        keys: every key in order of appearance (one unless multi-key).
    """

    text: str
    ids: torch.Tensor
    answer: int | list[str]
    key_offset: int | None
    depth: float | None
    depth_actual: float | None
    units: int
    keys: tuple[int | str, ...]


def largest_fitting(size, low: int, limit: int | None, length: int, too_long: str, too_short: str) -> int:
    """The largest haystack size ``n >= low`` (at most ``limit``) with ``size(n) <= length``, for a ``size`` that
    grows with ``n``: an exponential search for an upper bound, then bisection.

    Raises:
        ConfigError: even ``low`` does not fit (``retrieval.lengths: `` + ``too_long``, formatted with the size at
            ``low``), or ``limit`` still leaves room (``too_short``: the haystack is too short).
    """
    smallest = size(low)
    if smallest > length:
        raise ConfigError("retrieval.lengths: " + too_long.format(smallest))
    high = max(low + 1, 2 * low)
    while (limit is None or high <= limit) and size(high) <= length:
        low, high = high, high * 2
    if limit is not None and high > limit:
        if size(limit) <= length:
            raise ConfigError(too_short)
        high = limit
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if size(mid) <= length else (low, mid)
    return low


def framed(builder, config, tokenizer, haystack_text: str | None, bos_id: int | None) -> None:
    """The fields every prompt builder starts from: its task, tokenizer, whether prompts are chat prompts, the BOS id
    (none before a chat prompt: the template writes its own), the chat frame and the fitted-size cache; refuses a task
    that needs real text without one."""
    builder.config = config
    builder.tokenizer = tokenizer
    builder.chat = uses_chat(config, tokenizer)
    builder.bos_id = None if builder.chat else bos_id
    builder._frame = chat_frame(tokenizer, config.system) if builder.chat else ("", "")
    builder._fitted = {}
    if config.needs_corpus and not haystack_text:
        raise ConfigError(f"retrieval={config.name}: needs haystack_text (real text from a data source)")


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
        framed(self, config, tokenizer, haystack_text, bos_id)
        self._corpus: list[str] | None = text_units(haystack_text) if config.needs_corpus else None

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
        return {**self.config.identity(), **self.config.chat_identity()}

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
        return token_at(self.tokenizer, ids, char, start=int(self.bos_id is not None))

    def _layout(self, rng: random.Random, n: int, depth: float) -> tuple[list[int], list[int], int]:
        """Keys, their unit positions (ascending) and the index of the asked one."""
        config = self.config
        num_keys = config.num_keys
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
        units = self.units(n)
        head, needles, question, lead = self.config.texts(keys, asked)
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
        return self.config.num_keys - 1

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
        self._fitted[length] = largest_fitting(
            size, low, limit, length,
            f"{length} tokens cannot hold the {self.config.name} prompt, which needs {{}} tokens with the least "
            "haystack",
            f"retrieval: the haystack text ({limit} sentences) is too short for {length} tokens; pass more text")
        return self._fitted[length]

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


def token_at(tokenizer, ids: torch.Tensor, char: int, start: int = 0) -> int:
    """Index in ``ids`` (a prompt's; ``start`` = 1 when a BOS comes first) of the token holding character ``char`` of
    its text, by bisection on the length of decoded prefixes. Counting the tokens of the text before ``char`` would be
    off by one when a BPE tokenizer splits the whitespace there differently at the end of a text (" \\n" one token)
    than inside it (" ", "\\n")."""
    low, high = start, ids.numel()  # decode(ids[start:low]) ends at or before char; decode(ids[start:high]) after
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if len(tokenizer.decode(ids[start:mid])) <= char else (low, mid)
    return low


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
