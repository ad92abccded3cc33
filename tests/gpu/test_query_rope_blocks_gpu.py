"""The kernel attention backend's blocked prefill on the GPU at V3.2's MLA shapes (128 heads, kv_lora 512, rope 64):
q_pe roped block by block straight into each block's absorbed-query buffer (``QueryRope``) against the path
before it (all n roped in place, each block's rows copied into the buffer): the same queries reach every
sparse_mla call and the attention output is the same, bit for bit."""

import types

import torch


def test_blocked_query_rope_equals_rope_then_copy(gen, monkeypatch):
    from dsaserve import kernels   # imported in the test: see test_kernels_gpu._kernels
    from dsaserve.model import attention as attention_mod
    from dsaserve.model.mla import QueryRope

    H, nope, rope, L, v_dim, topk, pool = 128, 128, 64, 512, 128, 2048, 20000
    w_kv_b = (torch.randn(H, nope + v_dim, L, device="cuda", generator=gen) * 0.05).bfloat16()
    attn = types.SimpleNamespace(n_heads=H, nope=nope, rope=rope, kv_lora=L, v_dim=v_dim, scale=192 ** -0.5,
                                 indexer=None, layer_idx=0, w_kv_b=lambda: (w_kv_b[:, :nope], w_kv_b[:, nope:]))
    backend = attention_mod.TritonAttention()
    block = backend._block(attn)                                           # 3640 tokens at these shapes
    n = 2 * block + 1000                                                   # two whole blocks + a ragged one
    q = torch.randn(n, H, nope + rope, device="cuda", generator=gen).bfloat16()   # [n, H, 192], q_b's output
    ang = (torch.arange(n, device="cuda")[:, None] + 3000) * torch.rand(rope // 2, device="cuda", generator=gen)
    cos, sin = ang.cos().bfloat16(), ang.sin().bfloat16()                  # [n, 32]
    latent = torch.randn(pool, L + rope, device="cuda", generator=gen).bfloat16()  # [slots, 576]
    slots = torch.randint(0, pool, (n, topk), device="cuda", generator=gen, dtype=torch.int32)
    slots[::7, topk // 2:] = -1                                            # some rows with fewer keys
    cache = types.SimpleNamespace(latent=latent)
    seen: list[torch.Tensor] = []                                          # each sparse_mla call's q [t, H, 576]
    mla = attention_mod.sparse_mla

    def recorded(q_abs, *a, **k):
        seen.append(q_abs.clone())
        return mla(q_abs, *a, **k)

    monkeypatch.setattr(attention_mod, "sparse_mla", recorded)

    def run(q, q_rope):
        batch = types.SimpleNamespace(scratch={"topk_slots": slots}, static=False)   # a "shared" layer's top-k
        seen.clear()
        out = backend.attend(attn, q[..., :nope], q[..., nope:], None, None, batch, cache, q_rope)
        return out, list(seen)

    q_new = q.clone()
    assert backend.query_rope_out(attn, q_new[..., nope:]) is None         # MLA leaves the rope to attend
    out_new, seen_new = run(q_new, QueryRope(cos, sin))
    assert torch.equal(q_new, q)                                           # q_pe only read
    q_old = q.clone()
    kernels.rope(q_old[..., nope:], cos, sin, True, out=q_old[..., nope:])  # MLA's in-place rope, all n rows
    out_old, seen_old = run(q_old, None)
    assert [x.shape[0] for x in seen_new] == [x.shape[0] for x in seen_old] == [block, block, 1000]
    for j, (x, y) in enumerate(zip(seen_new, seen_old)):
        assert torch.equal(x, y), f"sparse_mla call {j}"
    assert torch.equal(seen_new[0][..., L:], q_old[:block, :, nope:])      # roped rows in the rope columns
    assert torch.equal(out_new, out_old)
