"""Fixtures of the sharded-training tests (test_fsdp.py, test_zero3.py)."""

import pytest

from tests.train.launched import one_process_reference


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process, 4 micro-batches per step; its run directory and trained model."""
    run = tmp_path_factory.mktemp("one") / "run"
    return run, one_process_reference(run)
