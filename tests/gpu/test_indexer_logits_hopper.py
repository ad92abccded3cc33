"""The Gluon indexer logits kernel (sm_90) against the PyTorch reference and the Triton kernel, on the GPU.

Both kernels run the same fp8 MMA (64 keys x 256 (query, head) columns, 4 k-steps of 32) on the same operands
and the same fp32 epilogue, so they agree to the last bits (the order of the head sum is the only freedom);
against the exact fp32 reference the bound is the fp8 MMA's accumulation (LOGITS_REL in test_kernels_gpu.py).
Shapes: ragged query blocks (S not a multiple of BQ), key counts not a multiple of the 64-key tile, rows with
empty ranges, fewer programs than SMs, every head count the kernel takes.
"""

import pytest
import torch

from tests.gpu.test_kernels_gpu import _assert_logits_close, _kernels, _logits_inputs

TRITON_REL = 1e-6  # same MMA outputs, same fp32 epilogue: only the head sum's order may differ


def _hopper():
    from dsaserve.kernels import indexer_logits_hopper as G

    if torch.cuda.get_device_capability()[0] != 9 or not G.HAVE_GLUON:
        pytest.skip("the Gluon logits kernel needs an sm_90 GPU and a Triton with Gluon")
    return G


def _assert_same_as_triton(out, tri):
    inf = torch.isinf(tri)
    assert torch.equal(torch.isinf(out), inf) and torch.all(out[inf] < 0) and not torch.isnan(out).any()
    d = (out[~inf].double() - tri[~inf].double()).abs().max() / tri[~inf].double().abs().max()
    assert d <= TRITON_REL, f"max diff vs Triton {d:.2e} of the largest logit"


@pytest.mark.parametrize("s,skv,h,causal", [
    (1024, 8192, 64, True), (777, 5000, 64, False), (1024, 8192, 32, True), (501, 3001, 32, False),
    (300, 2000, 16, False), (257, 4099, 128, True), (3, 40, 64, False), (9, 70, 32, True),
])
def test_gluon_logits_match_reference_and_triton(gen, s, skv, h, causal):
    G = _hopper()
    K, R = _kernels()
    ins = _logits_inputs(s, skv, h, 128, gen, causal)
    out = K.mqa_logits(*ins, kernel="gluon")
    ref = R.mqa_logits(*ins)
    _assert_logits_close(out, ref)
    _assert_same_as_triton(out, K.mqa_logits(*ins, kernel="triton"))
    _assert_logits_close(G.mqa_logits_hopper(*ins, num_sms=13, config=G.LogitsHopperConfig(stages=8)), ref)
    assert torch.equal(K.mqa_logits(*ins, kernel="gluon"), out)  # deterministic


@pytest.mark.parametrize("stages", [4, 8])
@pytest.mark.parametrize("s,skv,h,causal", [(777, 5000, 64, False), (501, 3001, 32, True), (5, 100, 128, False)])
def test_gluon_logits_ring_depths(gen, stages, s, skv, h, causal):
    """Both ring depths the benchmark times give the Triton kernel's logits; 128 heads is two queries a block
    (the MMA-layout head sum instead of the quad reduce-scatter)."""
    G = _hopper()
    K, R = _kernels()
    ins = _logits_inputs(s, skv, h, 128, gen, causal)
    cfg = G.LogitsHopperConfig(stages)
    out = G.mqa_logits_hopper(*ins, config=cfg)
    _assert_logits_close(out, R.mqa_logits(*ins))
    _assert_same_as_triton(out, K.mqa_logits(*ins, kernel="triton"))
    _assert_same_as_triton(G.mqa_logits_hopper(*ins, num_sms=7, config=cfg), out)


