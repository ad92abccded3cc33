# scratch/select_previous.py of this call: `git show c900eb2:dsaserve/kernels/select_gluon.py` (the kernel as committed,
# 397 lines, not repeated here) followed by the lines below.


LABEL = "c900eb2 (warp segments, three-barrier counts)"


def select_candidates_previous(cand, k, offset=0, out=None, counts=None, ks=None, ke=None, redo=None, n_keys=0,
                               redo_any=None, num_warps=4):
    from dsaserve.kernels.threshold_topk import _select_launch

    s = cand.shape[0]
    out = torch.empty(s, k, dtype=torch.int32, device=cand.device) if out is None else out
    a = _select_launch("previous", cand, offset, out, counts, ks, ke, redo, redo_any)
    spt = SLOTS_PER_THREAD
    r0, r1, r2 = select_pieces(a.n, num_warps)
    seg = 32 * (r0 + r1 + r2)
    _select_gluon_kernel[(s,)](a.flat.view(torch.int32), a.flat, a.cnt, a.ks, a.ke, a.redo, a.redo_any, a.off, out,
                               a.n, k, a.off_scalar, a.caps, n_keys, R0=r0, R1=r1, R2=r2, NS=a.ns, FLAG=a.flag,
                               HAS_OFF=a.has_off, SPT=spt, EVEN=a.n == seg * num_warps and seg % (32 * spt) == 0,
                               num_warps=num_warps)
    return out
