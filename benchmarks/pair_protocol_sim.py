"""A thread simulation of the "pair" sparse MLA kernel's protocol (dsaserve/kernels/sparse_mla_hopper.py:
``_pair_producer`` and ``_pair_math``), for checking a change to it on a CPU before a GPU run.

Gluon has no CPU interpreter, and a wrong barrier index on the GPU is a hang or silently stale data. This file
restates the kernel's schedule line for line in Python threads: the producer and the two math warpgroups, the same
barrier indices and phases (an mbarrier with PTX's parity-wait semantics), the two key buffers refilled in halves,
P_W over buffer W's rope columns (poisoned with NaN when that half is refilled), and the joint-max softmax. Each
MMA's operands are read when it is issued and again when it is waited for, and must agree (a refill while an MMA is
in flight fails). Random sleeps shake the interleavings; the outputs must equal a float64 reference. It checks the
design, not the kernel: keep it in step with the kernel when either changes.

    python benchmarks/pair_protocol_sim.py [TRIALS]      # prints "ok" (about a minute for 20 trials)
"""
import threading, random, time, sys
import numpy as np

class MBar:
    def __init__(self, count):
        self.count, self.arr, self.done = count, 0, 0
        self.cv = threading.Condition()
    def arrive(self):
        with self.cv:
            self.arr += 1
            assert self.arr <= self.count
            if self.arr == self.count:
                self.arr = 0; self.done += 1; self.cv.notify_all()
    def wait(self, parity, who=""):
        with self.cv:
            while (self.done & 1) == parity:  # current phase parity == requested: not completed yet
                if not self.cv.wait(timeout=5):
                    raise RuntimeError(f"deadlock? {who} waiting parity {parity}, done {self.done}")

def jitter():
    if random.random() < 0.3: time.sleep(random.random() * 1e-4)

BH, BK, DV, DR = 4, 8, 16, 8  # tiny heads, keys per block, latent and rope dims (P has its own array here)
DVH = DV // 2

