"""How many KV pages a rank can hold, decided after its weights are loaded.

Every rank proposes a number and the world takes the minimum (slot ids are global, so all ranks must
hold the same pages). CPU: enough for a few contexts of max_model_len. CUDA: 90% of the free memory.
"""

from __future__ import annotations

import torch

from dsaserve.cache.kv_cache import KVCache
from dsaserve.config import ModelConfig


def propose_kv_pages(cfg: ModelConfig, *, kv_cache_tokens: int | None, max_model_len: int, max_num_seqs: int,
                     page_size: int, num_layers: int, dtype: torch.dtype, device: torch.device,
                     indexer_fp8: bool) -> int:
    if kv_cache_tokens is not None:
        tokens = kv_cache_tokens
    elif device.type == "cuda":
        per_token = KVCache.bytes_per_token(cfg, num_layers, dtype, indexer_fp8)
        free, _ = torch.cuda.mem_get_info(device)
        # leave room for activations: the largest prefill chunk's intermediates are a few GiB
        tokens = max(int(free * 0.9 - (4 << 30)) // max(per_token, 1), page_size)
    else:
        tokens = min(max_model_len * min(max_num_seqs, 4), 1 << 20)
    return max(1, -(-tokens // page_size))
