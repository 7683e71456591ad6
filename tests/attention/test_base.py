"""Layer selection for hybrid attention."""

import pytest

from lce.attention.base import select_layers
from lce.errors import ConfigError


@pytest.mark.parametrize(
    "spec,expected",
    [("all", [0, 1, 2, 3, 4, 5]), ([4, 0, 2], [0, 2, 4]), ("every:2", [0, 2, 4]), ("every:4", [0, 4]),
     ("all_but_first:2", [2, 3, 4, 5])],
)
def test_forms(spec, expected):
    assert select_layers(spec, 6) == expected


@pytest.mark.parametrize(
    "spec,message",
    [([0, 6], r"layer indices \[6\] are out of range for a model of 6 layers"), ([1, 1], "duplicates"),
     ("every:0", "N >= 1"), ("all_but_first:6", "leaves no layer"), ("odd", "not a layer selection")],
)
def test_bad_selections(spec, message):
    with pytest.raises(ConfigError, match=message):
        select_layers(spec, 6)
