"""MMA issues in a fixed order across the consumer warpgroups of a Gluon kernel (sm_90): one mbarrier.

Why: in the warp-specialized kernels here (``moe_gemm_hopper``, ``indexer_logits_hopper``) each of two consumer
warpgroups issues an MMA, waits for it, then runs CUDA-core work on the result (the MoE GEMM's promotion, the
logits epilogue); the overlap is meant to come from the other consumer's MMA running meanwhile. Nothing keeps the
two apart, though: when both issue at about the same time the tensor core works through both MMAs together,
both finish together, and both then run their CUDA-core work while the tensor core idles. With turns, the
kernel numbers its MMA issues g = 0, 1, 2, ... across the consumers (alternating between them), and issue g waits
until issue g - 1 has been made: the MMAs queue in that order and one consumer's CUDA-core work runs under the
other's MMA (the ping-pong order of the FlashAttention-3 paper; written here with one mbarrier that completes a
phase per issue).

The numbers must alternate between the two consumers (consumer p takes 2 i + p, i = 0, 1, ...), each taken
exactly once and in order: a consumer with no MMA at its number (an idle half, a block's missing last tile)
takes and ends the turn without issuing. Why strictly alternating: the wait only tests the phase's parity, so a
waiter for issue g passes whenever the barrier's phase count has g's parity. While consumer p waits for g, its
own previous issue g - 2 is made (the thread barrier in ``take_turn`` makes its one-thread arrive land first),
so the count is g - 1 (wait) or g (go), never g - 2, which would read as g's turn.
"""

from __future__ import annotations

# the engine's knob for the kernels that take turns (``--moe-mma-order``, ``--indexer-mma-order``): auto = the
# kernel's default, ordered = in turn, free = each consumer when ready
MMA_ORDERS = ("auto", "ordered", "free")

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier

    HAVE_GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False


if HAVE_GLUON:

    @gluon.jit
    def turn_barrier():
        """The barrier of the turns: it completes phase g when MMA issue g has been made. Allocate it with the
        kernel's other barriers, before their fence and thread barrier."""
        bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(bar, count=1)
        return bar

    @gluon.jit
    def take_turn(bar, g):
        """Wait until MMA issue ``g`` may be made: phase g - 1 complete (issue 0 passes on a fresh barrier). The
        thread barrier first: this warpgroup's own last arrive (one thread's) must land before any of its warps
        tests the phase (see the module docstring). The issuer of g - 1 cannot run ahead to g + 1 before g is
        made, so the barrier is never a phase past this."""
        gl.thread_barrier()
        mbarrier.wait(bar, (g & 1) ^ 1)

    @gluon.jit
    def end_turn(bar):
        """This warpgroup has made its issue (all four warps: the thread barrier, which Triton also places before
        a one-thread arrive) -> the next issue number's turn."""
        gl.thread_barrier()
        mbarrier.arrive(bar, count=1)
