"""How many KV pages a rank can hold, decided after its weights are loaded.

Every rank proposes a number and the world takes the minimum (slot ids are global, so all ranks must
hold the same pages). CPU: enough for a few contexts of max_model_len. CUDA: the memory torch can still
allocate (``cuda_available_bytes``) minus what the caller reserves for everything but the cache (the
runner passes the memory plan's prefill transient peak plus a stated headroom).
"""

from __future__ import annotations

import torch

from dsaserve.cache.kv_cache import KVCache
from dsaserve.config import ModelConfig


def cuda_available_bytes(device: torch.device) -> int:
    """Free device memory plus what torch's caching allocator holds but does not use (load-time temporaries
    it kept cached): the bytes new tensors can take."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def propose_kv_pages(cfg: ModelConfig, *, kv_cache_tokens: int | None, max_model_len: int, max_num_seqs: int,
                     page_size: int, num_layers: int, dtype: torch.dtype, device: torch.device,
                     indexer_fp8: bool, reserved_bytes: int = 0, available_bytes: int | None = None) -> int:
    """KV pages for this rank: ``kv_cache_tokens`` when given; on CUDA whatever ``available_bytes`` (default:
    ``cuda_available_bytes``) leaves after ``reserved_bytes``, at least one page; on CPU a few contexts."""
    if kv_cache_tokens is not None:
        tokens = kv_cache_tokens
    elif device.type == "cuda":
        per_page = max(KVCache.bytes_per_token(cfg, num_layers, dtype, indexer_fp8), 1) * page_size
        available = cuda_available_bytes(device) if available_bytes is None else available_bytes
        return max(1, (available - reserved_bytes) // per_page)                # whole pages within the budget
    else:
        tokens = min(max_model_len * min(max_num_seqs, 4), 1 << 20)
    return max(1, -(-tokens // page_size))
