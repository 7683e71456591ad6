"""A sweep run by every process of a launch (``python -m torch.distributed.run --nproc_per_node 2``), for
``test_shard.py``: the same model, documents and protocols as its one-process reference.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/eval/sharded_sweep.py OUT_DIR

It sweeps every protocol of ``PROTOCOLS`` twice (the second run resumes), then the canonical one again with the last
process running out of memory at ``OOM_LENGTH``, into ``OUT_DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lce.eval.protocols import build_protocol
from lce.eval.sweep import run_sweep
from tests.conftest import make_tiny_llama

LENGTHS = [24, 40, 64]
BOS_ID = 2
OOM_LENGTH = 40
PROTOCOLS = {
    "canonical": {"name": "canonical", "bucket_size": 16, "n_bootstrap": 50},
    "yarn": {"name": "yarn", "stride": 16},
    "sliding": {"name": "sliding", "stride": 20},
    "streaming": {"name": "streaming", "start_size": 2, "recent_size": 12, "bucket_size": 16},
}
META = {"method": "rope", "params": {}, "model": "tiny-llama", "seed": 0}


def documents() -> list[torch.Tensor]:
    """Five documents of uneven lengths: the batches of two do not split evenly across two processes."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 259, (n,), generator=generator) for n in (64, 70, 81, 64, 99)]


def sweep(out_dir: Path, lengths: list[int], shard=None) -> tuple[list[dict], int]:
    """Every protocol of ``PROTOCOLS`` at ``lengths`` into ``out_dir/<protocol>.jsonl``; the rows and the number of
    forward passes this process ran."""
    torch.set_num_threads(1)  # the same kernels, hence the same rounding, in every process
    model, rows, forwards = make_tiny_llama(), [], []
    model.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    for name, spec in PROTOCOLS.items():
        meta = {**META, "run": name, "protocol": spec}
        rows += run_sweep(model, documents(), lengths, out_dir / f"{name}.jsonl", meta=meta,
                          protocol=build_protocol(spec), bos_id=BOS_ID, batch_size=2, progress=False, shard=shard)
    return rows, len(forwards)


def main(argv: list[str]) -> None:
    from lce.eval.shard import current_shard

    out_dir = Path(argv[0])
    shard = current_shard()
    assert shard.world_size == 2, f"expected 2 processes, got {shard}"
    # Resume: the second sweep finds the first one's points in the store and computes only the new length.
    _, first = sweep(out_dir, LENGTHS[:2], shard)
    rows, second = sweep(out_dir, LENGTHS, shard)
    (out_dir / f"returned_{shard.rank}.txt").write_text(repr([(r["run"], r["length"], r["nll"]) for r in rows]))
    (out_dir / f"forwards_{shard.rank}.txt").write_text(f"{first + second}")
    sweep_with_oom_on_last_process(out_dir / "oom.jsonl", shard)
    retrieval(out_dir, shard)


def retrieval(out_dir: Path, shard) -> None:
    """Passkey trials with a fake generator: run by the main process only, the rows returned to both."""
    from lce.eval.retrieval import PasskeyConfig, run_retrieval
    from tests.eval.test_retrieval import META as RETRIEVAL_META
    from tests.eval.test_retrieval import TOKENIZER, oracle

    calls = []

    def generate(ids, max_new_tokens):
        calls.append(1)
        return oracle(ids, max_new_tokens)

    config = PasskeyConfig(lengths=[300, 400], depths=[0.0, 1.0], trials=2)
    rows = run_retrieval(generate, TOKENIZER, config, out_dir / "retrieval.jsonl", meta=RETRIEVAL_META,
                         progress=False, shard=shard)
    (out_dir / f"retrieval_{shard.rank}.txt").write_text(f"{len(calls)} {[r['correct'] for r in rows]}")


def sweep_with_oom_on_last_process(path: Path, shard) -> None:
    """The canonical sweep again, the last process running out of memory at ``OOM_LENGTH``."""
    import lce.eval.sweep

    real = lce.eval.sweep.protocol_nll_fn

    def failing_nll_fn(*args, **kwargs):
        nll_fn = real(*args, **kwargs)

        def fn(ids):
            if ids.shape[1] == OOM_LENGTH and shard.rank == shard.world_size - 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB (simulated)")
            return nll_fn(ids)

        return fn

    lce.eval.sweep.protocol_nll_fn = failing_nll_fn
    spec = PROTOCOLS["canonical"]
    run_sweep(make_tiny_llama(), documents(), LENGTHS, path, meta={**META, "run": "canonical", "protocol": spec},
              protocol=build_protocol(spec), batch_size=2, progress=False, shard=shard)


if __name__ == "__main__":
    main(sys.argv[1:])
