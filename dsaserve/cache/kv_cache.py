"""Paged KV caches of one pipeline stage: per layer, the MLA latent and the indexer keys.

Slots are ``page_id * page_size + offset``; pages are handed out by ``PageAllocator`` on rank 0 and the
same slot ids are used on every rank, so a step plan names slots once for the whole world.

Each pool holds one page more than the allocator hands out: the *sink* page. A fixed-shape (CUDA-graph)
decode step pads its batch with rows that must write somewhere without a host-side mask; they write to
``KVCache.sink_slot``, which no request ever reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsaserve.config import ModelConfig

FP8_DTYPE = torch.float8_e4m3fn


@dataclass
class LayerCache:
    latent: torch.Tensor                  # [slots, kv_lora_rank + qk_rope_head_dim]: normed latent | roped k_pe
    index_k: torch.Tensor | None          # [slots, index_head_dim]: e4m3 (fp8 mode) or model dtype (exact mode)
    index_scale: torch.Tensor | None      # [slots] fp32 per-token dequant scale (fp8 mode only)


class KVCache:
    """All caches of the layers this rank owns. ``indexer_fp8`` stores indexer keys as e4m3 + fp32 scale."""

    def __init__(self, cfg: ModelConfig, layers: range, num_pages: int, page_size: int,
                 dtype: torch.dtype, device: torch.device | str, indexer_fp8: bool):
        self.page_size = page_size
        self.num_pages = num_pages                # pages requests may hold (the allocator's)
        self.indexer_fp8 = indexer_fp8
        self.sink_slot = num_pages * page_size    # first slot of the extra sink page: padding rows write here
        slots = (num_pages + 1) * page_size
        self.layers: dict[int, LayerCache] = {}
        for i in layers:
            latent = torch.zeros(slots, cfg.kv_cache_dim, dtype=dtype, device=device)
            index_k = index_scale = None
            if cfg.has_indexer(i):
                if indexer_fp8:
                    index_k = torch.zeros(slots, cfg.index_head_dim, dtype=FP8_DTYPE, device=device)
                    index_scale = torch.zeros(slots, dtype=torch.float32, device=device)
                else:
                    index_k = torch.zeros(slots, cfg.index_head_dim, dtype=dtype, device=device)
            self.layers[i] = LayerCache(latent, index_k, index_scale)

    def __getitem__(self, layer: int) -> LayerCache:
        return self.layers[layer]

    def copy_pages(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole pages src -> dst in every layer and pool (a forked sequence gets its own copy of the
        prompt's partly filled last page). No host sync: the slot indices go host -> device."""
        if not pairs:
            return
        ps = self.page_size
        some = next(iter(self.layers.values()), None)
        if some is None:
            return
        device = some.latent.device
        offsets = torch.arange(ps)
        src = (torch.tensor([a for a, _ in pairs])[:, None] * ps + offsets).flatten().to(device)
        dst = (torch.tensor([b for _, b in pairs])[:, None] * ps + offsets).flatten().to(device)
        for layer in self.layers.values():
            for pool in (layer.latent, layer.index_k, layer.index_scale):
                if pool is None:
                    continue
                raw = pool.view(torch.uint8) if pool.dtype == FP8_DTYPE else pool
                raw.index_copy_(0, dst, raw.index_select(0, src))

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, num_layers: int, dtype: torch.dtype, indexer_fp8: bool) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        idx = (cfg.index_head_dim + 4) if indexer_fp8 else cfg.index_head_dim * elem
        return num_layers * (cfg.kv_cache_dim * elem + idx)


def write_rows(dest: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """dest[slots[i]] = values[i] for every slot >= 0 (slot -1 marks a padding row: never cached).

    dest [slots_total, ...] one layer's pool, slots [m] int64, values [m, ...]; fp8 is written as bytes
    (index_put support for float8 varies by torch version).
    """
    keep = slots >= 0
    values = values[keep].to(dest.dtype)
    if dest.dtype == torch.float8_e4m3fn:
        dest, values = dest.view(torch.uint8), values.view(torch.uint8)
    dest[slots[keep]] = values


def write_rows_unmasked(dest: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """dest[slots[i]] = values[i] for every row, without a host sync (no boolean mask): every slot must be
    valid, padding rows pointing at ``KVCache.sink_slot``. Slots must be distinct except for the sink.

    dest [slots_total, ...], slots [m] int64, values [m, ...] (fp8 written as bytes).
    """
    values = values.to(dest.dtype)
    if dest.dtype == torch.float8_e4m3fn:
        dest, values = dest.view(torch.uint8), values.view(torch.uint8)
    dest.index_copy_(0, slots, values)
