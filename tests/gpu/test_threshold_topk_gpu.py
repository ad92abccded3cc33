"""The threshold indexer top-k (``threshold_topk.mqa_topk_threshold``) and its filter kernel on the GPU (sm_90).

The filter (``indexer_logits_hopper.mqa_threshold_candidates``) must hand back exactly the valid keys whose
logit is >= the row's threshold, with its logits' own bits (the logits kernel's at 64 heads); the whole path
must select exactly what ``reference.select_topk_ordered`` selects on those logits (the same set per row, the
same -1 padding and offsets; a row lists its columns in candidate order), including rows it had to redo
(thresholds forced too high or buffers too small) and ties, without a host sync.
"""

import pytest
import torch

from tests.gpu.test_kernels_gpu import _kernels, _logits_inputs


def _hopper():
    from dsaserve.kernels import indexer_logits_hopper as G

    if torch.cuda.get_device_capability()[0] != 9 or not G.HAVE_GLUON:
        pytest.skip("the threshold top-k needs an sm_90 GPU and a Triton with Gluon")
    return G


def _valid(ks, ke, skv):
    cols = torch.arange(skv, device="cuda")
    return (cols[None, :] >= ks[:, None]) & (cols[None, :] < ke[:, None])


def _decode(keys):
    """int64 candidates (raw fp32 bits high, column low) -> (fp32 logits, int64 columns)."""
    return (keys >> 32).to(torch.int32).view(torch.float32), keys & 0xFFFFFFFF


def _rows(idx):
    """Rows as sets: descending, -1 last (the threshold path lists a row in candidate order)."""
    return torch.sort(idx, dim=1, descending=True).values


