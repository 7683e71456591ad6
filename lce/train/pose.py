"""PoSE: positional skip-wise training (Zhu et al. 2023, arXiv:2309.10400, §3.2; reference ``dwzhu-pku/PoSE``
``src/train_pose.py: train_preprocess_function_pose``).

A model is fine-tuned on windows of its training length ``L_c`` whose position ids are spread over a target length
``L_t``: the window is cut into ``N = 2`` chunks; chunk ``i`` keeps consecutive positions but is shifted by a skip
``u_i`` (§3.2: ``Pos(c_i) = {st_i + u_i, ..., st_i + l_i - 1 + u_i}``, ``st_i = l_0 + ... + l_{i-1}``,
``u_0 = 0``, ``u_i ~ U({u_{i-1}, ..., L_t - L_c})``), so every relative distance up to ``L_t - 1`` is trained
while each step costs an ``L_c`` forward. The chunks' text comes from a longer source window and skips ahead too
(``v_i``), so the content around a position skip is not adjacent text.

As in the reference code (two chunks, its "revised" ``lt = 0`` for uniform coverage of large distances):

- chunk 0 length ``r ~ U{1, ..., floor((L_c + 1) / 2)}``, its text ``src[0 : r]``, positions ``0 ... r - 1``;
- chunk 1 text is the ``n - r`` tokens ending at ``e ~ U{n, ..., W}`` of the source window of ``W`` tokens (``n`` =
  tokens of the window), positions ``r + u ... n - 1 + u`` with ``u ~ U{0, ..., L_t - L_c}``.

lce's windows hold ``n = L_c + 1`` tokens (``seq_len`` inputs and the last one's target), the skip is bounded so the
last *input* sits at ``L_c - 1 + u <= L_t - 1``, and the source window is ``pose_source_factor * n`` tokens (the
reference tokenises documents to ``5 * L_c``). Every prediction is scored, also the one across the chunk boundary
(the reference's labels are its inputs). Draws come from a generator seeded by the run seed and the global
micro-batch index, so a resumed or multi-process run sees the same positions.
"""

from __future__ import annotations

import hashlib

import torch


def pose_generator(seed: int, index: int) -> torch.Generator:
    """The generator of global micro-batch ``index``: a stream that depends only on ``(seed, index)``."""
    digest = hashlib.blake2b(f"pose:{seed}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def pose_sample(
    source: torch.Tensor, seq_len: int, target_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One PoSE training window from a source window.

    Args:
        source: ``[W]`` tokens, ``W >= seq_len + 1``.
        seq_len: ``L_c``, input tokens per window.
        target_len: ``L_t > L_c``, the context length the positions should cover.
        generator: source of the three draws (chunk length, text end, position skip).

    Returns:
        ``tokens [seq_len + 1]`` (chunk 0 then chunk 1) and ``position_ids [seq_len]`` of the inputs
        ``tokens[:-1]``.
    """
    n, width = seq_len + 1, source.numel()
    if width < n or target_len <= seq_len:
        raise ValueError(f"need a source of >= {n} tokens and target_len > seq_len, got {width} and "
                         f"{target_len} <= {seq_len}")

    def uniform(low: int, high: int) -> int:  # inclusive, as random.randint in the reference
        return int(torch.randint(low, high + 1, (), generator=generator))

    first = uniform(1, (seq_len + 1) // 2)
    end = uniform(n, width)
    skip = uniform(0, target_len - seq_len)
    tokens = torch.cat([source[:first], source[end - (n - first) : end]])
    positions = torch.arange(n, dtype=torch.long)
    positions[first:] += skip
    return tokens, positions[:seq_len]


def pose_batch(
    sources: torch.Tensor, seq_len: int, target_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pose_sample`` for each row of ``sources [B, W]``: tokens ``[B, seq_len + 1]``, position ids
    ``[B, seq_len]``."""
    samples = [pose_sample(row, seq_len, target_len, generator) for row in sources]
    return torch.stack([t for t, _ in samples]), torch.stack([p for _, p in samples])
