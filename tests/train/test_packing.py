"""Document packing: boundaries from eos, positions restarting per document, and a packed row computing exactly what
each document computes alone."""

import dataclasses

import pytest
import torch

from lce.errors import ConfigError
from lce.train import TrainConfig, make_batch, train
from lce.train.batch import IGNORE
from lce.train.packing import document_ids, document_mask, document_positions
from tests.conftest import logits, make_tiny_llama

EOS = 1


def test_hand_worked_boundaries():
    # "a a EOS b b b EOS c": eos ends its document; the token after it starts the next.
    inputs = torch.tensor([[5, 6, EOS, 7, 8, 9, EOS, 10]])
    docs = document_ids(inputs, EOS)
    assert docs.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]
    assert document_positions(docs).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    mask = document_mask(docs)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False, False, False]  # b sees b's past only
    assert mask[7].tolist() == [False] * 7 + [True]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_equals_each_document_alone(attn):
    model = make_tiny_llama(attn_implementation=attn)
    a, b = torch.randint(2, 259, (1, 7)), torch.randint(2, 259, (1, 9))
    row = torch.cat([a, torch.tensor([[EOS]]), b, torch.randint(2, 259, (1, 1))], dim=1)  # [1, 18]: 17 inputs
    batch = make_batch(row, 0, TrainConfig(seq_len=17, pack_documents=True), model, seed=0, eos_id=EOS)
    packed = logits(model, batch.inputs, position_ids=batch.position_ids, attention_mask=batch.attention_mask,
                    use_cache=False)
    alone_a = logits(model, torch.cat([a, torch.tensor([[EOS]])], dim=1), use_cache=False)
    alone_b = logits(model, b, use_cache=False)
    # The same tokens at the same positions over the same keys; masked keys add exact zeros. fp32 rounding only.
    torch.testing.assert_close(packed[:, :8], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 8:], alone_b, atol=1e-5, rtol=1e-5)
    assert batch.targets[0, 7] == IGNORE and batch.scored == 16  # the prediction made at eos is not scored


def test_packed_training_runs_and_other_attention_is_refused(tmp_path):
    stream = torch.randint(2, 259, (400,))
    stream[::13] = EOS
    blocks = stream[:17 * 20].reshape(20, 17)
    cfg = TrainConfig(steps=2, seq_len=16, micro_batch_size=2, warmup_steps=0, val_every=1, val_batches=1,
                      pack_documents=True)
    result = train(make_tiny_llama(), blocks, cfg, tmp_path, val_blocks=blocks[:2], eos_id=EOS, progress=False)
    assert torch.isfinite(torch.tensor(result.final_loss))
    with pytest.raises(ConfigError, match=r"train\.pack_documents: needs the tokenizer's eos id"):
        train(make_tiny_llama(), blocks, cfg, tmp_path / "x", progress=False)
    flash = make_tiny_llama()
    flash.config._attn_implementation = "flash_attention_2"  # its mask check runs before any attention call
    with pytest.raises(ConfigError, match=r"'flash_attention_2' takes no 4-D attention mask"):
        train(flash, blocks, dataclasses.replace(cfg, val_every=0), tmp_path / "y", eos_id=EOS, progress=False)
