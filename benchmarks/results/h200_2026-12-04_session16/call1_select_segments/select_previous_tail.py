# scratch/select_previous.py of this call: `git show ef835da:dsaserve/kernels/select_gluon.py` (the kernel as committed,
# 256 lines, not repeated here) followed by the lines below.


LABEL = "ef835da (session 15's Gluon select)"


def select_candidates_previous(cand, k, offset=0, out=None, counts=None, ks=None, ke=None, redo=None, n_keys=0,
                               redo_any=None, num_warps=4):
    import triton
    from dsaserve.kernels.threshold_topk import _select_launch

    s = cand.shape[0]
    out = torch.empty(s, k, dtype=torch.int32, device=cand.device) if out is None else out
    a = _select_launch("previous", cand, offset, out, counts, ks, ke, redo, redo_any)
    m = max(32 * num_warps, triton.next_power_of_2(a.n))
    _select_gluon_kernel[(s,)](a.flat.view(torch.int32), a.flat, a.cnt, a.ks, a.ke, a.redo, a.redo_any, a.off, out,
                               a.n, k, a.off_scalar, a.caps, n_keys, M=m, NS=a.ns, FLAG=a.flag, HAS_OFF=a.has_off,
                               SPT=SLOTS_PER_THREAD, num_warps=num_warps)
    return out
