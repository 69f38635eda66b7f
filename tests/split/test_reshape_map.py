"""The reshape rule is where heads meet layouts: check its mapping on the shapes exporters emit."""

import pytest

from mha2sha.split.reshape_map import Unmappable, map_spec_through_reshape, reshape_groups
from mha2sha.split.spec import AxisCut, piece_key


def test_groups_pair_merged_and_split_axes():
    assert reshape_groups((1, 8, 64), (1, 8, 4, 16)) == [([0], [0]), ([1], [1]), ([2], [2, 3])]


def test_heads_axis_maps_to_blocks_of_head_dim():
    spec = (AxisCut(2, 0, 1, 4),)  # [B, S, H, D] heads on axis 2
    assert map_spec_through_reshape(spec, (1, 8, 4, 16), (1, 8, 64)) == (AxisCut(2, 0, 16, 4),)
    assert map_spec_through_reshape((AxisCut(2, 0, 16, 4),), (1, 8, 64), (1, 8, 4, 16)) == spec


def test_packed_qkv_offset_survives():
    spec = (AxisCut(2, 4, 1, 2),)  # key heads 4..5 of a [B, S, H+2*Hkv, D] view
    assert map_spec_through_reshape(spec, (1, 8, 8, 16), (1, 8, 128)) == (AxisCut(2, 64, 16, 2),)


def test_repeat_kv_splits_query_heads_into_kv_groups():
    # [B, H, T, D] <- [B, Hkv, g, T, D] with H = 8, Hkv = 2, g = 4
    spec = (AxisCut(1, 0, 1, 8),)
    mapped = map_spec_through_reshape(spec, (1, 8, 10, 16), (1, 2, 4, 10, 16))
    assert mapped == (AxisCut(1, 0, 1, 2, div=4), AxisCut(2, 0, 1, 4))
    # query head h uses kv head h // 4 and group member h % 4
    assert [piece_key(mapped, h) for h in range(8)] == [(h // 4, h % 4) for h in range(8)]


def test_heads_folded_into_batch():
    spec = (AxisCut(0, 0, 1, 4),)  # [B*H, S, D] with B = 1
    assert map_spec_through_reshape(spec, (4, 8, 16), (1, 4, 8, 16)) == (AxisCut(1, 0, 1, 4),)


def test_strided_heads_are_refused():
    # [B, H, S, D] -> [B*H, S, D] with B = 2: head h is rows {h, H + h}: not one contiguous range
    with pytest.raises(Unmappable):
        map_spec_through_reshape((AxisCut(1, 0, 1, 4),), (2, 4, 8, 16), (8, 8, 16))
