"""lr_at against hand-computed values: linear warm-up, cosine decay to the floor, flat after the run."""

import itertools
import math

import pytest

from lce.train import TrainConfig, lr_at

# warm-up 10 steps to 1e-3, then cosine over 100 steps down to 1e-4.
CFG = TrainConfig(steps=110, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)


@pytest.mark.parametrize(
    "step, expected",
    [
        pytest.param(0, 0.0, id="start-of-warmup"),
        pytest.param(5, 5e-4, id="warmup-midpoint"),
        pytest.param(10, 1e-3, id="end-of-warmup"),
        # 1e-4 + (1e-3 - 1e-4) * (1 + cos(pi / 4)) / 2 = 1e-4 + 9e-4 * 0.853553390593...
        pytest.param(35, 8.681980515339464e-4, id="cosine-quarter"),
        pytest.param(60, 5.5e-4, id="cosine-midpoint"),
        pytest.param(110, 1e-4, id="end"),
        pytest.param(500, 1e-4, id="after-end"),
    ],
)
def test_hand_computed_values(step, expected):
    assert lr_at(step, CFG) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_no_warmup_starts_at_peak():
    cfg = TrainConfig(steps=10, warmup_steps=0, lr=2e-3, min_lr_ratio=0.0)
    assert lr_at(0, cfg) == 2e-3
    assert lr_at(5, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(0.0, abs=1e-18)


def test_decay_is_monotone():
    rates = [lr_at(s, CFG) for s in range(CFG.warmup_steps, CFG.steps + 1)]
    assert all(a >= b for a, b in itertools.pairwise(rates))


def test_warmup_longer_than_run_never_reaches_peak():
    cfg = TrainConfig(steps=5, warmup_steps=20, lr=1e-3)
    assert max(lr_at(s, cfg) for s in range(1, 6)) == pytest.approx(2.5e-4)
    assert math.isfinite(lr_at(5, cfg))


@pytest.mark.parametrize(
    "step, expected",
    [
        pytest.param(10, 1e-3, id="end-of-warmup"),
        pytest.param(35, 1e-4 + 9e-4 * 0.75, id="linear-quarter"),  # a straight line from 1e-3 to 1e-4
        pytest.param(60, 5.5e-4, id="linear-midpoint"),
        pytest.param(110, 1e-4, id="end"),
        pytest.param(500, 1e-4, id="after-end"),
    ],
)
def test_linear_decay(step, expected):
    import dataclasses

    assert lr_at(step, dataclasses.replace(CFG, schedule="linear")) == pytest.approx(expected, rel=1e-12)


def test_constant_after_warmup():
    import dataclasses

    cfg = dataclasses.replace(CFG, schedule="constant")
    assert [lr_at(s, cfg) for s in (5, 10, 60, 110, 500)] == [5e-4, 1e-3, 1e-3, 1e-3, 1e-3]
