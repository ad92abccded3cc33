"""The fp8 model paths that only run at decode sizes on the GPU, against the CPU reference model with the same
weights: projections fused along N (q_a | wk | kv_a, q_b | wq_b, gate | up: fp8 block-aligned here, which the
default tiny geometry is not), and the norms that hand their fp8 copy to the GEMMs and experts
(``rms_norm_quant``). A wrong row block or a mismatched quantized input changes the output at the scale of
the output itself; the GPU and CPU paths differ only by rounding (fp8 products summed in another order, bf16
activations)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.timeout(600)]

ALIGNED = dict(hidden_size=256, q_lora_rank=128, kv_lora_rank=128, index_head_dim=128, intermediate_size=256,
               moe_intermediate_size=128, num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=8,
               num_key_value_heads=8)  # q_b: 8 x (32 + 16) = 384 rows, whole fp8 blocks


def _forward(ckpt: str, device: str, n: int):
    from dsaserve.cache.kv_cache import KVCache
    from dsaserve.checkpoint.loader import load_checkpoint
    from dsaserve.model.state_dict import checkpoint_specs
    from dsaserve.config import ModelConfig
    from dsaserve.model.backends import select_backends
    from dsaserve.model.batch import ForwardBatch
    from dsaserve.model.deepseek_v32 import DSAModel

    cfg = ModelConfig.from_hf(ckpt)
    dev = torch.device(device)
    backends = select_backends(quantization="fp8", indexer="exact", device=dev, dtype=torch.bfloat16)
    model = DSAModel(cfg, backends=backends, dtype=torch.bfloat16, device=dev)
    load_checkpoint(ckpt, checkpoint_specs(model), progress=False)
    page = 64
    cache = KVCache(cfg, model.layer_range, 2, page, torch.bfloat16, dev, backends.indexer.fp8)
    ids = torch.arange(3, 3 + n, device=dev) % cfg.vocab_size
    batch = ForwardBatch(positions=torch.arange(n, device=dev), token_req=torch.zeros(n, dtype=torch.long, device=dev),
                         req_seq_lens=[n], block_tables=torch.arange(2, device=dev)[None],
                         write_slots=torch.arange(n, device=dev), page_size=page)
    with torch.no_grad():
        h, r = model(batch, cache, input_ids=ids)
        logits = model.compute_logits(h, r)
    return model, logits.float().cpu()


@pytest.mark.parametrize("n", [1, 9])
def test_fused_and_prequantized_paths_match_cpu(tmp_path, n):
    from dsaserve.checkpoint.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(str(tmp_path / "aligned"), fp8=True, **ALIGNED)
    gpu_model, gpu = _forward(ckpt, "cuda", n)
    attn = gpu_model.layers["0"].self_attn
    assert attn.x_proj is not None and attn.qr_proj is not None          # the fused GEMMs are what ran
    assert gpu_model.layers["0"].mlp.gate_up is not None and gpu_model.layers["1"].mlp.shared_experts.gate_up
    _, cpu = _forward(ckpt, "cpu", n)
    err = float((gpu - cpu).norm() / cpu.norm())
    assert err < 2e-2, f"logits rel err {err:.3e}"
    print(f"n={n}: logits rel err GPU vs CPU {err:.3e}")
