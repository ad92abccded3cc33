"""Layout, the one owner of the PP / CP sizes: every rank's view and model shard (no processes)."""

from __future__ import annotations

import pytest

from dsaserve.checkpoint.spec import part_range
from dsaserve.checkpoint.tiny import tiny_config_dict
from dsaserve.config import ConfigError, ModelConfig
from dsaserve.model.shard import StageShard
from dsaserve.parallel.layout import Layout


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return ModelConfig.from_dict(tiny_config_dict(num_hidden_layers=5))


def test_rank_views_of_a_3x2_world(cfg):
    layout = Layout.build(cfg, pp_size=3, cp_size=2)
    assert layout.world_size == 6 and layout.stage_layers == (range(0, 1), range(1, 3), range(3, 5))
    views = [layout.rank_view(r) for r in range(6)]
    assert [(v.stage, v.cp_rank) for v in views] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert [v.prev_rank for v in views] == [None, None, 0, 1, 2, 3]
    assert [v.next_rank for v in views] == [2, 3, 4, 5, None, None]
    assert views[3].cp_peers == [2, 3] and layout.last_stage_ranks() == [4, 5]
    assert [v.is_first_stage for v in views] == [True, True, False, False, False, False]
    assert [v.is_last_stage for v in views] == [False, False, False, False, True, True]
    assert [layout.stage_of_layer(i) for i in range(5)] == [0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="rank 6 is outside"):
        layout.rank_view(6)


def test_shards_cover_the_model_and_the_experts_once(cfg):
    """Every layer belongs to exactly one stage, and the C ranks of a stage hold disjoint contiguous ranges of
    whole experts that together cover them (also when C does not divide the expert count)."""
    for pp, cp in [(1, 1), (2, 3), (5, 4)]:
        layout = Layout.build(cfg, pp, cp)
        shards = [layout.rank_view(r).shard() for r in range(layout.world_size)]
        layers = sorted(i for s in shards if s.cp_index == 0 for i in s.layers)
        assert layers == list(range(cfg.num_hidden_layers))
        assert sum(s.is_first for s in shards) == cp and sum(s.is_last for s in shards) == cp
        for stage in range(pp):
            mine = [s for s in shards if s.layer_start == layout.stage_layers[stage].start]
            ranges = [s.expert_range(cfg.n_routed_experts) for s in mine]
            assert [e for r in ranges for e in r] == list(range(cfg.n_routed_experts))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
            assert [s.cp_index for s in mine] == list(range(cp))


def test_part_range_is_near_equal_and_matches_the_shard():
    assert [part_range(10, i, 3) for i in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert [part_range(4, i, 4) for i in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    shard = StageShard(4, 0, 4, cp_index=1, cp_size=3, expert_part=1, expert_parts=3)
    assert shard.expert_range(10) == range(*part_range(10, 1, 3)) == range(3, 6)
    # more ranks than experts: some ranks hold none
    assert [len(StageShard(4, 0, 4, cp_index=i, cp_size=3, expert_part=i, expert_parts=3).expert_range(2))
            for i in range(3)] == [0, 1, 1]


def test_sizes_are_validated_once_with_a_clear_error(cfg):
    for pp, cp in [(0, 1), (1, 0), (2, True), (1.5, 1)]:
        with pytest.raises(ConfigError, match=r"(pp|cp)_size must be an integer >= 1"):
            Layout.build(cfg, pp, cp)
    layout = Layout.build(cfg, 2, 2)
    layout.check_world_size(4)
    with pytest.raises(ConfigError, match=r"torchrun started 3 processes but pp_size x cp_size = 2 x 2 = 4"):
        layout.check_world_size(3)


def test_bad_shards_are_rejected():
    with pytest.raises(ValueError, match="bad layer range"):
        StageShard(4, 2, 2)
    with pytest.raises(ValueError, match="bad shard index"):
        StageShard(4, 0, 4, cp_index=2, cp_size=2)