def run(topk, pool=50, seed=0, EARLY_S=True):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((BH, DV + DR))
    kv = rng.standard_normal((pool, DV + DR))
    idx = rng.integers(0, pool, topk); idx[rng.random(topk) < 0.2] = -1
    if seed % 3 == 0:  # no key before a random point: the first pairs have none (m stays -inf)
        idx[: rng.integers(0, topk + 1)] = -1
    scale = 0.3
    n_blocks = -(-topk // BK); n_pairs = -(-n_blocks // 2)
    k_nope = np.full((2, BK, DV), np.nan); k_rope = np.full((2, BK, DR), np.nan)
    p_buf = [np.full((BH, BK), np.nan), np.full((BH, BK), np.nan)]  # aliases k_rope[W] in the kernel
    ids_smem = np.zeros((2, BK), dtype=np.int64)
    m_x = [None, None]; l_x = [None, None]
    full = [MBar(1) for _ in range(4)]; empty = [MBar(1) for _ in range(4)]
    mx = [MBar(1), MBar(1)]; pr = [MBar(1), MBar(1)]; lx = [MBar(1), MBar(1)]
    out = np.zeros((BH, DV)); lse = np.zeros(BH)
    errors = []

    def block_ids(blk):
        kk = blk * BK + np.arange(BK)
        return np.where(kk < topk, idx[np.minimum(kk, topk - 1)], -1)

    def rows(ids, cols):
        r = np.zeros((BK, len(cols)))
        for a, i in enumerate(ids):
            if i >= 0: r[a] = kv[i, cols]
        return r

    def producer():
        for i in range(n_pairs):
            ph = (i & 1) ^ 1
            ids0, ids1 = block_ids(2 * i), block_ids(2 * i + 1)
            H0, H1, R = np.arange(DVH), DVH + np.arange(DVH), DV + np.arange(DR)
            empty[0].wait(ph, "prod e0"); jitter()
            k_nope[0][:, :DVH] = rows(ids0, H0); full[0].arrive()
            empty[3].wait(ph, "prod e3"); jitter()
            k_nope[1][:, DVH:] = rows(ids1, H1); full[2].arrive()
            empty[1].wait(ph, "prod e1"); jitter()
            k_nope[0][:, DVH:] = rows(ids0, H1); k_rope[0] = rows(ids0, R); p_buf[0][:] = np.nan
            ids_smem[0] = np.where(2 * i * BK + np.arange(BK) < topk, ids0, 0); full[1].arrive()
            empty[2].wait(ph, "prod e2"); jitter()
            k_nope[1][:, :DVH] = rows(ids1, H0); k_rope[1] = rows(ids1, R); p_buf[1][:] = np.nan
            ids_smem[1] = np.where((2 * i + 1) * BK + np.arange(BK) < topk, ids1, 0); full[3].arrive()

    def math(W):
        try:
            st = {"m": np.full(BH, -np.inf), "l": np.zeros(BH), "o": np.zeros((BH, DVH))}
            own, oth = slice(W * DVH, W * DVH + DVH), slice((1 - W) * DVH, (1 - W) * DVH + DVH)

            def s_early(i):  # _pair_s_early: the MMA's operands, read at issue
                full[2 * W].wait(i & 1, f"W{W} full early"); jitter()
                return q[:, own] @ k_nope[W][:, own].T

            def s_late(i, s_a):  # _pair_s_late, then the wait for all of S (operands checked again)
                full[2 * W + 1].wait(i & 1, f"W{W} full late"); jitter()
                s_b = q[:, oth] @ k_nope[W][:, oth].T + q[:, DV:] @ k_rope[W].T
                jitter()
                assert np.array_equal(s_a, q[:, own] @ k_nope[W][:, own].T, equal_nan=True), f"W{W} S early changed"
                assert np.array_equal(s_b, q[:, oth] @ k_nope[W][:, oth].T + q[:, DV:] @ k_rope[W].T,
                                      equal_nan=True), f"W{W} S late changed"
                return s_a + s_b

            def other_issue(i):  # the other block's P V: wait for its P, read the operands
                pr[1 - W].wait(i & 1, f"W{W} pr"); jitter()
                return p_buf[1 - W].copy(), k_nope[1 - W][:, own].copy()

            def other_done(ops):  # its wait: operands unchanged, then O += P V, the buffer's late half freed
                jitter()
                assert np.array_equal(ops[0], p_buf[1 - W], equal_nan=True) and np.array_equal(
                    ops[1], k_nope[1 - W][:, own], equal_nan=True), f"W{W} other operands changed in flight"
                st["o"] = st["o"] + ops[0] @ ops[1]
                empty[2 - W].arrive()

            def block(i, s):  # _pair_block
                ph = i & 1
                m, l, o = st["m"], st["l"], st["o"]
                kk = (2 * i + W) * BK + np.arange(BK)
                valid = (ids_smem[W] >= 0) & (kk < topk)
                s = np.where(valid[None, :], s * scale, -np.inf)
                m_blk = s.max(axis=1)
                if W == 0:
                    m_new = np.maximum(m, m_blk); m_x[0] = m_new.copy(); mx[0].arrive()
                else:
                    mx[0].wait(ph, "W1 mx0"); m_new = np.maximum(m_x[0], m_blk); m_x[1] = m_new.copy(); mx[1].arrive()
                m_safe = np.where(m_new == -np.inf, 0.0, m_new)
                with np.errstate(invalid="ignore"):
                    alpha = np.exp2(m - m_safe); p = np.exp2(s - m_safe[:, None])
                l = l * alpha + p.sum(1); o = o * alpha[:, None]; m = m_new
                if W == 1:
                    p_buf[1][:] = p; pr[1].arrive()
                v_own = k_nope[W][:, own].copy(); jitter()  # own P V issued (P from registers)
                if W == 0:  # wait for the own P V, the joint max, P_0 rescaled and published
                    assert np.array_equal(v_own, k_nope[W][:, own], equal_nan=True), "W0 own V changed in flight"
                    o = o + p @ v_own
                    empty[0].arrive()
                    mx[1].wait(ph, "W0 mx1"); m_j = m_x[1]
                    beta = np.exp2(m - np.where(m_j == -np.inf, 0.0, m_j))
                    p_buf[0][:] = p * beta[:, None]; pr[0].arrive()
                    l = l * beta; o = o * beta[:, None]; m = m_j
                    st.update(m=m, l=l, o=o)
                    return None
                st.update(m=m, l=l, o=o)
                return p, v_own  # warpgroup 1's own P V still in flight

            if W == 0 and EARLY_S:  # the rotated loop: pair i-1's other P V, then pair i's early S, both in flight
                block(0, s_late(0, s_early(0)))
                for i in range(1, n_pairs):
                    ops = other_issue(i - 1)
                    s_a = s_early(i)
                    other_done(ops)  # wait(1)
                    block(i, s_late(i, s_a))
                other_done(other_issue(n_pairs - 1))
            else:
                for i in range(n_pairs):
                    own_pv = block(i, s_late(i, s_early(i)))
                    ops = other_issue(i)
                    if W == 1:  # the other P V queued behind the own one: wait(1), then wait(0)
                        p, v_own = own_pv
                        assert np.array_equal(v_own, k_nope[1][:, own], equal_nan=True), "W1 own V changed in flight"
                        st["o"] = st["o"] + p @ v_own
                        empty[3].arrive()
                    other_done(ops)
            m, l, o = st["m"], st["l"], st["o"]
            l_x[W] = l.copy(); lx[W].arrive(); lx[1 - W].wait(0, f"W{W} lx")
            l_all = l + l_x[1 - W]
            has = l_all > 0
            out[:, own] = np.where(has[:, None], o / np.where(has, l_all, 1)[:, None], 0)
            if W == 0:
                lse[:] = np.where(has, (m + np.log2(np.where(has, l_all, 1))) * np.log(2), -np.inf)
        except Exception as e:
            errors.append(repr(e))

    ts = [threading.Thread(target=producer)] + [threading.Thread(target=math, args=(w,)) for w in (0, 1)]
    for t in ts: t.start()
    for t in ts: t.join()
    assert not errors, errors
    # reference (scores in base 2, as the kernel's qk_scale includes log2 e)
    ok = idx >= 0
    sc = np.full((BH, topk), -np.inf)
    sc[:, ok] = (q @ kv[idx[ok]].T) * scale
    mref = sc.max(1)
    has = np.isfinite(mref)
    w = np.where(has[:, None], np.exp2(sc - np.where(has, mref, 0)[:, None]), 0)
    lref = w.sum(1)
    vals = np.zeros((topk, DV)); vals[ok] = kv[idx[ok], :DV]
    oref = np.where(has[:, None], (w @ vals) / np.where(has, lref, 1)[:, None], 0)
    lseref = np.where(has, (mref + np.log2(np.where(has, lref, 1))) * np.log(2), -np.inf)
    assert np.allclose(out, oref, atol=1e-12, rtol=1e-10), (out - oref)
    fin = np.isfinite(lseref)
    assert np.array_equal(np.isfinite(lse), fin) and np.allclose(lse[fin], lseref[fin], atol=1e-12), (lse, lseref)

if __name__ == "__main__":
    for trial in range(int(sys.argv[1]) if len(sys.argv) > 1 else 30):
        for topk in (1, 7, 8, 9, 16, 24, 40, 41, 64, 3 * 8 + 5):
            for early_s in (True, False):  # the kernel's EARLY_S (warpgroup 0's rotated loop) and without
                run(topk, seed=trial * 100 + topk, EARLY_S=early_s)
    print("ok")
