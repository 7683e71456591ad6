"""PoSE position ids against the construction of Zhu et al. 2023 (arXiv:2309.10400 §3.2) and its reference code, and
the training loop feeding them to the model with an explicit mask."""


import pytest
import torch

from lce.errors import ConfigError
from lce.train import TrainConfig, make_batch, train
from lce.train.data import blocks_from_stream
from lce.train.pose import pose_batch, pose_generator, pose_sample
from tests.conftest import logits, make_tiny_llama


def draws_of(seq_len: int, source_len: int, target_len: int, generator: torch.Generator) -> tuple[int, int, int]:
    """The draws ``pose_sample`` makes, in its order, from a copy of ``generator``'s state."""
    g = torch.Generator().set_state(generator.get_state())
    first = int(torch.randint(1, (seq_len + 1) // 2 + 1, (), generator=g))
    end = int(torch.randint(seq_len + 1, source_len + 1, (), generator=g))
    skip = int(torch.randint(0, target_len - seq_len + 1, (), generator=g))
    return first, end, skip


def test_hand_worked_example():
    # L_c = 8 inputs (n = 9 tokens), L_t = 64, source 0..99. Chunk 0 = the first r tokens at positions 0..r-1;
    # chunk 1 = the n - r tokens ending at e, at positions r + u ... n - 1 + u (paper: Pos(c_1) = st_1 + u_1 ...).
    g = pose_generator(seed=0, index=0)
    first, end, skip = draws_of(8, 100, 64, g)
    tokens, positions = pose_sample(torch.arange(100), 8, 64, g)
    assert tokens.tolist() == list(range(first)) + list(range(end - (9 - first), end))
    assert positions.tolist() == list(range(first)) + list(range(first + skip, 8 + skip))


@pytest.mark.parametrize("seq_len,target", [(8, 64), (9, 20), (16, 17)], ids=["8-to-64", "odd-9-to-20", "16-to-17"])
def test_draws_stay_in_the_papers_ranges_and_cover_them(seq_len, target):
    source = torch.arange(5 * (seq_len + 1))
    firsts, skips, last_positions = set(), set(), set()
    for index in range(400):
        g = pose_generator(1, index)
        first, _, skip = draws_of(seq_len, source.numel(), target, g)
        tokens, positions = pose_sample(source, seq_len, target, g)
        assert tokens.shape == (seq_len + 1,) and positions.shape == (seq_len,)
        # chunk 0 is the source's start; chunk 1 is contiguous text after it (text skips ahead, never back)
        assert tokens[:first].tolist() == list(range(first))
        assert torch.equal(tokens[first:], torch.arange(int(tokens[first]), int(tokens[first]) + seq_len + 1 - first))
        assert int(tokens[first]) >= first
        # positions: consecutive inside each chunk, one jump of u between them, all below L_t
        assert torch.equal(positions.diff()[first - 1 :][1:], torch.ones(seq_len - first - 1, dtype=torch.long))
        assert 0 <= int(positions[-1]) <= target - 1
        firsts.add(first), skips.add(skip), last_positions.add(int(positions[-1]))
    assert firsts == set(range(1, (seq_len + 1) // 2 + 1))  # l_0 ~ U{1, ..., floor((L_c + 1) / 2)}
    assert min(skips) == 0 and max(skips) == target - seq_len  # u ~ U{0, ..., L_t - L_c}: reaches both ends
    assert max(last_positions) == target - 1  # the largest relative distance L_t - 1 is trained


def test_draws_depend_only_on_seed_and_index():
    sources = torch.arange(90).reshape(2, 45)
    a = pose_batch(sources, 8, 64, pose_generator(3, 7))
    b = pose_batch(sources, 8, 64, pose_generator(3, 7))
    c = pose_batch(sources, 8, 64, pose_generator(3, 8))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[1], c[1])


def test_explicit_mask_keeps_the_sequence_whole():
    # Without a mask, transformers would read the position jump as a packed-sequence boundary and cut attention.
    model = make_tiny_llama()
    cfg = TrainConfig(seq_len=12, micro_batch_size=2, pose_target_len=48)
    rows = torch.randint(2, 259, (2, 5 * 13), generator=torch.Generator().manual_seed(0))
    batch = make_batch(rows, 0, cfg, model, seed=0)
    assert (batch.position_ids.diff(dim=1) > 1).any()
    full_causal = torch.ones(12, 12, dtype=torch.bool).tril()[None, None].expand(2, 1, 12, 12)
    reference = logits(model, batch.inputs, position_ids=batch.position_ids, attention_mask=full_causal)
    ours = logits(model, batch.inputs, position_ids=batch.position_ids, attention_mask=batch.attention_mask)
    inferred = logits(model, batch.inputs, position_ids=batch.position_ids, use_cache=False)  # as in training
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)  # two SDPA mask forms: fp32 rounding only
    assert (inferred - reference).abs().max() > 1e-2


def test_training_with_pose_sees_skipped_positions(tmp_path):
    model = make_tiny_llama()
    seen = []
    model.model.rotary_emb.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append(int(kwargs.get("position_ids", args[-1]).max())), with_kwargs=True)
    cfg = TrainConfig(steps=3, seq_len=16, micro_batch_size=2, warmup_steps=0, val_every=0, log_every=1,
                      pose_target_len=256, seed=0)
    blocks = blocks_from_stream(torch.randint(2, 259, (2000,), generator=torch.Generator().manual_seed(0)), 5 * 17 - 1)
    result = train(model, blocks, cfg, tmp_path, progress=False)
    assert torch.isfinite(torch.tensor(result.final_loss)) and max(seen) > 16
    with pytest.raises(ConfigError, match=r"train\.seq_len: is 16 but the blocks hold 17 tokens, not 85 \(PoSE"):
        train(make_tiny_llama(), blocks[:, :17].contiguous(), cfg, tmp_path / "x", progress=False)


def test_bad_pose_settings_are_clear_errors():
    with pytest.raises(ConfigError, match=r"train\.pose_target_len: 100 must exceed seq_len=128"):
        TrainConfig(pose_target_len=100)
    with pytest.raises(ConfigError, match=r"train\.pack_documents: cannot be combined with PoSE"):
        TrainConfig(pose_target_len=1024, pack_documents=True)
