"""Fused indexer top-k (``mqa_topk_indices``): Triton kernel (interpreter) vs the reference, exact sets."""

import pytest
import torch

from dsaserve import kernels as K
from dsaserve.kernels import reference as R
from dsaserve.kernels.indexer_topk import TopkConfig, cut_slack, list_slots

from ._util import fp8_randn, ragged_ranges, triton  # noqa: F401

FUSED = "indexer_topk.mqa_topk_triton"
REF = "reference.mqa_topk_indices"


def _random_inputs(s, h, d, skv, seed):
    g = torch.Generator().manual_seed(seed)
    q = fp8_randn(s, h, d, gen=g)
    k = fp8_randn(skv, d, gen=g)
    ksc = torch.rand(skv, generator=g) + 0.5
    w = torch.randn(s, h, generator=g)
    ks, ke = ragged_ranges(s, skv, g)
    return q, k, ksc, w, ks, ke


def _integer_inputs(s, h, d, skv, seed):
    """Small integers and power-of-two scales: every logit is exact in fp32 in any summation order, and
    many logits are equal, so the tie rule decides (the fused kernel must match the reference exactly)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (s, h, d), generator=g).float().to(torch.float8_e4m3fn)
    k = torch.randint(-1, 2, (skv, d), generator=g).float().to(torch.float8_e4m3fn)
    ksc = 2.0 ** torch.randint(-1, 2, (skv,), generator=g).float()
    w = torch.randint(-3, 4, (s, h), generator=g).float()
    ks, ke = ragged_ranges(s, skv, g)
    return q, k, ksc, w, ks, ke


def _naive_topk(q, k, ksc, w, ks, ke, topk, offset):
    """Python loops over the formula: logits in float64, sorted by (logit desc, column desc)."""
    qd, kd = q.double(), k.double()
    rows = []
    for i in range(q.shape[0]):
        cand = []
        for j in range(max(int(ks[i]), 0), min(int(ke[i]), k.shape[0])):
            v = float((w[i].double() * (qd[i] @ kd[j]).clamp_min(0)).sum() * float(ksc[j]))
            cand.append((-v, -j))
        cand.sort()
        picked = [-c[1] + offset for c in cand[:topk]]
        rows.append(picked + [-1] * (topk - len(picked)))
    return torch.tensor(rows, dtype=torch.int32)


def _assert_same_rows(out, want):
    """Same set per row (the order within a row is not part of the contract), same -1 padding."""
    assert out.shape == want.shape and out.dtype == torch.int32
    assert torch.equal(torch.sort(out, dim=1).values, torch.sort(want, dim=1).values)


@pytest.mark.checks("reference.select_topk_ordered")
def test_select_topk_ordered_rule():
    logits = torch.tensor([[1.0, 3, 3, float("-inf"), 2, 3], [0, 0, 0, 0, 0, 0], [5, 4, 3, 2, 1, 0]])
    valid = torch.tensor([[1, 1, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    got = R.select_topk_ordered(logits, valid, 4)
    # ties go to the higher column; a valid -inf column beats invalid ones; short rows pad with -1
    assert got.tolist() == [[5, 2, 1, 0], [2, 1, -1, -1], [0, 1, 2, 3]]
    assert R.select_topk_ordered(logits, valid, 7)[0].tolist() == [5, 2, 1, 0, 3, -1, -1]


# (the logits' own references are checked in test_mqa_logits.py: a 7x + 3 mutation of the logits is monotone,
# so no top-k can notice it)
@pytest.mark.checks(REF, "reference.select_topk_ordered")
@pytest.mark.parametrize("make", [_random_inputs, _integer_inputs])
def test_reference_matches_naive(make):
    q, k, ksc, w, ks, ke = make(6, 4, 16, 40, 3)
    got = R.mqa_topk_indices(q, k, ksc, w, ks, ke, 5, offset=11, chunk=4)
    want = _naive_topk(q, k, ksc, w, ks, ke, 5, 11)
    assert torch.equal(got, want)  # exact, including the order within rows


@pytest.mark.checks(FUSED, REF)
@pytest.mark.parametrize("make", [_random_inputs, _integer_inputs])
@pytest.mark.parametrize("s,h,d,skv,topk,cfg,num_sms", [
    (9, 16, 32, 300, 8, TopkConfig(bq=1, bk=16, ring_tiles=2), 3),  # many cuts (lists of 128)
    (7, 16, 64, 150, 20, TopkConfig(bq=2, bk=16, ring_tiles=4), None),  # sizes not multiples of the tiles
    (5, 32, 16, 40, 64, TopkConfig(bq=1, bk=16, ring_tiles=2), 1),  # k larger than every row: all valid, then -1
    (4, 8, 16, 33, 3, TopkConfig(bq=1, bk=16, ring_tiles=2), 2),  # H * BQ < 16: the launcher widens BQ
    (6, 16, 32, 97, 1, TopkConfig(bq=4, bk=32, ring_tiles=1), 2),  # k = 1
])
def test_fused_matches_reference(make, s, h, d, skv, topk, cfg, num_sms):
    q, k, ksc, w, ks, ke = make(s, h, d, skv, s * 100 + skv)
    off = torch.arange(s, dtype=torch.int32) * 1000 - 7  # per-row offsets
    out = K.mqa_topk_indices(q, k, ksc, w, ks, ke, topk, offset=off, backend="triton", config=cfg,
                             num_sms=num_sms)
    _assert_same_rows(out, R.mqa_topk_indices(q, k, ksc, w, ks, ke, topk, offset=off))
    assert torch.all(out[1] == -1) and torch.all(out[2] == -1)  # the empty rows of ragged_ranges


@pytest.mark.checks(FUSED, REF)
@pytest.mark.parametrize("make", [_random_inputs, _integer_inputs])
@pytest.mark.parametrize("splits,topk,cfg_kw", [
    (2, 8, dict(bq=1, bk=16, ring_tiles=2)),   # lists cut inside each split
    (3, 20, dict(bq=2, bk=16, ring_tiles=2)),  # a split count that does not divide the tiles
    (8, 64, dict(bq=1, bk=16, ring_tiles=2)),  # more keys wanted than most splits hold; empty splits
    (4, 1, dict(bq=4, bk=32, ring_tiles=1)),   # k = 1
])
def test_fused_key_splits_match_reference(make, splits, topk, cfg_kw):
    """Few query blocks over many keys: programs split a block's keys, each keeps its own top-k, one merge
    per row picks the top-k of the candidates. Same sets (and ties: the integer inputs) as the reference."""
    s, h, d, skv = 7, 16, 32, 301
    q, k, ksc, w, ks, ke = make(s, h, d, skv, 17 * splits + topk)
    off = torch.arange(s, dtype=torch.int32) * 1000 - 7
    cfg = TopkConfig(key_splits=splits, **cfg_kw)
    out = K.mqa_topk_indices(q, k, ksc, w, ks, ke, topk, offset=off, backend="triton", config=cfg, num_sms=2)
    _assert_same_rows(out, R.mqa_topk_indices(q, k, ksc, w, ks, ke, topk, offset=off))
    out_scalar = K.mqa_topk_indices(q, k, ksc, w, ks, ke, topk, offset=5, backend="triton", config=cfg)
    _assert_same_rows(out_scalar, R.mqa_topk_indices(q, k, ksc, w, ks, ke, topk, offset=5))


@pytest.mark.checks(FUSED, REF)
def test_fused_redo_rewrites_only_the_flagged_rows_blocks():
    """need= (the threshold top-k's exact redo): the query blocks holding a flagged row get their exact rows, all
    other rows of out stay as they were."""
    from dsaserve.kernels.indexer_topk import mqa_topk_triton

    s, h, d, skv, topk = 9, 16, 32, 150, 12
    q, k, ksc, w, ks, ke = _random_inputs(s, h, d, skv, 5)
    out = torch.full((s, topk), 12345, dtype=torch.int32)
    need = torch.zeros(s, dtype=torch.bool)
    need[[3, 8]] = True
    # (the checks read the returned tensor, which is out: a mutation of the launcher's return must show)
    out = mqa_topk_triton(q, k, ksc, w, ks, ke, topk, offset=4, config=TopkConfig(bq=2, bk=16, ring_tiles=2),
                          num_sms=2, need=need, out=out)
    want = R.mqa_topk_indices(q, k, ksc, w, ks, ke, topk, offset=4)
    redone = torch.tensor([2, 3, 8])  # blocks of two rows: {2, 3} and {8}
    _assert_same_rows(out[redone], want[redone])
    kept = torch.ones(s, dtype=torch.bool)
    kept[redone] = False
    assert torch.all(out[kept] == 12345)
    with pytest.raises(ValueError, match="out="):
        mqa_topk_triton(q, k, ksc, w, ks, ke, topk, need=need)
    # need_any gates the whole launch: 1 redoes the flagged rows' blocks as above, 0 leaves every row as it was
    for flag, want_rows in ((1, want[redone]), (0, torch.full((3, topk), 777, dtype=torch.int32))):
        out = torch.full((s, topk), 777, dtype=torch.int32)
        out = mqa_topk_triton(q, k, ksc, w, ks, ke, topk, offset=4, config=TopkConfig(bq=2, bk=16, ring_tiles=2),
                              num_sms=2, need=need, out=out, need_any=torch.tensor([flag], dtype=torch.int32))
        _assert_same_rows(out[redone], want_rows)
        assert torch.all(out[kept] == 777)
    with pytest.raises(ValueError, match="need_any"):
        mqa_topk_triton(q, k, ksc, w, ks, ke, topk, need_any=torch.ones(1, dtype=torch.int32))


def test_auto_key_splits():
    from dsaserve.kernels.indexer_topk import MAX_KEY_SPLITS, auto_key_splits

    assert auto_key_splits(n_qb=300, skv=65536, programs=264, bk=64, ring_tiles=16) == 1  # enough blocks
    assert auto_key_splits(n_qb=64, skv=65536, programs=264, bk=64, ring_tiles=16) == 4   # 256 queries at 64K
    assert auto_key_splits(n_qb=1, skv=65536, programs=264, bk=64, ring_tiles=16) == MAX_KEY_SPLITS
    assert auto_key_splits(n_qb=1, skv=4096, programs=264, bk=64, ring_tiles=16) == 2     # >= 2 segments each
    assert auto_key_splits(n_qb=1, skv=1000, programs=264, bk=64, ring_tiles=16) == 1
    q, k, ksc, w, ks, ke = _random_inputs(2, 16, 32, 20, 1)
    with pytest.raises(ValueError, match="key_splits"):
        K.mqa_topk_indices(q, k, ksc, w, ks, ke, 4, backend="triton", config=TopkConfig(key_splits=9))


@pytest.mark.checks(FUSED)
def test_fused_all_ties_takes_highest_columns():
    """All logits equal (q = 0): the k highest columns of each range, whatever the shrinks did."""
    s, skv, topk = 3, 200, 10
    q = torch.zeros(s, 16, 32).to(torch.float8_e4m3fn)
    k = fp8_randn(skv, 32, gen=torch.Generator().manual_seed(0))
    ks = torch.tensor([0, 50, 190], dtype=torch.int32)
    ke = torch.tensor([200, 120, 200], dtype=torch.int32)
    for splits in (1, 3):  # split keys: the merge keeps the tie rule across the splits
        out = K.mqa_topk_indices(q, k, torch.ones(skv), torch.ones(s, 16), ks, ke, topk, backend="triton",
                                 config=TopkConfig(bq=1, bk=16, ring_tiles=2, key_splits=splits), num_sms=2)
        assert sorted(out[0].tolist()) == list(range(190, 200))
        assert sorted(out[1].tolist()) == list(range(110, 120))
        assert sorted(out[2].tolist()) == list(range(190, 200))


@pytest.mark.checks(FUSED, REF)
@pytest.mark.parametrize("direction", [1, -1])
def test_fused_monotone_logits(direction):
    """Logits that fall with the column (direction -1) make every key a candidate in the kernel's
    high-to-low scan: the lists fill and shrink as often as possible. Rising logits: almost never."""
    s, skv, topk = 2, 400, 6
    g = torch.Generator().manual_seed(1)
    q = (torch.rand(s, 16, 32, generator=g) + 0.5).to(torch.float8_e4m3fn)
    k = (torch.rand(1, 32, generator=g) + 0.5).expand(skv, 32).contiguous().to(torch.float8_e4m3fn)
    ksc = 1.0 + direction * torch.arange(skv).float() / skv
    w = torch.rand(s, 16, generator=g) + 0.1
    ks = torch.zeros(s, dtype=torch.int32)
    ke = torch.tensor([skv, 301], dtype=torch.int32)
    out = K.mqa_topk_indices(q, k, ksc, w, ks, ke, topk, backend="triton", config=TopkConfig(bq=1, bk=16, ring_tiles=2))
    _assert_same_rows(out, R.mqa_topk_indices(q, k, ksc, w, ks, ke, topk))
    want0 = range(skv - topk, skv) if direction == 1 else range(topk)
    assert sorted(out[0].tolist()) == list(want0)


@pytest.mark.checks(FUSED, "topk.topk_indices_torch")
def test_fused_equals_unfused_path():
    """Distinct random logits: the fused kernel and mqa_logits + topk_indices (fused=False, the ablation
    path) select the same sets; the fused kernel computes the same logits tile by tile."""
    q, k, ksc, w, ks, ke = _random_inputs(11, 16, 32, 130, 5)
    cfg = TopkConfig(bq=2, bk=16, ring_tiles=4)
    a = K.mqa_topk_indices(q, k, ksc, w, ks, ke, 12, backend="triton", config=cfg)
    logits = K.mqa_logits(q, k, ksc, w, ks, ke, backend="triton")
    from dsaserve.kernels.topk import topk_indices_torch

    b = topk_indices_torch(logits, ks, ke, 12, assume_masked=True)
    _assert_same_rows(a, b)
    _assert_same_rows(K.mqa_topk_indices(q, k, ksc, w, ks, ke, 12, fused=False), R.topk_indices(
        R.mqa_logits(q, k, ksc, w, ks, ke), ks, ke, 12))


def test_capacity_and_errors():
    assert list_slots(2048, 64, 16) == 8192 and list_slots(8, 16, 2) == 128
    for k, bk, r in [(2048, 64, 16), (2048, 64, 32), (3, 16, 2), (100, 32, 4), (1, 64, 1)]:
        c = list_slots(k, bk, r)
        slack = cut_slack(k, bk, r, c)
        # after a cut (<= k + slack entries) one segment's appends (<= r * bk) still fit
        assert slack >= 0 and k + slack + r * bk <= c
    q, k, ksc, w, ks, ke = _random_inputs(4, 16, 32, 20, 1)
    with pytest.raises(K.KernelInputError, match="k must be >= 1"):
        K.mqa_topk_indices(q, k, ksc, w, ks, ke, 0)
    with pytest.raises(K.KernelInputError, match="offset"):
        K.mqa_topk_indices(q, k, ksc, w, ks, ke, 4, offset=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(K.KernelInputError, match="ke"):
        K.mqa_topk_indices(q, k, ksc, w, ks, ke.long(), 4)


def _few_levels_inputs(s, h, d, skv, seed, levels=3):
    """Logits with a handful of distinct values (q = 0 except one channel, k from `levels` values): huge tie
    groups at every threshold, so intermediate cuts end on an exact T whose ties exceed the slack and the
    final cut keeps a prefix (in list order) of a tie group."""
    g = torch.Generator().manual_seed(seed)
    q = torch.zeros(s, h, d)
    q[:, :, 0] = 1.0
    k = torch.zeros(skv, d)
    k[:, 0] = torch.randint(1, levels + 1, (skv,), generator=g).float()
    ks, ke = ragged_ranges(s, skv, g)
    return (q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn), torch.ones(skv), torch.ones(s, h), ks, ke)


@pytest.mark.checks(FUSED, REF)
@pytest.mark.parametrize("make", [_random_inputs, _integer_inputs, _few_levels_inputs])
@pytest.mark.parametrize("s,skv,topk,cfg", [
    # chunks of 16 slots over lists of 128: live counts straddle chunk boundaries, cuts every segment
    (7, 300, 8, TopkConfig(bq=1, bk=16, ring_tiles=2, cut_chunk=16)),
    # k = 3 in lists of 128: the final cut's live count is far below C (a chunk or two of 32)
    (6, 90, 3, TopkConfig(bq=2, bk=16, ring_tiles=2, cut_chunk=32)),
    # k = 40 > most rows' valid keys: no search pass, the keep pass copies everything, -1 padding
    (5, 70, 40, TopkConfig(bq=1, bk=16, ring_tiles=2, cut_chunk=16)),
    # capacity factor 4 (C = 256, chunks of 32): rarer intermediate cuts, a longer final list
    (4, 400, 24, TopkConfig(bq=1, bk=16, ring_tiles=2, capacity_factor=4, cut_chunk=32)),
    # 3 key splits: each split's in-place final cut, then the merge's radix16 cut (chunks of 16)
    (5, 301, 12, TopkConfig(bq=1, bk=16, ring_tiles=2, key_splits=3, cut_chunk=16)),
    # slack 0: every intermediate cut searches to K exactly (or an exact T with its ties ranked)
    (6, 300, 8, TopkConfig(bq=1, bk=16, ring_tiles=2, cut_chunk=32, slack=0)),
])
def test_radix16_cut_matches_reference(make, s, skv, topk, cfg):
    """The chunked 16-ary cut (default ``cut="radix16"``) selects the reference's exact sets, ties included,
    at small chunks, and so does the old bisection cut (``cut="bisect"``) on the same inputs."""
    q, k, ksc, w, ks, ke = make(s, 16, 32, skv, 7 * s + skv)
    off = torch.arange(s, dtype=torch.int32) * 1000 - 7
    want = R.mqa_topk_indices(q, k, ksc, w, ks, ke, topk, offset=off)
    for cut in ("radix16", "bisect"):
        c = TopkConfig(**{**cfg.__dict__, "cut": cut})
        out = K.mqa_topk_indices(q, k, ksc, w, ks, ke, topk, offset=off, backend="triton", config=c, num_sms=2)
        _assert_same_rows(out, want)
    assert torch.all(out[1] == -1) and torch.all(out[2] == -1)  # the empty rows of ragged_ranges


def test_radix16_cut_config():
    from dsaserve.kernels.indexer_topk import cut_chunk

    assert cut_chunk(8192, 1024) == 1024 and cut_chunk(16384, 1024) == 2048  # C / chunk <= 15
    assert cut_chunk(128, 1024) == 128 and cut_chunk(128, 4) == 16
    with pytest.raises(ValueError, match="power of two"):
        cut_chunk(128, 24)
    q, k, ksc, w, ks, ke = _random_inputs(2, 16, 32, 20, 1)
    with pytest.raises(ValueError, match="cut must be"):
        K.mqa_topk_indices(q, k, ksc, w, ks, ke, 4, backend="triton", config=TopkConfig(cut="heap"))
    with pytest.raises(ValueError, match="slack must be"):
        K.mqa_topk_indices(q, k, ksc, w, ks, ke, 4, backend="triton", config=TopkConfig(slack=10 ** 6))


@pytest.mark.checks(FUSED, REF)
@pytest.mark.parametrize("make", [_random_inputs, _integer_inputs])
def test_filter_in_parts_matches_reference(make, monkeypatch):
    """The segment filter split into parts (``filter_parts``: BQ = 8 at H = 32 on the GPU): forced here to 4
    parts of 16 logits a row, list order and counts carried from part to part."""
    from dsaserve.kernels import indexer_topk

    assert indexer_topk.filter_parts(4, 64, 16, 4) == 1 and indexer_topk.filter_parts(8, 64, 16, 4) == 2
    assert indexer_topk.filter_parts(8, 64, 32, 4) == 4 and indexer_topk.filter_parts(1, 16, 2, 4) == 1
    monkeypatch.setattr(indexer_topk, "FILTER_VALUES", 1)
    cfg = TopkConfig(bq=2, bk=16, ring_tiles=4, num_warps=1, cut_chunk=16)
    assert indexer_topk.filter_parts(cfg.bq, cfg.bk, cfg.ring_tiles, cfg.num_warps) == 4
    q, k, ksc, w, ks, ke = make(7, 16, 32, 260, 11)
    want = R.mqa_topk_indices(q, k, ksc, w, ks, ke, 10, offset=3)
    for cut in ("radix16", "bisect"):
        out = K.mqa_topk_indices(q, k, ksc, w, ks, ke, 10, offset=3, backend="triton",
                                 config=TopkConfig(**{**cfg.__dict__, "cut": cut}), num_sms=2)
        _assert_same_rows(out, want)


def test_default_config_follows_the_measurement():
    """64+ indexer heads keep the bisection cut (faster there on H200), fewer take radix16; both use the
    logits kernel's query block (the same logits)."""
    from dsaserve.kernels.indexer_logits import default_config as logits_config
    from dsaserve.kernels.indexer_topk import default_config

    for h, cut in ((128, "bisect"), (64, "bisect"), (32, "radix16"), (8, "radix16")):
        cfg = default_config(h)
        assert (cfg.cut, cfg.bq, cfg.ring_tiles, cfg.capacity_factor) == (cut, logits_config(h).bq, 16, 2)
