"""Data sources: the stdlib corpus, local files, HF datasets from local files; stable splits; eval documents."""

import sysconfig

import pytest
import torch

from lce.data import ByteTokenizer, HFData, LocalData, StdlibData, eval_documents, hash_split, token_stream
from lce.errors import ConfigError, LceError


def test_hash_split_is_stable_and_proportional():
    # Golden values (sha256 of the id): a document's split must never change across machines or versions.
    assert [hash_split(f"doc{i}.py", 0.3, 0.3) for i in range(6)] == [
        "test", "train", "validation", "test", "validation", "test"
    ]
    splits = [hash_split(f"file_{i}", 0.1, 0.2) for i in range(5000)]
    assert abs(splits.count("test") / 5000 - 0.2) < 0.03
    assert abs(splits.count("validation") / 5000 - 0.1) < 0.03


def test_stdlib_uses_sysconfig_and_excludes_packages():
    source = StdlibData()
    files = source.files()
    assert source.root() == __import__("pathlib").Path(sysconfig.get_paths()["stdlib"])
    rels = [rel for rel, _ in files]
    assert "os.py" in rels
    assert not any(r.startswith(("site-packages/", "test/", "idlelib/")) or "/test/" in r for r in rels)
    splits = {split: {doc for doc, _ in source.documents(split)} for split in ("train", "validation", "test")}
    assert not (splits["train"] & splits["test"]) and not (splits["validation"] & splits["test"])
    non_empty = [rel for rel, path in files if path.stat().st_size > 0]  # min_chars=1 drops empty files
    assert sum(map(len, splits.values())) == len(non_empty)


def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()
    text = "naïve → café\n"
    ids = tokenizer.encode(text)
    assert ids.dtype == torch.int64 and ids.min() >= 3
    assert tokenizer.decode(ids) == text


def _write_corpus(root, n=40, size=300):
    for i in range(n):
        (root / f"d{i:02d}.txt").write_text(f"document {i} " * (size // 10 + i))


def test_local_source_and_stream(tmp_path):
    _write_corpus(tmp_path)
    source = LocalData(pattern=str(tmp_path / "*.txt"), validation_fraction=0.2, test_fraction=0.2)
    stream = token_stream(source, ByteTokenizer(), "train")
    eos_count = int((stream == ByteTokenizer.eos_id).sum())
    assert eos_count == sum(1 for _ in source.documents("train"))


def test_eval_documents_long_and_concat(tmp_path):
    _write_corpus(tmp_path)
    source = LocalData(pattern=str(tmp_path / "*.txt"), validation_fraction=0.2, test_fraction=0.4)
    tokenizer = ByteTokenizer()
    docs = eval_documents(source, tokenizer, min_tokens=300, n_docs=3, policy="long")
    assert len(docs) == 3 and all(d.numel() >= 300 for d in docs)
    again = eval_documents(source, tokenizer, min_tokens=300, n_docs=3, policy="long")
    assert all(torch.equal(a, b) for a, b in zip(docs, again))  # deterministic
    longest = max(d.numel() for d in eval_documents(source, tokenizer, min_tokens=1, n_docs=3, policy="long"))
    with pytest.raises(ConfigError,
                       match=r"eval\.n_docs: only [12] documents .* at least \d+ tokens.*documents=concat"):
        eval_documents(source, tokenizer, min_tokens=longest, n_docs=3)
    # A length no document reaches is the length's fault, not n_docs' (it named eval.n_docs with n_docs=1).
    with pytest.raises(ConfigError,
                       match=r"eval\.lengths: no document .* has 100000000 tokens .* the longest has \d+"):
        eval_documents(source, tokenizer, min_tokens=100_000_000, n_docs=1)
    with pytest.raises(ConfigError, match=r"eval\.lengths: .* tokens in all, fewer than the longest evaluation length"):
        eval_documents(source, tokenizer, min_tokens=100_000_000, n_docs=1, policy="concat")
    cut = eval_documents(source, tokenizer, min_tokens=1000, n_docs=2, policy="concat")
    assert [d.numel() for d in cut] == [1000, 1000]


def test_missing_files_are_named(tmp_path):
    with pytest.raises(LceError, match="no files match"):
        LocalData(pattern=str(tmp_path / "nothing" / "*.txt")).files()
    with pytest.raises(ConfigError, match=r"data\.pattern: set a glob"):
        LocalData()


def test_hf_dataset_from_local_json(tmp_path):
    import json

    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"text number {i} " * 20}) for i in range(50)))
    source = HFData(path="json", data_files={"train": str(path)}, text_field="body",
                    validation_split=None, test_split=None, test_fraction=0.2)
    ids = {s: [d for d, _ in source.documents(s)] for s in ("train", "validation", "test")}
    assert sum(map(len, ids.values())) == 50 and ids["test"] and not (set(ids["train"]) & set(ids["test"]))
    with pytest.raises(ConfigError, match=r"data\.text_field: 'text' is not a column.*body"):
        list(HFData(path="json", data_files={"train": str(path)}, validation_split=None,
                    test_split=None).documents("train"))


class CountingTokenizer(ByteTokenizer):
    def __init__(self):
        self.encoded = 0

    def encode(self, text):
        self.encoded += 1
        return super().encode(text)


def test_eval_documents_first_in_dataset_order(tmp_path):
    import json

    path = tmp_path / "docs.jsonl"
    sizes = [50, 400, 120, 300, 500, 90, 310, 600]  # characters == byte tokens
    path.write_text("\n".join(json.dumps({"text": str(i) * n}) for i, n in enumerate(sizes)))
    source = HFData(path="json", data_files={"test": str(path)}, train_split="test", validation_split="test")
    tokenizer = CountingTokenizer()
    docs = eval_documents(source, tokenizer, min_tokens=300, n_docs=3, policy="first")
    # Rows 1, 3 and 4 are the first three of at least 300 tokens; rows after the third are never tokenized.
    assert [(d.numel(), tokenizer.decode(d[:1])) for d in docs] == [(400, "1"), (300, "3"), (500, "4")]
    assert tokenizer.encoded == 5
    by_hash = eval_documents(source, ByteTokenizer(), min_tokens=300, n_docs=3, policy="long")
    assert [d.numel() for d in by_hash] != [d.numel() for d in docs]  # the hash order picks others (or orders them so)
    with pytest.raises(ConfigError, match=r"eval\.n_docs: only 5 documents .* at least 300 tokens .*, 6 requested"):
        eval_documents(source, ByteTokenizer(), min_tokens=300, n_docs=6, policy="first")
    with pytest.raises(ConfigError,
                       match=r"eval\.documents: 'last' is not allowed; choose one of 'long', 'concat', 'first'"):
        eval_documents(source, ByteTokenizer(), min_tokens=300, n_docs=1, policy="last")