@pytest.mark.parametrize("s,skv,h,causal", [
    (1024, 8192, 64, True), (777, 5000, 64, False), (501, 3001, 32, True), (300, 2000, 16, False),
    (5, 100, 128, False), (9, 70, 32, True),
])
def test_gluon_logits_ordered_mma_issues_change_nothing(gen, s, skv, h, causal):
    """The consumers' MMAs issued in tile order (``LogitsHopperConfig.ordered``, ``mma_turns``) give the same logits
    bit for bit, and at H <= 64 the same threshold candidates and counts, on blocks of odd and even tile counts,
    causal blocks with empty rows, and fewer programs than SMs (a wrong turn would hang: the device part that
    runs this file has a kill timeout)."""
    G = _hopper()
    ins = _logits_inputs(s, skv, h, 128, gen, causal)
    for sms in (None, 7):
        plain = G.mqa_logits_hopper(*ins, num_sms=sms)
        ordered = G.mqa_logits_hopper(*ins, num_sms=sms, config=G.LogitsHopperConfig(ordered=True))
        assert torch.equal(ordered, plain), sms
    if h <= 64:
        thr = torch.quantile(torch.where(torch.isinf(plain), 0.0, plain), 0.9, dim=1).contiguous()
        caps = -(-skv // G.STREAMS) + 8
        cand, count = G.mqa_threshold_candidates(*ins, thr, caps)
        cand2, count2 = G.mqa_threshold_candidates(*ins, thr, caps, config=G.LogitsHopperConfig(ordered=True))
        assert torch.equal(count2, count) and torch.equal(cand2, cand)


@pytest.mark.parametrize("s,skv,h,causal", [
    (1024, 8192, 64, True), (777, 5000, 64, False), (501, 3001, 32, True), (300, 2000, 16, False),
    (5, 100, 128, False), (9, 70, 32, True), (3, 40, 64, False), (2100, 4099, 64, True),
])
def test_relu_add_and_balanced_schedule_change_no_bit(gen, s, skv, h, causal):
    """``relu_add`` (2 relu(s) as s + |s|, the sums halved) and the ``balanced`` schedule (blocks split between
    programs at tile boundaries, each block's -inf tiles written once) give the default kernel's logits bit for
    bit: on ragged and causal blocks with empty rows, with more programs than blocks (5 queries over 132 SMs)
    and fewer (7 / 13), alone and together, and with the MMAs in turn. relu_add also leaves the threshold
    filter's candidates and counts unchanged."""
    G = _hopper()
    K, R = _kernels()
    ins = _logits_inputs(s, skv, h, 128, gen, causal)
    max_strided = G.LogitsHopperConfig(relu_add=False, balanced=False)  # session 20's kernel
    plain = G.mqa_logits_hopper(*ins, config=max_strided)
    _assert_logits_close(plain, R.mqa_logits(*ins))
    assert G.relu_add(G.default_config(h), h, filter_kernel=False) and G.default_config(h).balanced
    for sms in (None, 7, 13):
        for cfg in (None, G.LogitsHopperConfig(), G.LogitsHopperConfig(relu_add=False, balanced=True),
                    G.LogitsHopperConfig(ordered=True, balanced=True)):
            assert torch.equal(G.mqa_logits_hopper(*ins, num_sms=sms, config=cfg), plain), (sms, cfg)
    if h <= 64:
        thr = torch.quantile(torch.where(torch.isinf(plain), 0.0, plain), 0.9, dim=1).contiguous()
        caps = -(-skv // 4) + 8  # >= 16 slots a tile: no part of a split block overflows
        cand, count = G.mqa_threshold_candidates(*ins, thr, caps, config=max_strided)
        cand2, count2 = G.mqa_threshold_candidates(*ins, thr, caps, config=G.LogitsHopperConfig(relu_add=True))
        assert torch.equal(count2, count) and torch.equal(cand2, cand)  # relu_add: the same bits
        cand3, count3 = G.mqa_threshold_candidates(*ins, thr, caps, config=G.LogitsHopperConfig(balanced=True))
        assert torch.equal(cand3.flatten(1).sort(1).values, cand.flatten(1).sort(1).values)
        assert torch.equal(count3.sum(1), count.sum(1))


def test_auto_takes_gluon_on_long_ranges_and_triton_config_keeps_triton(gen, monkeypatch):
    G = _hopper()
    K, _ = _kernels()
    ins = _logits_inputs(64, G.AUTO_MIN_KEYS, 64, 128, gen, True)
    calls = []
    real = G.mqa_logits_hopper
    monkeypatch.setattr(G, "mqa_logits_hopper", lambda *a, **k: calls.append(1) or real(*a, **k))
    K.mqa_logits(*ins)
    assert calls == [1]
    K.mqa_logits(*_logits_inputs(64, G.AUTO_MIN_KEYS - 1, 64, 128, gen, True))  # short: Triton
    assert calls == [1]
    from dsaserve.kernels.indexer_logits import LogitsConfig

    K.mqa_logits(*ins, config=LogitsConfig())
    K.mqa_logits(*ins, kernel="triton")
    assert calls == [1]


def test_gluon_logits_no_host_sync(gen):
    _hopper()
    K, _ = _kernels()
    ins = _logits_inputs(333, 2500, 64, 128, gen, False)
    K.mqa_logits(*ins, kernel="gluon")  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        K.mqa_logits(*ins, kernel="gluon")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_gluon_logits_launch_under_the_engines_compile_watch(gen):
    """With Triton's JIT hooks set (the engine's compile watch, installed by every engine on CUDA), Triton
    JSON-serializes a launch's constexprs before compiling: a variant compiled here must launch and be right
    (a layout passed as a constexpr failed exactly here, after the engine tests in the same process)."""
    G = _hopper()
    K, R = _kernels()
    from triton import knobs

    from dsaserve.runtime.compile_watch import CompileWatch, install

    rt = knobs.runtime
    saved = rt.jit_cache_hook, rt.jit_post_compile_hook
    rt.jit_cache_hook = rt.jit_post_compile_hook = None
    watch = CompileWatch()
    try:
        assert install(watch)
        ins = _logits_inputs(77, 1000, 64, 128, gen, False)
        out = G.mqa_logits_hopper(*ins, config=G.LogitsHopperConfig(stages=5))  # a variant no other test compiles
        _assert_logits_close(out, R.mqa_logits(*ins))
        assert watch.count >= 1  # the hook ran: the variant was compiled under it
    finally:
        rt.jit_cache_hook, rt.jit_post_compile_hook = saved
