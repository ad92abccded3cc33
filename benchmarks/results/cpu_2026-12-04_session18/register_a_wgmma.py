"""Why the "roles3" sparse MLA design (Q's latent part in the score warpgroup's registers, three key buffers) does
not fit: a minimal Gluon loop whose S = Q K^T wgmma takes Q [64, 512] bf16 from registers (128 a thread, the A
operand) and K [64 keys, 512] from shared memory, compiled for sm_90a on the CPU at several register limits.
ptxas serializes every wgmma (C7512, "insufficient register resources") below 192 registers a thread and spills
below 216. A 384-thread kernel has 3 x 168 = 504 registers a thread-slot to share, and its two value warpgroups
need 160 each (an N = 256 P V accumulator; 152 makes ptxas ignore setmaxnreg, C7507): 184 are left for the score
warpgroup. Session 18, 2026-12-04 (KERNELS_NOTES, "Session 18").

    PYTHONPATH=.:benchmarks python benchmarks/results/cpu_2026-12-04_session18/register_a_wgmma.py 168 176 184 192 200 216
"""
import json, sys, subprocess
import compile_report as cr
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait, fence_async_shared

@gluon.jit
def k(q_ptr, k_ptr, out_ptr, n, DV: gl.constexpr, BK: gl.constexpr, ASYNC: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BK, 16])
    q_dot: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, q_dot)); cols = gl.arange(0, DV, layout=gl.SliceLayout(0, q_dot))
    q = gl.load(q_ptr + rows[:, None] * DV + cols[None, :])
    wide: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    kb = gl.allocate_shared_memory(gl.bfloat16, [BK, DV], wide)
    kl: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
    kr = gl.arange(0, BK, layout=gl.SliceLayout(1, kl)); kc = gl.arange(0, DV, layout=gl.SliceLayout(0, kl))
    acc = gl.zeros([64, BK], gl.float32, layout=s_layout)
    s0 = gl.zeros([64, BK], gl.float32, layout=s_layout)
    for j in range(n):
        cp.async_copy_global_to_shared(kb, k_ptr + j * BK * DV + kr[:, None] * DV + kc[None, :])
        cp.commit_group()
        cp.wait_group(0)
        gl.thread_barrier()
        fence_async_shared()
        s = warpgroup_mma(q, kb.permute((1, 0)), s0, use_acc=False, is_async=ASYNC)
        if ASYNC:
            s = warpgroup_mma_wait(0, deps=(s,))
        acc = gl.maximum(acc, s)
        gl.thread_barrier()
    gl.store(out_ptr + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout)), gl.sum(acc, axis=1))

for mx in map(int, sys.argv[1:]):
    name = f"rega_{mx}"
    r = cr.compile_stats(k, {"q_ptr": "*bf16", "k_ptr": "*bf16", "out_ptr": "*fp32", "n": "i32", "DV": "constexpr", "BK": "constexpr", "ASYNC": "constexpr"},
                         {"DV": 512, "BK": 64, "ASYNC": True}, 4, 1, div16=cr.DIV16, gluon=True, maxnreg=mx, dump=f"/tmp/rega/{name}", name=name)
    log = subprocess.run([cr.PTXAS, "-arch=sm_90a", "-v", f"scratch/roles3/{name}/{name}.ptx", "-o", "/dev/null"], capture_output=True, text=True).stderr
    print(json.dumps({"maxnreg": mx, "regs": r["regs"], "stack_bytes": r["stack"], "wgmma": r["wgmma"],
                      "serialized": r["wgmma_serialized"], "ptxas": [l for l in log.splitlines() if "C7" in l][:2]}))