def _filter_logits(ins):
    """The filter kernel's own logits, dense [S, Skv] (-inf outside each row): every valid key passes T = -inf."""
    G = _hopper()
    s, skv = ins[0].shape[0], ins[1].shape[0]
    thr = torch.full((s,), float("-inf"), device="cuda")
    # (whole blocks: with every key passing, a split block's one-tile part would overflow its share of the slots)
    cand, count = G.mqa_threshold_candidates(*ins, thr, -(-skv // G.STREAMS) + 64,
                                             config=G.LogitsHopperConfig(balanced=False))
    val, col = _decode(cand)
    out = torch.full((s, skv), float("-inf"), device="cuda")
    live = cand != G.EMPTY_KEY
    rows = torch.arange(s, device="cuda")[:, None, None].expand_as(cand)
    out[rows[live], col[live]] = val[live]
    return out


def test_filter_logits_equal_the_logits_kernel(gen):
    """At 64 heads the filter kernel's logits are the logits kernel's bit for bit; below 64 heads they differ in
    the last bits (the compiler fuses the epilogue's multiply-adds differently in the two variants; measured
    2026-12-03: 1.8% of the values at 32 heads), so there the top-k is exact on the filter's own logits."""
    _hopper()
    K, _ = _kernels()
    for h in (64, 32, 16):
        ins = _logits_inputs(300, 7000, h, 128, gen, False)
        ref = K.mqa_logits(*ins, kernel="gluon")
        got = _filter_logits(ins)
        inf = torch.isinf(ref)
        assert torch.equal(torch.isinf(got), inf)
        if h == 64:
            assert torch.equal(got, ref)
        else:
            d = (got[~inf].double() - ref[~inf].double()).abs().max() / ref[~inf].double().abs().max()
            assert d <= 1e-6, f"H={h}: {d:.2e} of the largest logit"


def _want(ins, k, off):
    """select_topk_ordered on the filter kernel's logits (the logits kernel's at 64 heads), offset, in descending
    column order (-1 last)."""
    _, R = _kernels()
    logits = _filter_logits(ins)
    sel = R.select_topk_ordered(logits, _valid(ins[4], ins[5], ins[1].shape[0]), k)
    sel = torch.sort(sel, dim=1, descending=True).values
    return torch.where(sel >= 0, sel + off[:, None], -1).to(torch.int32)


@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("s,skv,h,causal", [(1000, 5000, 64, False), (501, 3001, 32, True), (3, 40, 64, False),
                                            (257, 20000, 16, True), (2100, 4099, 64, True)])
def test_filter_stores_exactly_the_keys_at_or_above_the_threshold(gen, s, skv, h, causal, balanced):
    """Whole blocks strided over the programs (the filter's default): each stream's first count slots hold its
    keys. Balanced (opt-in): a block split between programs gives each part the slots of its share of the
    block's tiles, so a row's keys sit in any slots; a part that overflows its slots adds caps + 1 to the count
    (the select redoes that row). Either way the stored keys are exactly the passing keys, with the kernel's
    logits, and the counts add up to them."""
    G = _hopper()
    cfg = G.LogitsHopperConfig(balanced=balanced)
    ins = _logits_inputs(s, skv, h, 128, gen, causal)
    logits = _filter_logits(ins)  # (the logits kernel's at 64 heads: test_filter_logits_equal_the_logits_kernel)
    valid = _valid(ins[4], ins[5], skv)
    # thresholds: a row's 50th largest valid logit (or -inf), one row +inf, one -inf
    thr = torch.topk(torch.where(valid, logits, float("-inf")), min(50, skv), dim=1).values[:, -1].contiguous()
    thr[0] = float("inf")
    if s > 2:
        thr[2] = float("-inf")
    # room for every key even in a split block's one-tile part (>= 16 slots a tile: no overflow); not a multiple of 8
    caps = -(-skv // 4) + 61
    cand, count = G.mqa_threshold_candidates(*ins, thr, caps, config=cfg)
    passing = valid & (logits >= thr[:, None])
    assert torch.equal(count.sum(1), passing.sum(1).to(torch.int32))
    assert int(count.max()) <= caps
    stored = cand != G.EMPTY_KEY
    if not balanced:
        filled = torch.arange(caps, device="cuda")[None, None, :] < count[:, :, None].long()  # [S, streams, caps]
        assert torch.equal(stored, filled)
    val, col = _decode(cand)
    for i in range(s):
        cols_i = col[i][stored[i]]
        assert torch.equal(torch.sort(cols_i).values, passing[i].nonzero().squeeze(1)), f"row {i}"
        assert torch.equal(val[i][stored[i]], logits[i, cols_i]), f"row {i}: values are not the kernel's logits"
    # a small buffer: every stored entry is a passing key; a row whose counts stay within the slots has all of them
    # (strided: every stream stores min(count, 8) and counts them all)
    cand2, count2 = G.mqa_threshold_candidates(*ins, thr, 8, config=cfg)
    v2, c2 = _decode(cand2)
    stored2 = cand2 != G.EMPTY_KEY
    rows = torch.arange(s, device="cuda")[:, None, None].expand_as(cand2)
    assert torch.all(passing[rows[stored2], c2[stored2]])
    if not balanced:
        assert torch.equal(count2, count)
        assert torch.equal(stored2.sum(2), count.clamp(max=8))
    else:
        whole = count2.max(1).values <= 8  # rows the select takes as they are
        assert torch.equal(stored2.sum((1, 2))[whole], passing.sum(1)[whole])
        assert torch.all(count2.sum(1) >= count.sum(1))  # (overflowing rows: + 9 per overflowing part)


@pytest.mark.parametrize("s,skv,h,k,causal", [
    (2048, 20000, 64, 2048, True), (1000, 9000, 32, 2048, False), (700, 6000, 64, 512, False),
    (5, 100, 64, 2048, False), (1024, 40000, 64, 2048, True),
])
def test_threshold_topk_equals_the_tie_rule_on_the_kernel_logits(gen, s, skv, h, k, causal):
    _hopper()
    K, _ = _kernels()
    ins = _logits_inputs(s, skv, h, 128, gen, causal)
    off = torch.arange(s, device="cuda", dtype=torch.int32) * 3
    got = K.mqa_topk_indices(*ins, k=k, offset=off, kernel="threshold")
    assert got.dtype == torch.int32 and got.shape == (s, k)
    assert torch.equal(_rows(got), _want(ins, k, off))
    if h == 64:  # the same logits bit for bit: the fused Triton kernel selects the same sets
        assert torch.equal(_rows(got), _rows(K.mqa_topk_indices(*ins, k=k, offset=off, kernel="triton")))
    assert torch.equal(K.mqa_topk_indices(*ins, k=k, offset=off, kernel="threshold"), got)  # deterministic, in order


SELECT_VARIANTS = [("triton", 4, None), ("triton", 8, 512), ("triton", 8, 2048), ("triton", 4, 256),
                   ("gluon", 4, 8), ("gluon", 8, 8), ("gluon", 4, 4), ("gluon", 4, 16)]


@pytest.mark.parametrize("caps", [448, 301])
@pytest.mark.parametrize("kernel,warps,knob", SELECT_VARIANTS)
def test_select_kernel_variants_equal_the_reference_at_the_engine_size(gen, kernel, warps, knob, caps):
    """The select at its engine size (16 streams x 448 slots, k = 2048) and at 301 slots a stream (the Gluon
    kernel's warp segments then end past the row: masked loads), both kernels at every warps /
    output-chunk (Triton) or slots-a-thread (Gluon) variant, against the torch reference (``select_candidates``):
    random rows, rows with the k-th value tied over many columns, rows whose values span both signs and
    magnitudes up to 1e30 and +inf (the Gluon search's fp32 first step and its clamped relative keys), short rows
    (fewer live slots than k), a row with every slot empty. The Gluon kernel lists each row in the Triton
    kernel's order."""
    from dsaserve.kernels import threshold_topk as T

    s, ns, k = 96, T.STREAMS, 2048
    vals = torch.randn(s, ns, caps, generator=gen, device="cuda")
    vals[: s // 3] = torch.round(vals[: s // 3] * 4) / 4  # few distinct values: ties at the k-th
    wide = slice(s // 3, s // 3 + 8)  # keys spanning 2^31 and more of the order
    vals[wide] = vals[wide] * torch.logspace(-30, 30, caps, device="cuda")[None, None, :]
    vals[s // 3, 0, :5] = float("inf")
    zeros = s // 3 + 8  # the k-th value a tie of +0.0 and -0.0 (one key for both, as comparing floats says)
    vals[zeros] = 0.0
    vals[zeros, :, ::2] = -0.0
    vals[zeros, :4, :] = 1.0  # 4 x 448 = 1792 slots above it
    cols = torch.argsort(torch.rand(s, 4 * ns * caps, generator=gen, device="cuda"), 1)[:, : ns * caps]
    cols = cols.view(s, ns, caps)
    counts = torch.randint(150, caps + 1, (s, ns), generator=gen, device="cuda", dtype=torch.int32)
    counts[-8:] //= 4  # short rows
    counts[-1] = 0  # no candidate at all
    live = torch.arange(caps, device="cuda")[None, None, :] < counts[:, :, None]
    keys = torch.where(live, T.candidate_keys(vals, cols), torch.full_like(cols, T.EMPTY_KEY))
    off = torch.arange(s, device="cuda", dtype=torch.int32) * 7
    ks = torch.zeros(s, device="cuda", dtype=torch.int32)
    ke = torch.full((s,), 4 * ns * caps, device="cuda", dtype=torch.int32)
    redo = torch.empty(s, device="cuda", dtype=torch.int32)
    args = dict(counts=counts, ks=ks, ke=ke, redo=redo, n_keys=4 * ns * caps, num_warps=warps)
    if kernel == "triton":
        got = T.select_candidates_triton(keys, k, off, chunk=knob, **args)
    else:
        got = T.select_candidates_gluon(keys, k, off, slots_per_thread=knob, **args)
        redo_t = torch.empty_like(redo)
        in_order = T.select_candidates_triton(keys, k, off, **{**args, "redo": redo_t, "num_warps": 4})
        assert torch.equal(got, in_order)  # same columns in the same order
        assert torch.equal(redo, redo_t)
    pos = torch.where(live, cols, torch.full_like(cols, -1)).view(s, -1)
    want, want_redo = T.select_candidates(pos, vals.view(s, -1), counts.sum(1), ke - ks, k)
    want = torch.where(want >= 0, want + off[:, None], want).to(torch.int32)
    assert torch.equal(_rows(got), _rows(want))
    assert torch.equal(redo.bool(), want_redo)


@pytest.mark.parametrize("n,r", [(1750, 128), (2048, 128), (4096, 128), (333, 20), (128, 128), (5000, 64)])
def test_row_threshold_kernels_equal_the_rth_largest_finite_value(gen, n, r):
    """The Gluon row threshold (one warp a row up to 2048 samples) == the Triton kernel == the torch r-th largest
    finite value, -inf with fewer than r: random rows, ties, half the row outside (-inf), an empty row, negative
    values only, all equal, signed zeros tied, exactly r finite values of both signs, a row spanning +-1e30 and
    +inf, rows with fewer than r finite values."""
    from dsaserve.kernels import threshold_topk as T

    x = torch.randn(12, n, generator=gen, device="cuda")
    x[1] = torch.round(x[1])
    x[2, n // 2:] = float("-inf")
    x[3] = float("-inf")
    x[4] = -torch.rand(n, generator=gen, device="cuda")
    x[5] = 0.5
    x[6, : n // 3] = -0.0
    x[6, n // 3:] = 0.0
    x[7, :r] = torch.linspace(-2.0, 3.0, r, device="cuda")
    x[7, r:] = float("-inf")
    x[8] = x[8] * torch.logspace(-30, 30, n, device="cuda")
    x[8, :3] = float("inf")
    x[9, r - 1:] = float("-inf")  # r - 1 finite values
    x[10] = torch.round(x[10] * 2) / 2  # few values, both zeros
    x[11, ::3] = float("-inf")
    got = T.row_thresholds(x, r, kernel="gluon")
    assert torch.equal(got, T.row_thresholds_triton(x, r))
    fin = torch.where(torch.isfinite(x) | (x == float("inf")), x, torch.full_like(x, float("-inf")))
    kth = torch.sort(fin, dim=1, descending=True).values[:, r - 1]
    want = torch.where((fin > float("-inf")).sum(1) >= r, kth, torch.full_like(kth, float("-inf")))
    assert torch.equal(got, want)


def test_threshold_topk_redoes_the_rows_its_candidates_miss(gen):
    """A threshold above the k-th value (margin < 1) or streams too small: the flagged rows are redone exactly."""
    _hopper()
    from dsaserve.kernels.threshold_topk import ThresholdTopkConfig, mqa_topk_threshold

    s, skv, k = 600, 12000, 1024
    ins = _logits_inputs(s, skv, 64, 128, gen, True)
    want = _want(ins, k, torch.zeros(s, device="cuda", dtype=torch.int32))
    counter = torch.zeros(1, dtype=torch.int64, device="cuda")  # the engine's redo count (llm.stats())
    counted = 0
    for cfg in (ThresholdTopkConfig(margin=0.5), ThresholdTopkConfig(caps=40), ThresholdTopkConfig(rows=100)):
        stats = {}
        got = mqa_topk_threshold(*ins, k, 0, config=cfg, stats=stats, redo_rows=counter)
        assert torch.equal(_rows(got), want), cfg
        n_redo = int(stats["redo"].sum())
        counted += n_redo
        assert int(counter.item()) == counted, (cfg, int(counter.item()), counted)
        if cfg.margin < 1 or cfg.caps < 64:
            assert n_redo > s // 2, (cfg, n_redo)  # most full rows missed or overflowed
        else:  # the threshold sits ~3 standard deviations of its count above k = 1024 here: a few rows at most
            assert n_redo <= s // 50, (cfg, n_redo)


def test_rows_with_exactly_r_samples_are_not_redone(gen):
    """Rows of 4065..4096 keys hold exactly r = 128 samples at the default stride 32: their threshold is their
    smallest sample (it was NaN when the samples had both signs, and every such row was redone: 32 rows a layer
    in the engine's first 16K chunk, H200 2026-12-04). No row of this range is redone now, and all are exact."""
    _hopper()
    from dsaserve.kernels.threshold_topk import ThresholdTopkConfig, mqa_topk_threshold, sample_thresholds

    s, skv, k = 256, 4200, 2048
    q, kf, ksc, w, _, _ = _logits_inputs(s, skv, 64, 128, gen, True)
    ks = torch.zeros(s, dtype=torch.int32, device="cuda")
    ke = (3950 + torch.arange(s, device="cuda")).to(torch.int32)  # 3950..4205 keys: 124..132 samples
    ins = (q, kf, ksc, w, ks, ke)
    thr = sample_thresholds(*ins, k, ThresholdTopkConfig())
    assert not torch.isnan(thr).any()
    stats = {}
    got = mqa_topk_threshold(*ins, k, 0, stats=stats)
    assert int(stats["redo"].sum()) == 0
    assert torch.equal(_rows(got), _want(ins, k, torch.zeros(s, device="cuda", dtype=torch.int32)))


def test_threshold_topk_ties_go_to_the_higher_column(gen):
    """Keys repeated every 97 columns with the same scale: every logit appears many times, so the k-th value is
    tied across many columns and only the tie rule decides."""
    _hopper()
    K, _ = _kernels()
    s, skv, k = 300, 9000, 700
    q, kf, ksc, w, ks, ke = _logits_inputs(s, skv, 64, 128, gen, False)
    kf = kf[torch.arange(skv, device="cuda") % 97].contiguous()
    ksc = torch.full_like(ksc, 0.02)
    ins = (q, kf, ksc, w, ks, ke)
    off = torch.zeros(s, device="cuda", dtype=torch.int32)
    got = K.mqa_topk_indices(*ins, k=k, offset=off, kernel="threshold")
    assert torch.equal(_rows(got), _want(ins, k, off))


def test_threshold_topk_no_host_sync_and_auto(gen, monkeypatch):
    _hopper()
    K, _ = _kernels()
    from dsaserve.kernels import threshold_topk as T

    ins = _logits_inputs(400, K.THRESHOLD_MIN_KEYS, 64, 128, gen, True)
    K.mqa_topk_indices(*ins, k=2048, kernel="threshold")  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        K.mqa_topk_indices(*ins, k=2048, kernel="threshold")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    calls = []
    real = T.mqa_topk_threshold
    monkeypatch.setattr(T, "mqa_topk_threshold", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    K.mqa_topk_indices(*ins, k=2048)  # auto, 16K keys, 64 heads: threshold
    assert calls == [1]
    K.mqa_topk_indices(*_logits_inputs(64, K.THRESHOLD_MIN_KEYS - 1, 64, 128, gen, True), k=2048)  # short: Triton
    K.mqa_topk_indices(*_logits_inputs(64, K.THRESHOLD_MIN_KEYS, 128, 128, gen, True), k=2048)  # 128 heads: Triton
    assert calls == [1]
    with pytest.raises(ValueError, match="at most 64 heads"):
        K.mqa_topk_indices(*_logits_inputs(8, 100, 128, 128, gen, True), k=16, kernel="threshold")


def test_threshold_topk_marks_its_selection_work(gen, monkeypatch):
    """``mark`` wraps the sample and the select + redo (two "topk" regions, the filter outside them), and the rows do
    not change with it: this is how the engine's breakdown shows the top-k's own time."""
    _hopper()
    K, _ = _kernels()
    import contextlib

    from dsaserve.kernels import indexer_logits_hopper as G

    ins = _logits_inputs(300, 7000, 64, 128, gen, True)
    names, depth, inside = [], [0], []

    @contextlib.contextmanager
    def mark(name):
        names.append(name)
        depth[0] += 1
        yield
        depth[0] -= 1

    real = G.mqa_threshold_candidates
    monkeypatch.setattr(G, "mqa_threshold_candidates", lambda *a, **kw: inside.append(depth[0]) or real(*a, **kw))
    got = K.mqa_topk_indices(*ins, k=512, kernel="threshold", mark=mark)
    assert names == ["topk", "topk"] and inside == [0] and depth == [0]
    assert torch.equal(got, K.mqa_topk_indices(*ins, k=512, kernel="threshold"))


def test_threshold_topk_peak_memory_has_no_logits_buffer(gen):
    """4K queries x 64K keys: the unfused path's logits alone are 1 GiB; the threshold path stays below half of that
    above its inputs (candidates 4K x 16 x 448 x 8 B = 235 MB, a 4K x 2K fp32 sample block, the redo kernel's
    workspace, the output)."""
    _hopper()
    K, _ = _kernels()
    s, skv = 4096, 65536
    ins = _logits_inputs(s, skv, 64, 128, gen, True)
    K.mqa_topk_indices(*ins, k=2048, kernel="threshold")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = K.mqa_topk_indices(*ins, k=2048, kernel="threshold")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < (s * skv * 4) // 2, f"{extra / 2**20:.0f} MiB above the inputs"
    del out
