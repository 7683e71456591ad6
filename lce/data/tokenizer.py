"""Tokenizers behind one small interface: ``encode(text) -> int64 tensor`` plus the ids lce needs.

``ByteTokenizer`` is the tiny models' vocabulary: UTF-8 bytes shifted by 3 after pad/eos/unk, exactly the ByT5
mapping, so a saved checkpoint carries a stock ``ByT5Tokenizer`` that vanilla transformers loads. Encoding goes
through numpy (the Python ByT5 tokenizer takes minutes on the 11 MB corpus). ``HFTokenizer`` wraps any
``AutoTokenizer`` for hub models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None

    def encode(self, text: str) -> torch.Tensor: ...

    def decode(self, ids) -> str: ...

    def save(self, path: str | Path) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte + 3; 0 = pad, 1 = eos, 2 = unk (the ByT5 layout, no extra ids)."""

    OFFSET = 3
    vocab_size = 256 + OFFSET
    pad_id, eos_id, unk_id = 0, 1, 2
    bos_id = None
    kind = "bytes"

    def encode(self, text: str) -> torch.Tensor:
        data = np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8)
        return torch.from_numpy(data.astype(np.int64) + self.OFFSET)

    def decode(self, ids) -> str:
        raw = bytes(int(i) - self.OFFSET for i in ids if int(i) >= self.OFFSET)
        return raw.decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> None:
        from transformers import ByT5Tokenizer

        ByT5Tokenizer(extra_ids=0).save_pretrained(str(path))


class HFTokenizer:
    """A Hugging Face tokenizer; ``encode`` adds no special tokens (documents are joined with ``eos_id``)."""

    kind = "hf"

    def __init__(self, tokenizer):
        self.hf = tokenizer
        self.vocab_size = len(tokenizer)
        eos = tokenizer.eos_token_id
        self.eos_id = eos if eos is not None else tokenizer.sep_token_id
        if self.eos_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos or sep token to separate documents")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.bos_id = tokenizer.bos_token_id

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.hf(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids])

    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer carries a chat template (an instruct model's)."""
        return bool(getattr(self.hf, "chat_template", None))

    def chat_prompt(self, user: str, system: str | None = None) -> str:
        """One user turn (after a system turn when ``system`` is given) rendered by the chat template, ending with
        the opened assistant turn (the generation prompt). The text holds the template's special tokens as text
        (``<|im_start|>``); ``encode`` turns them into their ids, as ``apply_chat_template(tokenize=True)`` does,
        and the template, not lce, decides on a start token."""
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": user})
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def save(self, path: str | Path) -> None:
        self.hf.save_pretrained(str(path))
