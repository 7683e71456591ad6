"""The attention spec: its position maps and pair selections, and clear errors for impossible specs."""

import pytest
import torch

from lce.errors import ConfigError
from lce.kernels.attention.spec import IDENTITY, AttentionSpec, PairSelect, PositionMap, Segment
from lce.kernels.rope import Rotation


def test_position_map_floor_semantics_on_negative_positions():
    p = torch.tensor([-7, -1, 0, 5, 13])
    assert PositionMap(div=3)(p).tolist() == [-3, -1, 0, 1, 4]
    assert PositionMap(mod=4)(p).tolist() == [1, 3, 0, 1, 1]
    assert PositionMap(mod=4, add=4, cap=6)(p).tolist() == [5, 6, 4, 5, 5]
    assert PositionMap(mod=4, below=2, otherwise=-9)(p).tolist() == [1, -9, 0, 1, 1]
    assert PositionMap.constant(3)(p).tolist() == [3] * 5
    assert torch.equal(IDENTITY(p), p)
    assert PositionMap(mod=4)(p.to(torch.int32)).dtype == torch.int32


def test_pair_select_bounds():
    i, j = torch.tensor(9), torch.tensor([9, 8, 6, 1, -1])  # chunk gaps (div 3): 0, 1, 1, 3, 4
    assert PairSelect(div=3, lo=1, hi=2)(i, j).tolist() == [False, True, True, False, False]
    assert PairSelect(key_below=2)(i, j).tolist() == [False, False, False, True, True]
    assert PairSelect(lo=4)(i, j).tolist() == [False, False, False, True, True]
    assert PairSelect()(i, j).all()


def rotary():
    return Rotation(torch.ones(2))


@pytest.mark.parametrize("kwargs,match", [
    ({"scale": 0.0}, "scale must be a finite number > 0"),
    ({"scale": float("nan")}, "scale must be a finite number > 0"),
    ({"scale": 1.0, "segments": (Segment(IDENTITY, IDENTITY, PairSelect()),)}, "pass rotary"),
    ({"scale": 1.0, "rotary": "rotary"}, "rotary is only used by segments"),
    ({"scale": 1.0, "window": 0}, "window must be >= 1, got 0"),
    ({"scale": 1.0, "sink_tokens": 4}, "needs a window"),
    ({"scale": 1.0, "window": 4, "sink_tokens": -1}, "sink_tokens must be >= 0"),
    ({"scale": 1.0, "logn_length": 1}, "logn_length must be >= 2"),
    ({"scale": 1.0, "block_mask": torch.ones(2, 2, dtype=torch.bool)}, "go together"),
    ({"scale": 1.0, "block_mask": torch.ones(2, 2, dtype=torch.bool), "block_size": 0}, "block_size must be >= 1"),
    ({"scale": 1.0, "block_mask": torch.ones(2, 2), "block_size": 4}, "2-D bool tensor"),
    ({"scale": 1.0, "alibi_slopes": torch.ones(2, 2)}, "alibi_slopes must be a 1-D float tensor"),
    ({"scale": 1.0, "segments": [Segment(IDENTITY, IDENTITY, PairSelect())]}, "must be a tuple of Segment"),
])
def test_bad_specs_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AttentionSpec(**kwargs)


@pytest.mark.parametrize("build,match", [
    (lambda: PositionMap(div=0), "PositionMap.div must be >= 1, got 0"),
    (lambda: PositionMap(mod=0), "PositionMap.mod must be >= 1"),
    (lambda: PositionMap(add=1.5), "PositionMap.add must be an integer"),
    (lambda: PositionMap(add=2**40), "within"),
    (lambda: PairSelect(lo=3, hi=3), "selects nothing"),
    (lambda: PairSelect(div=-1), "PairSelect.div must be >= 1"),
    (lambda: Rotation(torch.ones(2, 2)), "1-D tensor"),
    (lambda: Rotation(torch.ones(2, dtype=torch.long)), "float tensor"),
    (lambda: Rotation(torch.ones(2), style="neox"), "style must be one of half, interleaved"),
    (lambda: AttentionSpec(0.5, (Segment(IDENTITY, IDENTITY, PairSelect()),), Rotation(torch.ones(0))),
     "rotates nothing"),
])
def test_bad_maps_are_config_errors(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


def test_a_valid_spec_lists_its_tensors():
    spec = AttentionSpec(0.5, (Segment(IDENTITY, IDENTITY, PairSelect()),), rotary(),
                         alibi_slopes=torch.ones(2), window=3, sink_tokens=1)
    assert set(spec.tensors) == {"alibi_slopes", "rotary.inv_freq"}
