"""Small deliberate mutations that tests/model/test_fast_path.py must catch (a pytest plugin, not a test).

    MUT=attn PYTHONPATH=. python -m pytest -q -p tests.model.fast_path_mutations tests/model/test_fast_path.py
    MUT=topk ...

attn: the sparse-attention reference output scaled by (1 + 2e-5); topk: in every 50th prefill row with more
than k candidates, the k-th pick of the fused top-k reference replaced by the (k+1)-th. On 2026-12-02 the
previous tolerances (2e-4, 5e-2, 99% / 95% agreement) passed both mutations except one test; the current
ones fail 6 tests (attn) and 3 tests (topk).
"""

import os

import torch


def pytest_configure(config):
    mut = os.environ.get("MUT")
    from dsaserve.kernels import reference as R

    if mut == "attn":
        orig_mla = R.sparse_mla

        def sparse_mla(*a, **k):
            out, lse = orig_mla(*a, **k)
            return out * (1 + 2e-5), lse

        R.sparse_mla = sparse_mla
    elif mut == "topk":
        orig_topk = R.mqa_topk_indices

        def mqa_topk_indices(q, keys, k_scale, w, ks, ke, k, offset=0, **kw):
            more = orig_topk(q, keys, k_scale, w, ks, ke, k + 1, offset, **kw)
            out = more[:, :k].clone()
            hit = (torch.arange(out.shape[0]) % 50 == 0) & (more[:, k] >= 0)
            out[hit, k - 1] = more[hit, k]
            return out

        R.mqa_topk_indices = mqa_topk_indices
    elif mut:
        raise ValueError(f"MUT must be attn or topk, got {mut!r}")
