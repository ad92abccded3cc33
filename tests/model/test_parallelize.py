"""Context parallelism is applied to plain modules from outside (model/parallelize.py).

The collectives themselves are checked end to end against one process in tests/parallel; here: the
collaborators do the right thing with a recording stand-in for the stage group, ``parallelize_stage``
installs them exactly where needed, and the model classes take no process group or CP index at all.
"""

from __future__ import annotations

import inspect
import pathlib

import torch

from dsaserve.cache.kv_cache import LayerCache
from dsaserve.checkpoint.tiny import tiny_config_dict
from dsaserve.config import ModelConfig
from dsaserve.model import deepseek_v32, indexer, mla, moe
from dsaserve.model.batch import ForwardBatch
from dsaserve.model.deepseek_v32 import DSAModel
from dsaserve.model.mla import CacheWriter
from dsaserve.model.moe import RoutedTokens, StageTokens
from dsaserve.model.parallelize import ExpertParallelTokens, GatheringCacheWriter, parallelize_stage


class RecordingComm:
    """A 2-rank stage seen from rank 0: the peer's rows are 10x this rank's; every call is recorded."""

    size = 2

    def __init__(self):
        self.calls: list[str] = []

    def all_gather_tokens(self, x, kind):
        self.calls.append(f"gather:{kind}")
        return torch.cat([x, (10 * x.float()).to(x.dtype)])

    def reduce_scatter_tokens(self, x, kind):
        self.calls.append(f"scatter:{kind}")
        n = x.shape[0] // 2
        return x[:n] + 10 * x[n:]

    def all_reduce(self, x, kind):
        self.calls.append(f"allreduce:{kind}")
        return 11 * x


def _batch(gathered: bool, is_decode: bool = False) -> ForwardBatch:
    return ForwardBatch(positions=torch.tensor([0, 1]), token_req=torch.tensor([0, 0]), req_seq_lens=[2],
                        block_tables=torch.zeros(1, 1, dtype=torch.long), write_slots=torch.tensor([3, -1]),
                        gathered_write_slots=torch.tensor([3, -1, 6, 7]) if gathered else None,
                        is_decode=is_decode, page_size=8)


def _cache() -> LayerCache:
    return LayerCache(latent=torch.zeros(8, 2), index_k=torch.zeros(8, 2), index_scale=torch.zeros(8))


def test_gathering_cache_writer_writes_every_ranks_keys_at_the_gathered_slots():
    comm, cache = RecordingComm(), _cache()
    latent, index_k, scale = torch.tensor([[1.0, 1.0], [2.0, 2.0]]), torch.ones(2, 2), torch.ones(2)
    GatheringCacheWriter(comm).write(_batch(gathered=True), cache, latent, index_k, scale)
    assert comm.calls == ["gather:cp_index_gather", "gather:cp_index_gather", "gather:cp_kv_gather"]
    # gathered rows [1, 2, 10, 20] go to slots [3, -1 (padding: dropped), 6, 7]
    assert cache.latent[:, 0].tolist() == [0, 0, 0, 1, 0, 0, 10, 20]
    assert cache.index_scale.tolist() == [0, 0, 0, 1, 0, 0, 10, 10]
    # decode (no gathered slots): this rank's rows only, at their own slots, no collective
    comm.calls.clear()
    cache = _cache()
    GatheringCacheWriter(comm).write(_batch(gathered=False, is_decode=True), cache, latent, index_k, scale)
    assert comm.calls == [] and cache.latent[:, 0].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]


def test_moe_tokens_gather_then_reduce_scatter_in_prefill_and_all_reduce_in_decode():
    comm = RecordingComm()
    tokens = ExpertParallelTokens(comm)
    ids, weights = torch.tensor([[3, 0], [1, 2]]), torch.tensor([[0.25, 0.5], [1.0, 2.0]])
    routed = RoutedTokens(torch.ones(2, 3), None, ids, weights)
    seen = tokens.dispatch(routed, _batch(gathered=True))
    assert seen.x.shape == (4, 3) and seen.x_scale is None
    # ids and weights travel in one fp32 tensor (the peer's are 10x: the stand-in's convention)
    assert seen.ids.dtype == torch.int64 and torch.equal(seen.ids, torch.cat([ids, 10 * ids]))
    assert torch.equal(seen.weights, torch.cat([weights, 10 * weights]))
    out = tokens.combine(torch.arange(12.0).view(4, 3), _batch(gathered=True))
    assert torch.equal(out, torch.arange(6.0).view(2, 3) + 10 * torch.arange(6.0, 12.0).view(2, 3))
    assert comm.calls == ["gather:moe_gather", "gather:moe_route_gather", "scatter:moe_scatter"]
    # fp8 experts: e4m3 activations gathered as they are, their scales in the routing tensor
    comm.calls.clear()
    xq = torch.full((2, 3), 0.5).to(torch.float8_e4m3fn)
    scale = torch.tensor([[2.0], [4.0]])
    seen = tokens.dispatch(RoutedTokens(xq, scale, ids, weights), _batch(gathered=True))
    assert seen.x.dtype == torch.float8_e4m3fn and seen.x.float().tolist() == [[0.5] * 3] * 2 + [[5.0] * 3] * 2
    assert torch.equal(seen.x_scale, torch.cat([scale, 10 * scale])) and torch.equal(seen.ids[:2], ids)
    assert comm.calls == ["gather:moe_gather", "gather:moe_route_gather"]
    comm.calls.clear()
    decode = _batch(gathered=False, is_decode=True)
    assert tokens.dispatch(routed, decode) is routed
    x = torch.ones(2, 3)
    assert torch.equal(tokens.combine(x, decode), 11 * x)
    assert comm.calls == ["allreduce:moe_allreduce"]


def test_parallelize_stage_installs_the_collaborators_only_for_a_cp_stage():
    cfg = ModelConfig.from_dict(tiny_config_dict())
    one_rank = RecordingComm()
    one_rank.size = 1
    model = parallelize_stage(DSAModel(cfg), one_rank)
    for layer in model.layers.values():
        assert type(layer.self_attn.cache_writer) is CacheWriter
        assert not layer.is_moe or type(layer.mlp.tokens) is StageTokens
    comm = RecordingComm()
    model = parallelize_stage(DSAModel(cfg), comm)
    moe_layers = [layer for layer in model.layers.values() if layer.is_moe]
    assert moe_layers and len(moe_layers) < len(model.layers)            # the tiny model has both kinds
    for layer in model.layers.values():
        assert isinstance(layer.self_attn.cache_writer, GatheringCacheWriter)
        assert layer.self_attn.cache_writer.comm is comm
        if layer.is_moe:
            assert isinstance(layer.mlp.tokens, ExpertParallelTokens) and layer.mlp.tokens.comm is comm


def test_model_classes_take_no_process_group_or_cp_index_and_read_no_environment():
    forbidden = {"comm", "group", "process_group", "cp_rank", "cp_size", "rank", "world_size"}
    for cls in (DSAModel, deepseek_v32.DecoderLayer, mla.MLAttention, indexer.Indexer, moe.MoE, moe.LoopExperts,
                moe.GroupedExperts):
        for method in (cls.__init__, cls.forward):
            params = set(inspect.signature(method).parameters)
            assert not params & forbidden, f"{cls.__name__}.{method.__name__} takes {params & forbidden}"
    model_dir = pathlib.Path(deepseek_v32.__file__).parent
    readers = [p.name for p in model_dir.glob("*.py") if "environ" in p.read_text()]
    assert readers == [], f"model modules reading the environment: {readers}"
