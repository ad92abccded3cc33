"""Grouped MoE experts without host syncs: one GEMM launch per projection over all local experts.

A forward takes the router's output (expert ids [T, k], weights [T, k]) and returns this rank's share of
the routed-expert output [T, H]: the weighted sum over the token's experts that this rank owns (expert
parallelism: any subset of expert ids; tokens routed elsewhere contribute nothing here, and the caller
sums the shares over the ranks). Steps, all on the device, sizes bounded by T and k alone:

1. ``plan_moe_routing``: local expert of each (token, slot) via a global->local map, a stable sort that
   puts local assignments first, grouped by local expert; per-expert counts by ``scatter_add_``
   (``torch.bincount`` may sync on CUDA), end offsets by ``cumsum``, the inverse permutation (row of each
   (token, slot), -1 when not local), and for the Triton GEMM a tile table of BLOCK_M-row tiles that
   never straddle two experts (at most cdiv(T*k, BLOCK_M) + E_local tiles; empty ones exit at once).
   Up to ``FUSED_PLAN_MAX_ASSIGN`` assignments (decode) the same plan is one single-program Triton launch
   (``_moe_plan_kernel``) instead of ~25 torch launches.
2. gate_up GEMM, SiLU(gate) * up, down GEMM, over the sorted rows:
   - bf16 weights, T*k > ``BF16_TRITON_MAX_ASSIGN``: ``F.grouped_mm`` with the device offsets (CUTLASS on
     SM90), a row gather before it and a SiLU-mul kernel between; rows past the local count are never read.
   - bf16 weights, decode sizes (``default_bf16_config``, from T*k alone): a Triton grouped GEMM
     (``_moe_gemm_kernel``, ``MoEBf16Config``): the gate_up launch gathers the token rows and writes
     SiLU(gate) * up (rounded where the reference rounds), then the down launch; short row tiles and narrow
     column tiles, since these sizes are weight-read bound.
   - fp8 block-scaled weights (128x128 blocks, 1x128 activation scales): a Triton grouped GEMM. The
     gate_up launch gathers the token rows of the once-quantized x itself, computes gate and up tiles
     side by side, and writes SiLU(gate) * up already quantized to e4m3 with one scale per 128 columns
     (the down GEMM's input); torch's ``scaled_grouped_mm`` takes no 128x128 weight blocks (2.11).
3. ``combine``: out[t] = sum_s w[t, s] * y[row(t, s)] in fp32, slots in order (deterministic, no atomics).

The CPU path is ``grouped_moe_reference``, a per-expert loop with the same math (the contract the device
path is tested against): bf16 weights: h = x @ W13^T (in x's dtype), a = silu(h_gate) * h_up (fp32 math,
rounded to x's dtype), y = a @ W2^T; fp8 weights: x and a quantized by ``act_quant`` (1x128), fp32
products of the dequantized operands, y rounded to x's dtype; then the fp32 weighted sum, cast to x's dtype.
``grouped_moe_quantized`` takes fp8 experts' input already quantized (xq, xs from ``act_quant``), e.g. by
a caller that all-gathers the quantized tokens: same result, half the bytes to move.

No ``.item()``, ``.tolist()``, ``.cpu()``, ``nonzero()`` or ``bincount`` outside ``*_reference``
functions (tests/kernels/test_grouped_moe.py checks the source; benchmarks/gemm.py runs the forward under
``torch.cuda.set_sync_debug_mode("error")``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from dsaserve.kernels.block_fp8 import dequantize_block_fp8

from . import act_quant
from . import reference as R
from ._common import MOE_SCHEDULES, KernelInputError, check, interpret_mode, tl, triton
from .fp8_linear import BLOCK, FP8
from .mma_turns import MMA_ORDERS
from .splitk import round_bf16_in_interpreter

_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def expert_range(n_experts: int, rank: int, world: int) -> list[int]:
    """Contiguous expert-parallel split: rank r owns experts [r*E//W, (r+1)*E//W) (uneven splits allowed)."""
    check(world >= 1 and 0 <= rank < world, f"expert_range: rank {rank} out of range for world size {world}")
    return list(range(rank * n_experts // world, (rank + 1) * n_experts // world))


@dataclass(frozen=True)
class LocalExperts:
    """The routed experts one rank owns, in the layout the grouped kernels want (built once at load).

    expert_ids: global ids of the local experts (local index = position here); expert_map: int32
    [n_experts], global id -> local index or -1. Exactly one weight set is present:
    - bf16/fp16/fp32: w_gate_up [E_l, 2I, H] (gate rows, then up rows), w_down [E_l, H, I]
    - fp8 (I_pad = I rounded up to 128): w13 [E_l, 2*I_pad, H] e4m3 (gate rows 0..I-1, up rows
      I_pad..I_pad+I-1, zero rows between), s13 [E_l, 2*I_pad/128, ceil(H/128)] fp32 (gate blocks, then up
      blocks); w2 [E_l, H, I_pad] e4m3 (zero columns past I), s2 [E_l, ceil(H/128), I_pad/128] fp32.
    """

    n_experts: int
    expert_ids: tuple[int, ...]
    expert_map: torch.Tensor
    hidden: int
    inter: int
    w_gate_up: torch.Tensor | None = None
    w_down: torch.Tensor | None = None
    w13: torch.Tensor | None = None
    s13: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    s2: torch.Tensor | None = None

    @property
    def is_fp8(self) -> bool:
        return self.w13 is not None

    @property
    def n_local(self) -> int:
        return len(self.expert_ids)

    @property
    def inter_pad(self) -> int:
        return self.w2.shape[2] if self.is_fp8 else self.inter

    @property
    def device(self) -> torch.device:
        return self.expert_map.device

    def nbytes(self) -> int:
        ts = (self.w_gate_up, self.w_down, self.w13, self.s13, self.w2, self.s2)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _expert_map(expert_ids, n_experts: int, device) -> tuple[tuple[int, ...], torch.Tensor]:
    ids = tuple(int(e) for e in expert_ids)
    check(len(set(ids)) == len(ids), f"local experts: duplicate expert ids in {ids}")
    check(all(0 <= e < n_experts for e in ids), f"local experts: ids must be in [0, {n_experts}), got {ids}")
    m = torch.full((n_experts,), -1, dtype=torch.int32)
    m[list(ids)] = torch.arange(len(ids), dtype=torch.int32)
    return ids, m.to(device)


def prepare_local_experts(w_gate_up: torch.Tensor, w_down: torch.Tensor, expert_ids, n_experts: int
                          ) -> LocalExperts:
    """bf16 (or any float) experts: w_gate_up [E_l, 2I, H], w_down [E_l, H, I] for the experts in
    ``expert_ids`` (global ids, same order)."""
    check(w_gate_up.dim() == 3 and w_down.dim() == 3 and w_gate_up.shape[1] % 2 == 0,
          f"prepare_local_experts: want w_gate_up [E, 2I, H], w_down [E, H, I]; got "
          f"{tuple(w_gate_up.shape)}, {tuple(w_down.shape)}")
    e, two_i, h = w_gate_up.shape
    i = two_i // 2
    check(tuple(w_down.shape) == (e, h, i), f"prepare_local_experts: w_down must be {(e, h, i)}, got "
          f"{tuple(w_down.shape)}")
    check(w_gate_up.dtype == w_down.dtype and w_gate_up.dtype.is_floating_point and w_gate_up.dtype != FP8,
          f"prepare_local_experts: float weights of one dtype expected (fp8: prepare_local_experts_fp8), got "
          f"{w_gate_up.dtype}, {w_down.dtype}")
    ids, m = _expert_map(expert_ids, n_experts, w_gate_up.device)
    check(len(ids) == e, f"prepare_local_experts: {len(ids)} expert ids for {e} stacked experts")
    return LocalExperts(n_experts, ids, m, h, i, w_gate_up=w_gate_up.contiguous(), w_down=w_down.contiguous())


def prepare_local_experts_fp8(w_gate: torch.Tensor, s_gate: torch.Tensor, w_up: torch.Tensor,
                              s_up: torch.Tensor, w_down: torch.Tensor, s_down: torch.Tensor, expert_ids,
                              n_experts: int) -> LocalExperts:
    """fp8 experts as a checkpoint stores them, stacked over the local experts:
    w_gate/w_up [E_l, I, H] e4m3 with scales [E_l, ceil(I/128), ceil(H/128)], w_down [E_l, H, I] with
    [E_l, ceil(H/128), ceil(I/128)]. Builds the padded w13/w2 layout of ``LocalExperts`` (one copy)."""
    check(w_gate.dim() == 3 and w_gate.dtype == FP8 and w_up.dtype == FP8 and w_down.dtype == FP8,
          "prepare_local_experts_fp8: weights must be float8_e4m3fn [E, I, H] / [E, H, I]")
    e, i, h = w_gate.shape
    nb_i, nb_h = _cdiv(i, BLOCK), _cdiv(h, BLOCK)
    for name, t, shape in (("w_up", w_up, (e, i, h)), ("w_down", w_down, (e, h, i)),
                           ("s_gate", s_gate, (e, nb_i, nb_h)), ("s_up", s_up, (e, nb_i, nb_h)),
                           ("s_down", s_down, (e, nb_h, nb_i))):
        check(tuple(t.shape) == shape, f"prepare_local_experts_fp8: {name} must be {shape}, got {tuple(t.shape)}")
    for name, t in (("s_gate", s_gate), ("s_up", s_up), ("s_down", s_down)):
        check(t.dtype == torch.float32, f"prepare_local_experts_fp8: {name} must be float32, got {t.dtype}")
    ids, m = _expert_map(expert_ids, n_experts, w_gate.device)
    check(len(ids) == e, f"prepare_local_experts_fp8: {len(ids)} expert ids for {e} stacked experts")
    i_pad = nb_i * BLOCK
    w13 = torch.zeros(e, 2 * i_pad, h, dtype=FP8, device=w_gate.device)
    w13[:, :i] = w_gate
    w13[:, i_pad:i_pad + i] = w_up
    s13 = torch.cat([s_gate, s_up], dim=1).contiguous()
    w2 = w_down.contiguous()
    if i_pad != i:
        w2 = torch.zeros(e, h, i_pad, dtype=FP8, device=w_down.device)
        w2[:, :, :i] = w_down
    return LocalExperts(n_experts, ids, m, h, i, w13=w13, s13=s13, w2=w2, s2=s_down.contiguous())


# ----------------------------------------------------------------------------------------------- routing plan
@dataclass(frozen=True)
class MoEPlan:
    """Device-side routing plan of one forward; built by ``plan_moe_routing`` without a host sync.

    sorted_token int32 [T*k]: token of each sorted assignment (local ones first, grouped by local expert,
        (token, slot) order inside an expert); expert_ends int32 [E_l]: cumulative row counts
        (``F.grouped_mm``'s offs); n_rows int32 [1]: local assignments; pos int32 [T, k]: sorted row of
        (t, s), -1 when the expert is not local; tiles int32 [max_tiles, 3] (with ``block_m``): per
        BLOCK_M-row tile (local expert or -1 for an unused tile, first row, end row).
    """

    sorted_token: torch.Tensor
    expert_ends: torch.Tensor
    n_rows: torch.Tensor
    pos: torch.Tensor
    tiles: torch.Tensor | None
    block_m: int | None


def max_tiles(n_assign: int, n_local: int, block_m: int) -> int:
    """Upper bound on BLOCK_M tiles: sum_e ceil(c_e / BM) <= cdiv(sum c_e, BM) + E_l, and <= sum c_e."""
    return min(n_assign, _cdiv(n_assign, block_m) + n_local)


# the routing plan is one Triton launch (``_moe_plan_kernel``, one program) up to this many assignments
# (T * k); above, ~25 torch ops (sort, scatter_add, cumsum, searchsorted, ...), each a launch of >= ~2 us
FUSED_PLAN_MAX_ASSIGN = 2047


def plan_moe_routing(topk_ids: torch.Tensor, experts: LocalExperts, block_m: int | None = None,
                     fused: bool | None = None) -> MoEPlan:
    """topk_ids [T, k] (global expert ids) -> ``MoEPlan`` for the local experts; device ops only.

    fused: one Triton launch (``_moe_plan_kernel``) instead of the torch ops; None = when T * k <=
    ``FUSED_PLAN_MAX_ASSIGN`` and Triton can run (CUDA, or the interpreter). Both give the same plan (unused
    tiles: expert -1 in both, their row columns differ and are never read).
    """
    t, k = topk_ids.shape
    n = t * k
    e_l = experts.n_local
    dev = topk_ids.device
    if fused is None:
        fused = (n <= FUSED_PLAN_MAX_ASSIGN and triton is not None and (topk_ids.is_cuda or interpret_mode())
                 and e_l > 0)
    if fused:
        return _plan_fused(topk_ids, experts, block_m)
    local = experts.expert_map[topk_ids.long()]  # [T, k] int32, -1 = not local
    key = torch.where(local >= 0, local, e_l).flatten().long()  # non-local assignments sort last
    order = torch.sort(key, stable=True).indices  # [n] int64
    counts = torch.zeros(e_l + 1, dtype=torch.int32, device=dev)
    counts.scatter_add_(0, key, torch.ones(n, dtype=torch.int32, device=dev))
    counts = counts[:e_l]
    ends = torch.cumsum(counts, 0, dtype=torch.int32)  # [E_l]
    n_rows = ends[-1:] if e_l > 0 else torch.zeros(1, dtype=torch.int32, device=dev)
    sorted_token = (order // k).to(torch.int32)
    pos = torch.empty(n, dtype=torch.int32, device=dev)
    pos[order] = torch.arange(n, dtype=torch.int32, device=dev)
    pos = torch.where(local.flatten() >= 0, pos, -1).view(t, k)
    tiles = None
    if block_m is not None and e_l > 0:
        nt = max_tiles(n, e_l, block_m)
        tiles_per = (counts + (block_m - 1)) // block_m  # [E_l]
        tile_end = torch.cumsum(tiles_per, 0)  # int64
        tid = torch.arange(nt, device=dev)
        te = torch.searchsorted(tile_end, tid, right=True)  # owning expert; E_l = unused tile
        ec = te.clamp(max=e_l - 1)
        first_row = (ends - counts)[ec] + (tid - (tile_end - tiles_per)[ec]) * block_m
        tiles = torch.stack([torch.where(te < e_l, ec, -1), first_row, ends[ec]], dim=1).to(torch.int32)
    return MoEPlan(sorted_token, ends, n_rows, pos, tiles, block_m)


def _plan_n_pad(n: int) -> int:
    return max(16, 1 << n.bit_length())   # next power of two > n (a padding key past every expert)


PLAN_MIN_BLOCK_M = 16  # every MoE config's tile height is at least this (the fused plan's tile-table bound)


def _tiles_pad(n_pad: int, e_l: int, block_m: int) -> int:
    """Lanes of the fused plan's tile table: >= max_tiles(n, e_l, bm) for every n < n_pad and every bm >=
    PLAN_MIN_BLOCK_M, so the kernel variant depends on the N_PAD bucket alone, not on n or the tile height
    (shorter tiles, which no config uses, get n_pad lanes)."""
    if block_m < PLAN_MIN_BLOCK_M:
        return n_pad
    return max(16, triton.next_power_of_2(min(n_pad, -(-(n_pad - 1) // PLAN_MIN_BLOCK_M) + e_l)))


def warm_routing_plans(experts: LocalExperts, top_k: int) -> int:
    """Run the fused routing plan once per kernel variant a step of this model can need (every N_PAD bucket
    up to ``FUSED_PLAN_MAX_ASSIGN`` assignments, with and without the tile table), so none compiles while
    requests wait on it: a serving run compiled one mid-prefill (2.16 s, every running request stalled;
    H200, 2026-12-03). CUDA only (elsewhere nothing compiles). Returns the number of plans run."""
    if triton is None or experts.device.type != "cuda" or experts.n_local == 0:
        return 0
    runs = 0
    for t in plan_bucket_tokens(top_k):
        ids = (torch.arange(t * top_k, device=experts.device) % experts.n_experts).view(t, top_k)
        for block_m in (None, PLAN_MIN_BLOCK_M):
            _plan_fused(ids, experts, block_m)
            runs += 1
    return runs


def plan_bucket_tokens(top_k: int) -> list[int]:
    """One token count per N_PAD bucket of the fused plan (the largest count of the bucket), for every bucket
    a step of 1 .. FUSED_PLAN_MAX_ASSIGN // top_k tokens falls in."""
    best: dict[int, int] = {}
    for t in range(1, FUSED_PLAN_MAX_ASSIGN // top_k + 1):
        best[_plan_n_pad(t * top_k)] = t
    return sorted(best.values())


def _plan_fused(topk_ids: torch.Tensor, experts: LocalExperts, block_m: int | None) -> MoEPlan:
    """``plan_moe_routing`` in one single-program Triton launch (decode-sized T * k)."""
    t, k = topk_ids.shape
    n, e_l, dev = t * k, experts.n_local, topk_ids.device
    check(triton is not None and e_l > 0, "plan_moe_routing(fused=True): needs triton and a local expert")
    n_pad = _plan_n_pad(n)  # > n: a padding key past every expert ends the searches
    e_pad = max(16, triton.next_power_of_2(e_l))
    check((e_l + 2) * n_pad < 2**31, f"plan_moe_routing(fused=True): {n} assignments x {e_l} experts overflow "
          "the int32 sort keys")
    nt = max_tiles(n, e_l, block_m) if block_m is not None else 1
    sorted_token = torch.empty(n, dtype=torch.int32, device=dev)
    ends = torch.empty(e_l, dtype=torch.int32, device=dev)
    n_rows = torch.empty(1, dtype=torch.int32, device=dev)
    pos = torch.empty(t, k, dtype=torch.int32, device=dev)
    tiles = torch.empty(nt, 3, dtype=torch.int32, device=dev) if block_m is not None else None
    _moe_plan_kernel[(1,)](
        topk_ids.contiguous(), experts.expert_map, sorted_token, ends, n_rows, pos,
        tiles if tiles is not None else ends, n, e_l, nt, block_m or PLAN_MIN_BLOCK_M,
        N_PAD=n_pad, LOG_N=n_pad.bit_length() - 1, E_PAD=e_pad, LOG_E=e_pad.bit_length() - 1, TOP_K=k,
        NT_PAD=_tiles_pad(n_pad, e_l, block_m or PLAN_MIN_BLOCK_M), TILES=block_m is not None, num_warps=4 if n_pad <= 256 else 8)
    return MoEPlan(sorted_token, ends, n_rows, pos, tiles, block_m)


# ----------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class MoEGemmConfig:
    """Tiles of the fp8 grouped GEMMs: BLOCK_M rows of one expert x 128 columns (gate_up: 128 gate + 128 up
    columns, fused SiLU and quantization), K steps of 128 (one scale block). The default is the fastest of
    benchmarks/gemm.py's prefill sweep (H200, 2026-12-02)."""

    block_m: int = 64
    bn_down: int = 128
    warps_gate_up: int = 8
    stages_gate_up: int = 4
    warps_down: int = 4
    stages_down: int = 4
    group_m: int = 8
    tma: bool = True  # weights (and the down GEMM's rows) through tensor descriptors; needs H % 16 == 0
    # "triton": ``_moe_fp8_gemm_kernel`` with the tiles above (any CUDA GPU, and the CPU interpreter);
    # "hopper": the Gluon kernels of ``moe_gemm_hopper`` (sm_90, 128-row tiles; block_m must be 128, the other
    # tile fields do not apply); "auto": "hopper" where it can run, else "triton" (resolved per call)
    kernel: str = "triton"
    down_pair: bool = True  # hopper kernel: 256 output columns per down work item where hidden % 256 == 0
    # hopper kernel: K steps between a scale load and the promotion that uses it (1 or 2), and the outputs stored as
    # 16-byte row pieces through shared memory (H200 2026-12-03 session 9: down GEMM 4.64 -> 4.03 ms at 16K x 32
    # experts; the scale loads' L2 round trip was ~7% of the consumers' stall samples at one step ahead)
    scales_ahead: int = 2
    blocked_epilogue: bool = True
    # hopper kernel: how each GEMM's programs take their work items (``moe_gemm_hopper._n_programs``): "static"
    # (one program per SM, items strided), "per_item" (one program per item, handed out in order as SMs free up)
    # or "queue" (one program per SM, each claiming the next item from a counter: the per-item order with the
    # persistent pipeline). Why not static: with few row tiles an expert, items of unequal cost (an expert's last,
    # partly empty tile) let static programs drift apart, and the programs that read one weight tile stop sharing
    # it in L2: at 256 experts x 16K tokens the static gate_up read ~4x the expert weights from DRAM (ncu: 3.2
    # TB/s, L2 hit rate 27% vs 74% at 32 experts). Measured (ms, 16K tokens x top-8, H200 2026-12-04): 256 experts
    # gate_up static 9.96-10.54, per item 9.30-9.44, queue 9.33; down static 4.63-4.67, per item 5.14 (a
    # program's setup per 16-step item), queue 4.59; 32 experts no schedule consistently ahead in the kernel
    # bench, and the engine's MoE phase the same (64K, 8 layers: 357.6 ms static, 358.1 queue; 256 experts 172.3
    # per-item gate_up, 170.8 queue)
    gate_up_schedule: str = "queue"
    down_schedule: str = "queue"
    # hopper kernel: the two consumer warpgroups issue their MMAs in turn (gate_up / down), so that one's
    # promotion runs under the other's MMA instead of both promoting at once (an experiment, off until measured)
    gate_up_ordered: bool = False
    down_ordered: bool = False

    def __post_init__(self):
        check(self.kernel in MOE_GEMM_KERNELS, f"MoEGemmConfig: kernel must be one of {MOE_GEMM_KERNELS}, "
              f"got {self.kernel!r}")
        check(self.kernel != "hopper" or self.block_m == HOPPER_BLOCK_M,
              f"MoEGemmConfig: the hopper kernel's tiles are {HOPPER_BLOCK_M} rows; set block_m={HOPPER_BLOCK_M}")
        for name in ("gate_up_schedule", "down_schedule"):
            check(getattr(self, name) in MOE_SCHEDULES,
                  f"MoEGemmConfig: {name} must be one of {MOE_SCHEDULES}, got {getattr(self, name)!r}")


MOE_GEMM_KERNELS = ("auto", "triton", "hopper")
HOPPER_BLOCK_M = 128
# "auto" takes the Gluon kernel from this many (token, slot) rows per expert on average: its 128-row tiles
# are mostly padding below (decode and small batches keep the Triton kernel's short tiles)
HOPPER_MIN_ROWS_PER_EXPERT = 128


def default_moe_config(num_tokens: int, top_k: int, n_experts: int, kernel: str = "auto",
                       schedule: str = "auto", group_m: int = 0, mma_order: str = "auto") -> MoEGemmConfig:
    """By mean rows per expert (decode batches are weight-read bound: short tiles, more programs); ``kernel``
    ("auto" | "triton" | "hopper") pins the prefill-size kernel (the decode-size tiles are always Triton's);
    ``schedule`` (one of MOE_SCHEDULES) pins both Hopper GEMMs' schedule, "auto" keeps ``MoEGemmConfig``'s;
    ``group_m`` > 0 pins the prefill-size kernels' raster (0 keeps the default); ``mma_order`` ("ordered" | "free")
    pins whether both Hopper GEMMs' consumers issue their MMAs in turn ("auto" keeps ``MoEGemmConfig``'s)."""
    check(kernel in MOE_GEMM_KERNELS, f"default_moe_config: kernel must be one of {MOE_GEMM_KERNELS}, got {kernel!r}")
    check(schedule == "auto" or schedule in MOE_SCHEDULES,
          f"default_moe_config: schedule must be auto or one of {MOE_SCHEDULES}, got {schedule!r}")
    rows = num_tokens * top_k / max(n_experts, 1)
    if rows <= 16:
        return MoEGemmConfig(block_m=16, bn_down=64, warps_gate_up=4, stages_gate_up=4, warps_down=4,
                             stages_down=4, tma=False)
    check(mma_order in MMA_ORDERS, f"default_moe_config: mma_order must be one of {MMA_ORDERS}, got {mma_order!r}")
    pinned = {} if schedule == "auto" else dict(gate_up_schedule=schedule, down_schedule=schedule)
    if mma_order != "auto":
        pinned.update(gate_up_ordered=mma_order == "ordered", down_ordered=mma_order == "ordered")
    if group_m:
        pinned["group_m"] = group_m
    if kernel == "hopper":
        return MoEGemmConfig(block_m=HOPPER_BLOCK_M, kernel="hopper", **pinned)
    if kernel == "auto" and rows >= HOPPER_MIN_ROWS_PER_EXPERT:
        # the Triton tiles where the hopper kernel cannot run
        return MoEGemmConfig(kernel="auto", **pinned)
    return MoEGemmConfig()


def _resolve_kernel(cfg: MoEGemmConfig, x: torch.Tensor, experts: LocalExperts) -> MoEGemmConfig:
    """``kernel="auto"`` -> "hopper" (128-row tiles) where ``moe_gemm_hopper`` can run this input, else
    "triton"; "hopper" where it cannot -> an error naming the reason."""
    if cfg.kernel == "triton":
        return cfg
    from . import moe_gemm_hopper

    reason = moe_gemm_hopper.unsupported_reason(x, experts)
    if cfg.kernel == "hopper" and reason is not None:
        raise KernelInputError(f"grouped_moe: the hopper MoE kernel cannot run here: {reason}; use kernel='triton'")
    if cfg.kernel == "auto":
        return replace(cfg, kernel="hopper", block_m=HOPPER_BLOCK_M) if reason is None else replace(cfg, kernel="triton")
    return cfg


GROUPED_MM = "grouped_mm"  # ``config`` value that forces F.grouped_mm for bf16 experts at any size

# bf16 experts take the Triton path up to this many (token, slot) assignments (T * k; decode batches):
# F.grouped_mm's tiles are built for many rows per expert, and at a few rows it reads the weights at
# ~60% of the copy bandwidth (H200, 1 token: 140 us per launch against a 112/56 us floor). Measured up to
# T = 128 at top-8 (benchmarks/moe_kernels.py, H200): the Triton path is 1.2-1.6x faster at every size up to
# there (T = 128: 784 vs 967 us at 32 experts, 4863 vs 6938 us at 256); larger sizes are not measured yet
BF16_TRITON_MAX_ASSIGN = 1024


@dataclass(frozen=True)
class MoEBf16Config:
    """Tiles of the Triton grouped GEMMs for float (bf16) weights, the decode-size path: BLOCK_M rows of one
    expert; gate_up computes bn_gate_up gate and as many up columns per program and writes SiLU(gate) * up;
    down: bn_down output columns; K steps of bk. Weight-read bound at decode sizes: short row tiles and
    narrow column tiles give enough programs to keep every SM streaming weights at 1 token."""

    block_m: int = 16
    bn_gate_up: int = 64
    bn_down: int = 64
    bk: int = 128
    warps: int = 4
    stages: int = 4
    group_m: int = 8


def default_bf16_config(num_tokens: int, top_k: int, n_experts: int) -> MoEBf16Config | None:
    """The Triton config for bf16 experts at this size, or None for F.grouped_mm (shapes only: the decode
    step is captured in a CUDA graph)."""
    n = num_tokens * top_k
    if n > BF16_TRITON_MAX_ASSIGN:
        return None
    rows = n / max(n_experts, 1)  # mean rows per expert: tiles no taller than the typical expert's rows
    return MoEBf16Config(block_m=16 if rows <= 16 else (32 if rows <= 32 else 64))


# ----------------------------------------------------------------------------------------------- Triton
if triton is not None:
    from .splitk import _round_to_bf16_grid
    from .quant import _round_to_e4m3_grid

    @triton.jit
    def _tile_of_program(pid, n_tiles, N, BN: tl.constexpr, GROUP_M: tl.constexpr):
        """(row tile, column tile) of program ``pid`` of a grouped GEMM over ``n_tiles`` row tiles: GROUP_M row
        tiles sweep all column tiles together, so an expert's tiles run close in time (L2 reuse of its
        weights)."""
        width = GROUP_M * tl.cdiv(N, BN)
        first_m = (pid // width) * GROUP_M
        gsize = tl.minimum(n_tiles - first_m, GROUP_M)
        return first_m + (pid % width) % gsize, (pid % width) // gsize

    @triton.jit
    def _moe_fp8_gemm_kernel(
        a_ptr, as_ptr, tok_ptr, b_ptr, bs_ptr, tiles_ptr, c_ptr, cs_ptr,
        N, K, up_row0, n_tiles, b_rows,
        stride_am, stride_asm, stride_be, stride_bn, stride_bse, stride_bsn, stride_cm, stride_csm,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
        GATHER: tl.constexpr, FUSE_SILU: tl.constexpr, EVEN_K: tl.constexpr, MANUAL_ROUND: tl.constexpr,
        ROUND_BF16: tl.constexpr, TMA_A: tl.constexpr, TMA_B: tl.constexpr,
    ):
        """One BM x BN output tile of one expert: rows [first, end) of the tile table entry.

        A rows are a[tok[row]] (GATHER) or a[row]; B = expert e's [N, K] e4m3 (K-major) with 128x128 block
        scales; A has 1x128 scales. FUSE_SILU: also the up tile (B rows up_row0 + n), and the output is
        silu(gate) * up quantized to e4m3 per row over the tile's 128 columns (c = fp8, cs = scale);
        otherwise c = the product in c's dtype. TMA_B: b_ptr is a tensor descriptor over the experts' stacked
        rows [E * b_rows, K] (blocks [BN, BK]); TMA_A (not with GATHER): a_ptr is one over a's rows
        (blocks [BM, BK]; rows past the tile's end are loaded but never stored).
        """
        pid_m, pid_n = _tile_of_program(tl.program_id(0), n_tiles, N, BN, GROUP_M)
        e = tl.load(tiles_ptr + pid_m * 3)
        if e < 0:
            return
        row0 = tl.load(tiles_ptr + pid_m * 3 + 1)
        row_end = tl.load(tiles_ptr + pid_m * 3 + 2)
        rows = row0 + tl.arange(0, BM)
        rmask = rows < row_end
        rows_ld = tl.where(rmask, rows, row0)  # rows past the expert's end re-read its first row
        if GATHER:
            arow = tl.load(tok_ptr + rows_ld).to(tl.int64)
        else:
            arow = rows_ld.to(tl.int64)
        rn = pid_n * BN + tl.arange(0, BN)
        nmask = rn < N
        rn_ld = tl.where(nmask, rn, 0).to(tl.int64)
        rk = tl.arange(0, BK)
        e64 = e.to(tl.int64)
        if not TMA_A:
            a_ptrs = a_ptr + arow[:, None] * stride_am + rk[None, :]  # [BM, BK]
        if not TMA_B:
            b_ptrs = b_ptr + e64 * stride_be + rn_ld[None, :] * stride_bn + rk[:, None]  # [BK, BN]
        b_row = e * b_rows + pid_n * BN  # TMA_B: first row of the tile in the stacked [E * b_rows, K] view
        as_ptrs = as_ptr + arow * stride_asm
        bs_row = bs_ptr + e64 * stride_bse + ((pid_n * BN) // 128) * stride_bsn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if FUSE_SILU:
            if not TMA_B:
                bu_ptrs = b_ptrs + up_row0 * stride_bn
            bsu_row = bs_row + (up_row0 // 128) * stride_bsn
            acc_up = tl.zeros((BM, BN), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BK)):
            kmask = rk + kb * BK < K
            if TMA_A:
                a = a_ptr.load([row0, kb * BK])
            elif EVEN_K:
                a = tl.load(a_ptrs)
            else:
                a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            if TMA_B:
                b = b_ptr.load([b_row, kb * BK]).T
            elif EVEN_K:
                b = tl.load(b_ptrs)
            else:
                b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
            sa = tl.load(as_ptrs + kb)
            acc += tl.dot(a, b) * (sa[:, None] * tl.load(bs_row + kb))
            if FUSE_SILU:
                if TMA_B:
                    bu = b_ptr.load([b_row + up_row0, kb * BK]).T
                elif EVEN_K:
                    bu = tl.load(bu_ptrs)
                else:
                    bu = tl.load(bu_ptrs, mask=kmask[:, None], other=0.0)
                acc_up += tl.dot(a, bu) * (sa[:, None] * tl.load(bsu_row + kb))
                if not TMA_B:
                    bu_ptrs += BK
            if not TMA_A:
                a_ptrs += BK
            if not TMA_B:
                b_ptrs += BK
        rows64 = rows.to(tl.int64)
        if FUSE_SILU:
            h = acc / (1.0 + tl.exp(-acc)) * acc_up  # silu(gate) * up, [BM, 128]
            amax = tl.maximum(tl.max(tl.abs(h), axis=1), 1e-4)  # act_quant's contract (AMAX_MIN, 448)
            scale = tl.math.div_rn(amax, 448.0)
            q = tl.math.div_rn(h, scale[:, None])
            q = tl.minimum(tl.maximum(q, -448.0), 448.0)
            if MANUAL_ROUND:
                q = _round_to_e4m3_grid(q)
            tl.store(c_ptr + rows64[:, None] * stride_cm + rn[None, :], q.to(tl.float8e4nv),
                     mask=rmask[:, None] & nmask[None, :])
            tl.store(cs_ptr + rows64 * stride_csm + pid_n, scale, mask=rmask)
        else:
            if ROUND_BF16:
                acc = _round_to_bf16_grid(acc)
            tl.store(c_ptr + rows64[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
                     mask=rmask[:, None] & nmask[None, :])

    @triton.jit
    def _moe_gemm_kernel(
        a_ptr, tok_ptr, b_ptr, tiles_ptr, c_ptr,
        N, K, up_row0, n_tiles,
        stride_am, stride_be, stride_bn, stride_cm,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
        GATHER: tl.constexpr, FUSE_SILU: tl.constexpr, EVEN_K: tl.constexpr, ROUND_BF16: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """Float (bf16) weights: one BM x BN output tile of one expert, rows [first, end) of a tile table entry.

        A rows are a[tok[row]] (GATHER) or a[row], in c's dtype; B = expert e's [N, K] rows (K-major, the
        ``LocalExperts`` layout), fp32 accumulation. FUSE_SILU: also the up tile (B rows up_row0 + n); gate and
        up are rounded to c's dtype first, then silu(gate) * up in fp32 is stored in c's dtype: the rounding
        points of ``grouped_moe_reference`` (h = x @ W13^T in x's dtype, a = silu * up rounded). Otherwise c =
        the product rounded to c's dtype. ROUND_BF16: round on the bf16 grid by hand (the interpreter's cast
        truncates). UPCAST: dot fp32 copies of the operands (exact products, the same fp32 accumulation; the
        interpreter's dot multiplies bf16 as its uint16 storage). Rows and columns past the tile are loaded
        from row 0 / the first row and never stored.
        """
        pid_m, pid_n = _tile_of_program(tl.program_id(0), n_tiles, N, BN, GROUP_M)
        e = tl.load(tiles_ptr + pid_m * 3)
        if e < 0:
            return
        row0 = tl.load(tiles_ptr + pid_m * 3 + 1)
        row_end = tl.load(tiles_ptr + pid_m * 3 + 2)
        rows = row0 + tl.arange(0, BM)
        rmask = rows < row_end
        rows_ld = tl.where(rmask, rows, row0)
        if GATHER:
            arow = tl.load(tok_ptr + rows_ld).to(tl.int64)
        else:
            arow = rows_ld.to(tl.int64)
        rn = pid_n * BN + tl.arange(0, BN)
        nmask = rn < N
        rn_ld = tl.where(nmask, rn, 0).to(tl.int64)
        rk = tl.arange(0, BK)
        a_ptrs = a_ptr + arow[:, None] * stride_am + rk[None, :]  # [BM, BK]
        b_ptrs = b_ptr + e.to(tl.int64) * stride_be + rn_ld[None, :] * stride_bn + rk[:, None]  # [BK, BN]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if FUSE_SILU:
            bu_ptrs = b_ptrs + up_row0 * stride_bn
            acc_up = tl.zeros((BM, BN), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BK)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                kmask = rk + kb * BK < K
                a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            if FUSE_SILU:
                if EVEN_K:
                    bu = tl.load(bu_ptrs)
                else:
                    bu = tl.load(bu_ptrs, mask=kmask[:, None], other=0.0)
                if UPCAST:
                    bu = bu.to(tl.float32)
                acc_up = tl.dot(a, bu, acc_up, input_precision=DOT_PRECISION)
                bu_ptrs += BK
            a_ptrs += BK
            b_ptrs += BK
        if FUSE_SILU:
            if ROUND_BF16:
                g = _round_to_bf16_grid(acc)
                u = _round_to_bf16_grid(acc_up)
            else:  # h = x @ W13^T rounded to x's dtype (the reference's F.linear output)
                g = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
                u = acc_up.to(c_ptr.dtype.element_ty).to(tl.float32)
            acc = g / (1.0 + tl.exp(-g)) * u  # [BM, BN] silu(gate) * up in fp32, as _silu_mul_kernel
        if ROUND_BF16:
            acc = _round_to_bf16_grid(acc)
        tl.store(c_ptr + rows.to(tl.int64)[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=rmask[:, None] & nmask[None, :])

    # the sizes are runtime values (no variant per divisibility): a serving engine compiles one variant per
    # N_PAD bucket and TILES, all of them at start-up (``warm_routing_plans``)
    @triton.jit(do_not_specialize=["n", "n_local", "n_tiles", "bm"])
    def _moe_plan_kernel(ids_ptr, map_ptr, sorted_tok_ptr, ends_ptr, n_rows_ptr, pos_ptr, tiles_ptr,
                         n, n_local, n_tiles, bm,
                         N_PAD: tl.constexpr, LOG_N: tl.constexpr, E_PAD: tl.constexpr, LOG_E: tl.constexpr,
                         TOP_K: tl.constexpr, NT_PAD: tl.constexpr, TILES: tl.constexpr):
        """The whole routing plan in one program (``MoEPlan``'s fields, as ``plan_moe_routing``'s torch ops).

        A stable sort by local expert (non-local after, then padding) as one sort of unique keys
        key * N_PAD + assignment; per-expert ends by binary search in the sorted keys; the tile table by a
        binary search of each tile id in the cumulative tile counts. N_PAD > n, so counts stay < N_PAD.
        """
        i = tl.arange(0, N_PAD)
        valid = i < n
        gid = tl.load(ids_ptr + i, mask=valid, other=0).to(tl.int64)
        loc = tl.load(map_ptr + gid, mask=valid, other=-1)  # [N_PAD] local expert or -1
        key = tl.where(valid, tl.where(loc >= 0, loc, n_local), n_local + 1)
        srt = tl.sort(key * N_PAD + i)  # unique keys: this sort is a stable sort by key
        order = srt & (N_PAD - 1)  # assignment (t * k + s) at each sorted row
        skey = srt >> LOG_N  # [N_PAD] sorted keys
        ev = tl.arange(0, E_PAD)
        le = tl.zeros((E_PAD,), dtype=tl.int32)  # -> #{rows with key <= e}
        lt = tl.zeros((E_PAD,), dtype=tl.int32)  # -> #{rows with key < e}
        for b in tl.static_range(LOG_N):
            step = N_PAD >> (b + 1)
            le = tl.where(tl.gather(skey, le + step - 1, 0) <= ev, le + step, le)
            lt = tl.where(tl.gather(skey, lt + step - 1, 0) < ev, lt + step, lt)
        n_loc = tl.sum((key < n_local).to(tl.int32))
        tl.store(ends_ptr + ev, le, mask=ev < n_local)
        tl.store(n_rows_ptr, n_loc)
        tl.store(sorted_tok_ptr + i, order // TOP_K, mask=valid)
        tl.store(pos_ptr + order, tl.where(i < n_loc, i, -1), mask=valid)  # padding sorts last: order < n
        if TILES:
            counts = tl.where(ev < n_local, le - lt, 0)
            per = (counts + bm - 1) // bm  # [E_PAD] tiles per expert
            tile_end = tl.cumsum(per, 0)
            tid = tl.arange(0, NT_PAD)
            own = tl.zeros((NT_PAD,), dtype=tl.int32)  # -> #{e: tile_end[e] <= tid}: the owning expert
            for b in tl.static_range(LOG_E):
                step = E_PAD >> (b + 1)
                own = tl.where(tl.gather(tile_end, own + step - 1, 0) <= tid, own + step, own)
            used = tid < tl.sum(per)
            first_tile = tl.gather(tile_end - per, own, 0)
            first_row = tl.gather(lt, own, 0) + (tid - first_tile) * bm
            tmask = tid < n_tiles
            tl.store(tiles_ptr + tid * 3, tl.where(used, own, -1), mask=tmask)
            tl.store(tiles_ptr + tid * 3 + 1, tl.where(used, first_row, 0), mask=tmask)
            tl.store(tiles_ptr + tid * 3 + 2, tl.where(used, tl.gather(le, own, 0), 0), mask=tmask)

    @triton.jit
    def _gather_rows_kernel(x_ptr, idx_ptr, n_rows_ptr, out_ptr, H, stride_x, stride_out,
                            BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
        """out[r] = x[idx[r]] for r < n_rows (a device scalar); programs past it exit at once."""
        pid_r = tl.program_id(0)
        n = tl.load(n_rows_ptr)
        if pid_r * BLOCK_R >= n:
            return
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n
        src = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        m = rmask[:, None] & (cols < H)[None, :]
        v = tl.load(x_ptr + src[:, None] * stride_x + cols[None, :], mask=m)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :], v, mask=m)

    @triton.jit
    def _silu_mul_kernel(h_ptr, n_rows_ptr, out_ptr, I, stride_h, stride_out,
                         BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, ROUND_BF16: tl.constexpr):
        """out[r, j] = silu(h[r, j]) * h[r, I + j] (fp32 math, stored in out's dtype) for r < n_rows."""
        pid_r = tl.program_id(0)
        n = tl.load(n_rows_ptr)
        if pid_r * BLOCK_R >= n:
            return
        rows = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        m = (rows < n)[:, None] & (cols < I)[None, :]
        g = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=m, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + rows[:, None] * stride_h + I + cols[None, :], mask=m, other=0.0).to(tl.float32)
        a = g / (1.0 + tl.exp(-g)) * u
        if ROUND_BF16:
            a = _round_to_bf16_grid(a)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], a.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _moe_combine_kernel(y_ptr, pos_ptr, w_ptr, add_ptr, out_ptr, H, stride_y, stride_add, stride_out,
                            TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, ROUND_BF16: tl.constexpr,
                            HAS_ADD: tl.constexpr):
        """out[t] = sum_s w[t, s] * y[pos[t, s]] over the local slots (pos >= 0), fp32, slots in order.
        HAS_ADD: + add[t], after the sum is rounded to out's dtype (the same two roundings as a separate add
        of two tensors in that dtype, without its extra pass over [T, H])."""
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        cmask = cols < H
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for s in tl.static_range(TOP_K):
            p = tl.load(pos_ptr + t * TOP_K + s)
            wt = tl.load(w_ptr + t * TOP_K + s)
            y = tl.load(y_ptr + tl.maximum(p, 0).to(tl.int64) * stride_y + cols, mask=cmask & (p >= 0), other=0.0)
            acc += wt * y.to(tl.float32)
        if HAS_ADD:
            if ROUND_BF16:
                acc = _round_to_bf16_grid(acc)
            else:
                acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
            acc += tl.load(add_ptr + t * stride_add + cols, mask=cmask, other=0.0).to(tl.float32)
        if ROUND_BF16:
            acc = _round_to_bf16_grid(acc)
        tl.store(out_ptr + t * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


def _combine(y: torch.Tensor, plan: MoEPlan, topk_weights: torch.Tensor, out_dtype: torch.dtype,
             add: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted sum of each token's expert rows y [T*k, H] -> [T, H] out_dtype (+ ``add`` [T, H] out_dtype)."""
    t, k = plan.pos.shape
    h = y.shape[1]
    out = torch.empty(t, h, dtype=out_dtype, device=y.device)
    block_h = min(1024, triton.next_power_of_2(h))
    has_add = add is not None
    _moe_combine_kernel[(t, triton.cdiv(h, block_h))](
        y, plan.pos, topk_weights.float().contiguous(), add if has_add else out, out, h, y.stride(0),
        add.stride(0) if has_add else 0, out.stride(0),
        TOP_K=k, BLOCK_H=block_h, ROUND_BF16=round_bf16_in_interpreter(out_dtype), HAS_ADD=has_add, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------- device paths
def _gather_rows(x: torch.Tensor, plan: MoEPlan) -> torch.Tensor:
    """x [T, H] -> [T*k, H]: row r = x[sorted_token[r]] for r < n_rows; later rows stay unwritten (never read)."""
    n = plan.sorted_token.shape[0]
    h = x.shape[1]
    xs = torch.empty(n, h, dtype=x.dtype, device=x.device)
    block_h = min(256, triton.next_power_of_2(h))
    _gather_rows_kernel[(triton.cdiv(n, 16), triton.cdiv(h, block_h))](
        x, plan.sorted_token, plan.n_rows, xs, h, x.stride(0), xs.stride(0), BLOCK_R=16, BLOCK_H=block_h,
        num_warps=4)
    return xs


def _silu_mul(hg: torch.Tensor, plan: MoEPlan) -> torch.Tensor:
    """hg [T*k, 2I] (gate | up) -> silu(gate) * up [T*k, I] for the first n_rows rows."""
    n, i = hg.shape[0], hg.shape[1] // 2
    a = torch.empty(n, i, dtype=hg.dtype, device=hg.device)
    block_i = min(256, triton.next_power_of_2(i))
    _silu_mul_kernel[(triton.cdiv(n, 16), triton.cdiv(i, block_i))](
        hg, plan.n_rows, a, i, hg.stride(0), a.stride(0), BLOCK_R=16, BLOCK_I=block_i,
        ROUND_BF16=round_bf16_in_interpreter(hg.dtype), num_warps=4)
    return a


def _moe_bf16(x: torch.Tensor, plan: MoEPlan, topk_weights: torch.Tensor, experts: LocalExperts,
              add: torch.Tensor | None = None) -> torch.Tensor:
    """F.grouped_mm path: gather rows, gate_up, SiLU-mul, down, combine (+ add)."""
    xs = _gather_rows(x, plan)
    hg = _grouped_mm(xs, experts.w_gate_up.transpose(1, 2), offs=plan.expert_ends)  # [T*k, 2I]
    y = _grouped_mm(_silu_mul(hg, plan), experts.w_down.transpose(1, 2), offs=plan.expert_ends)  # [T*k, H]
    return _combine(y, plan, topk_weights, x.dtype, add)


def _moe_bf16_triton(x: torch.Tensor, plan: MoEPlan, topk_weights: torch.Tensor, experts: LocalExperts,
                     cfg: MoEBf16Config, add: torch.Tensor | None = None) -> torch.Tensor:
    """Triton path for float weights at decode sizes: fused gather + gate_up + SiLU-mul, down, combine
    (3 launches after the plan; the plan's tiles are cfg.block_m rows)."""
    n = plan.sorted_token.shape[0]
    h, i = experts.hidden, experts.inter
    nt = plan.tiles.shape[0]
    wgu, wd = experts.w_gate_up, experts.w_down
    rnd = round_bf16_in_interpreter(x.dtype)
    upcast = interpret_mode() and x.dtype != torch.float32
    prec = "ieee" if x.dtype == torch.float32 or upcast else None  # fp32 operands: no TF32
    a = torch.empty(n, i, dtype=x.dtype, device=x.device)  # silu(gate) * up, sorted rows (>= n_rows unwritten)
    _moe_gemm_kernel[(nt * triton.cdiv(i, cfg.bn_gate_up),)](
        x, plan.sorted_token, wgu, plan.tiles, a,
        i, h, i, nt,
        x.stride(0), wgu.stride(0), wgu.stride(1), a.stride(0),
        BM=cfg.block_m, BN=cfg.bn_gate_up, BK=cfg.bk, GROUP_M=cfg.group_m, GATHER=True, FUSE_SILU=True,
        EVEN_K=(h % cfg.bk == 0), ROUND_BF16=rnd, UPCAST=upcast, DOT_PRECISION=prec, num_warps=cfg.warps,
        num_stages=cfg.stages)
    y = torch.empty(n, h, dtype=x.dtype, device=x.device)  # [T*k, H] expert outputs, sorted rows
    _moe_gemm_kernel[(nt * triton.cdiv(h, cfg.bn_down),)](
        a, plan.sorted_token, wd, plan.tiles, y,
        h, i, 0, nt,
        a.stride(0), wd.stride(0), wd.stride(1), y.stride(0),
        BM=cfg.block_m, BN=cfg.bn_down, BK=cfg.bk, GROUP_M=cfg.group_m, GATHER=False, FUSE_SILU=False,
        EVEN_K=(i % cfg.bk == 0), ROUND_BF16=rnd, UPCAST=upcast, DOT_PRECISION=prec, num_warps=cfg.warps,
        num_stages=cfg.stages)
    return _combine(y, plan, topk_weights, x.dtype, add)


def _weight_desc(w: torch.Tensor, block_rows: int):
    """Tensor descriptor over stacked expert weights [E, R, K] viewed as [E * R, K], blocks [block_rows, 128]."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(w.view(-1, w.shape[2]), [block_rows, BLOCK])


def _fp8_gate_up(xq: torch.Tensor, xs: torch.Tensor, plan: MoEPlan, experts: LocalExperts,
                 cfg: MoEGemmConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Gathered rows of xq [T, H] (scales xs) through W13 -> silu(gate) * up as e4m3 [T*k, I_pad] + scales
    [T*k, I_pad/128] (rows >= n_rows unwritten)."""
    if cfg.kernel == "hopper":
        from .moe_gemm_hopper import fp8_gate_up_hopper

        return fp8_gate_up_hopper(xq, xs, plan, experts, cfg.group_m, scales_ahead=cfg.scales_ahead,
                                  blocked_epilogue=cfg.blocked_epilogue, schedule=cfg.gate_up_schedule,
                                  ordered=cfg.gate_up_ordered)
    n = plan.sorted_token.shape[0]
    h, i_pad = experts.hidden, experts.inter_pad
    nt = plan.tiles.shape[0]
    aq = torch.empty(n, i_pad, dtype=FP8, device=xq.device)
    a_s = torch.empty(n, i_pad // BLOCK, dtype=torch.float32, device=xq.device)
    w13, s13 = experts.w13, experts.s13
    b = _weight_desc(w13, BLOCK) if cfg.tma else w13
    _moe_fp8_gemm_kernel[(nt * (i_pad // BLOCK),)](
        xq, xs, plan.sorted_token, b, s13, plan.tiles, aq, a_s,
        i_pad, h, i_pad, nt, w13.shape[1],
        xq.stride(0), xs.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1),
        aq.stride(0), a_s.stride(0),
        BM=cfg.block_m, BN=BLOCK, BK=BLOCK, GROUP_M=cfg.group_m, GATHER=True, FUSE_SILU=True,
        EVEN_K=(h % BLOCK == 0), MANUAL_ROUND=interpret_mode(), ROUND_BF16=False, TMA_A=False, TMA_B=cfg.tma,
        num_warps=cfg.warps_gate_up, num_stages=cfg.stages_gate_up)
    return aq, a_s


def _fp8_down(aq: torch.Tensor, a_s: torch.Tensor, plan: MoEPlan, experts: LocalExperts, cfg: MoEGemmConfig,
              out_dtype: torch.dtype) -> torch.Tensor:
    """[T*k, I_pad] e4m3 rows (sorted order) through W2 -> y [T*k, H] in out_dtype (rows >= n_rows unwritten)."""
    if cfg.kernel == "hopper":
        from .moe_gemm_hopper import fp8_down_hopper

        return fp8_down_hopper(aq, a_s, plan, experts, out_dtype, cfg.group_m, pair=None if cfg.down_pair else False,
                               scales_ahead=cfg.scales_ahead, blocked_epilogue=cfg.blocked_epilogue,
                               schedule=cfg.down_schedule, ordered=cfg.down_ordered)
    n, h, i_pad = aq.shape[0], experts.hidden, experts.inter_pad
    # one weight scale per output tile: a tile wider than a 128-column scale block would mix two scales
    # (measured: bn_down=256 gives 14% relative error)
    check(BLOCK % cfg.bn_down == 0, f"grouped_moe: bn_down={cfg.bn_down} must divide {BLOCK} (one scale per tile)")
    nt = plan.tiles.shape[0]
    w2, s2 = experts.w2, experts.s2
    y = torch.empty(n, h, dtype=out_dtype, device=aq.device)
    a = aq
    b = w2
    if cfg.tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a = TensorDescriptor.from_tensor(aq, [cfg.block_m, BLOCK])
        b = _weight_desc(w2, cfg.bn_down)
    _moe_fp8_gemm_kernel[(nt * triton.cdiv(h, cfg.bn_down),)](
        a, a_s, plan.sorted_token, b, s2, plan.tiles, y, y,
        h, i_pad, 0, nt, w2.shape[1],
        aq.stride(0), a_s.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1),
        y.stride(0), 0,
        BM=cfg.block_m, BN=cfg.bn_down, BK=BLOCK, GROUP_M=cfg.group_m, GATHER=False, FUSE_SILU=False,
        EVEN_K=True, MANUAL_ROUND=False, ROUND_BF16=round_bf16_in_interpreter(out_dtype), TMA_A=cfg.tma,
        TMA_B=cfg.tma, num_warps=cfg.warps_down, num_stages=cfg.stages_down)
    return y


def _moe_fp8(xq: torch.Tensor, xs: torch.Tensor, plan: MoEPlan, topk_weights: torch.Tensor,
             experts: LocalExperts, cfg: MoEGemmConfig, out_dtype: torch.dtype,
             add: torch.Tensor | None = None) -> torch.Tensor:
    """Triton path on the once-quantized x: fused gather + gate_up + SiLU-mul + quant, down, combine (+ add)."""
    aq, a_s = _fp8_gate_up(xq, xs, plan, experts, cfg)
    y = _fp8_down(aq, a_s, plan, experts, cfg, out_dtype)
    return _combine(y, plan, topk_weights, out_dtype, add)


def grouped_path_reason(x: torch.Tensor, experts: LocalExperts) -> str | None:
    """Why the device path cannot take this input (None = it can)."""
    if triton is None:
        return "triton is not installed"
    if not (x.is_cuda or interpret_mode()):
        return "x is not on a CUDA device (set TRITON_INTERPRET=1 to run the Triton path on CPU)"
    if not experts.is_fp8:
        if x.is_cuda and x.dtype != torch.bfloat16:
            return f"F.grouped_mm's device kernel takes bf16 only (got {x.dtype}; others would sync)"
        if experts.hidden % 8 or experts.inter % 8:
            return f"F.grouped_mm needs 16-byte rows: hidden {experts.hidden} and inter {experts.inter} % 8"
    return None


def _check_add(fn: str, add: torch.Tensor | None, t: int, h: int, dtype: torch.dtype, device: torch.device) -> None:
    check(add is None or (tuple(add.shape) == (t, h) and add.dtype == dtype and add.device == device
                          and add.stride(-1) == 1),
          f"{fn}: add must be [T={t}, hidden={h}] {dtype} on {device} with unit column stride, got "
          f"{None if add is None else (add.dtype, tuple(add.shape), add.device, add.stride())}")


def _plus(out: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
    """out + add in out's dtype (each element rounded once more, as the fused combine does)."""
    return out if add is None else out + add


def grouped_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: LocalExperts,
                backend: str = "auto", config: MoEGemmConfig | MoEBf16Config | str | None = None,
                add: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's routed-expert output: x [T, H], topk_ids [T, k] int (global expert ids), topk_weights
    [T, k] float -> [T, H] in x's dtype = sum over (t, s) with a local expert of w[t, s] * expert(x[t]).
    ``add`` [T, H] in x's dtype: returned plus it, bit for bit ``grouped_moe(...) + add`` (the device path adds
    it in its combine kernel instead of a separate pass).

    backend: 'auto' (device path on CUDA unless ``grouped_path_reason`` names a reason, else the reference),
    'grouped' (device path, or an error with the reason; on CPU under TRITON_INTERPRET=1), 'reference'.
    config: fp8 experts: a ``MoEGemmConfig`` (None: ``default_moe_config``); float experts: a
    ``MoEBf16Config`` (the Triton path), ``GROUPED_MM`` (F.grouped_mm), or None: ``default_bf16_config``,
    which picks by T * k. The device path issues no host sync.
    """
    check(x.dim() == 2 and x.shape[1] == experts.hidden,
          f"grouped_moe: x must be [T, hidden={experts.hidden}], got {tuple(x.shape)}")
    check(x.dtype in (torch.bfloat16, torch.float16, torch.float32), f"grouped_moe: x dtype {x.dtype}")
    check(topk_ids.dim() == 2 and topk_ids.shape[0] == x.shape[0] and not topk_ids.dtype.is_floating_point,
          f"grouped_moe: topk_ids must be integer [T={x.shape[0]}, k], got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    check(topk_weights.shape == topk_ids.shape and topk_weights.dtype.is_floating_point,
          f"grouped_moe: topk_weights must be float {tuple(topk_ids.shape)}, got {topk_weights.dtype} "
          f"{tuple(topk_weights.shape)}")
    check(x.device == experts.device and topk_ids.device == x.device and topk_weights.device == x.device,
          f"grouped_moe: x ({x.device}), topk ids/weights and experts ({experts.device}) must share a device")
    _check_add("grouped_moe", add, x.shape[0], experts.hidden, x.dtype, x.device)
    reason = grouped_path_reason(x, experts)
    if backend == "auto":
        backend = "grouped" if x.is_cuda and reason is None else "reference"
    if backend == "reference":
        return _plus(grouped_moe_reference(x, topk_ids, topk_weights, experts), add)
    if backend != "grouped":
        raise KernelInputError(f"grouped_moe: backend must be auto/grouped/reference, got {backend!r}")
    if reason is not None:
        raise KernelInputError(f"grouped_moe: the grouped path cannot run this input: {reason}")
    t, k = topk_ids.shape
    if t == 0 or experts.n_local == 0:
        return _plus(torch.zeros_like(x), add)
    x = x.contiguous()
    if experts.is_fp8:
        xq, xs = act_quant(x, BLOCK)  # [T, H] e4m3, [T, ceil(H/128)]
        return _grouped_fp8(xq, xs, topk_ids, topk_weights, experts, config, x.dtype, add)
    cfg = (default_bf16_config(t, k, experts.n_experts) or GROUPED_MM) if config is None else config
    if isinstance(cfg, MoEBf16Config):
        check(x.dtype == experts.w_gate_up.dtype, f"grouped_moe: the Triton path wants x in the weights' dtype "
              f"{experts.w_gate_up.dtype}, got {x.dtype}")
        return _moe_bf16_triton(x, plan_moe_routing(topk_ids, experts, cfg.block_m), topk_weights, experts, cfg,
                                add)
    check(cfg == GROUPED_MM, f"grouped_moe: config for {experts.w_gate_up.dtype} experts must be None, "
          f"MoEBf16Config or GROUPED_MM, got {cfg!r}")
    plan = plan_moe_routing(topk_ids, experts)
    return _moe_bf16(x, plan, topk_weights, experts, add)


def _grouped_fp8(xq: torch.Tensor, xs: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 experts: LocalExperts, config: MoEGemmConfig | None, out_dtype: torch.dtype,
                 add: torch.Tensor | None = None) -> torch.Tensor:
    t, k = topk_ids.shape
    check(config is None or isinstance(config, MoEGemmConfig),
          f"grouped_moe: config for fp8 experts must be a MoEGemmConfig or None, got {config!r}")
    cfg = _resolve_kernel(config or default_moe_config(t, k, experts.n_experts), xq, experts)
    if cfg.tma and experts.hidden % 16:  # descriptor rows must be 16-byte aligned
        cfg = replace(cfg, tma=False)
    plan = plan_moe_routing(topk_ids, experts, cfg.block_m)
    return _moe_fp8(xq, xs, plan, topk_weights, experts, cfg, out_dtype, add)


def grouped_moe_quantized(xq: torch.Tensor, xs: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                          experts: LocalExperts, out_dtype: torch.dtype, backend: str = "auto",
                          config: MoEGemmConfig | None = None, add: torch.Tensor | None = None) -> torch.Tensor:
    """``grouped_moe`` of fp8 experts on activations already quantized by ``act_quant(x, 128)``:
    xq [T, H] e4m3, xs [T, ceil(H/128)] fp32 -> [T, H] in out_dtype, the same result as ``grouped_moe(x)``
    (``add`` [T, H] out_dtype as there: + add, fused into the combine on the device path).

    For callers that move the quantized tokens (a CP all-gather of half the bytes): the quantization is
    per token, so quantize-then-gather equals gather-then-quantize bit for bit. ``backend`` as in
    ``grouped_moe``; the device path issues no host sync.
    """
    check(experts.is_fp8, "grouped_moe_quantized: the experts must hold fp8 weights (bf16 ones: grouped_moe)")
    check(xq.dim() == 2 and xq.shape[1] == experts.hidden and xq.dtype == FP8,
          f"grouped_moe_quantized: xq must be float8_e4m3fn [T, hidden={experts.hidden}], got {xq.dtype} "
          f"{tuple(xq.shape)}")
    want = (xq.shape[0], _cdiv(experts.hidden, BLOCK))
    check(tuple(xs.shape) == want and xs.dtype == torch.float32,
          f"grouped_moe_quantized: xs must be float32 {want} (act_quant's scales), got {xs.dtype} {tuple(xs.shape)}")
    check(out_dtype in (torch.bfloat16, torch.float16, torch.float32), f"grouped_moe_quantized: out_dtype {out_dtype}")
    check(topk_ids.dim() == 2 and topk_ids.shape[0] == xq.shape[0] and not topk_ids.dtype.is_floating_point,
          f"grouped_moe_quantized: topk_ids must be integer [T={xq.shape[0]}, k], got {topk_ids.dtype} "
          f"{tuple(topk_ids.shape)}")
    check(topk_weights.shape == topk_ids.shape and topk_weights.dtype.is_floating_point,
          f"grouped_moe_quantized: topk_weights must be float {tuple(topk_ids.shape)}, got {topk_weights.dtype}")
    check(len({xq.device, xs.device, topk_ids.device, topk_weights.device, experts.device}) == 1,
          "grouped_moe_quantized: xq, xs, topk ids/weights and the experts must share a device")
    _check_add("grouped_moe_quantized", add, xq.shape[0], experts.hidden, out_dtype, xq.device)
    reason = grouped_path_reason(xq, experts)
    if backend == "auto":
        backend = "grouped" if xq.is_cuda and reason is None else "reference"
    if backend == "reference":
        return _plus(grouped_moe_quantized_reference(xq, xs, topk_ids, topk_weights, experts, out_dtype), add)
    if backend != "grouped":
        raise KernelInputError(f"grouped_moe_quantized: backend must be auto/grouped/reference, got {backend!r}")
    if reason is not None:
        raise KernelInputError(f"grouped_moe_quantized: the grouped path cannot run this input: {reason}")
    if xq.shape[0] == 0 or experts.n_local == 0:
        return _plus(torch.zeros(xq.shape, dtype=out_dtype, device=xq.device), add)
    return _grouped_fp8(xq.contiguous(), xs.contiguous(), topk_ids, topk_weights, experts, config, out_dtype, add)


# ----------------------------------------------------------------------------------------------- reference
def _fp8_expert_reference(xd_rows: torch.Tensor, li: int, experts: LocalExperts) -> torch.Tensor:
    """One local fp8 expert on its rows, given as dequantized act_quant values (fp32 [c, H]) -> fp32 [c, H]."""
    i, i_pad = experts.inter, experts.inter_pad
    w13 = dequantize_block_fp8(experts.w13[li], experts.s13[li])  # [2*I_pad, H] fp32
    h = xd_rows @ w13.t()  # fp32
    a = F.silu(h[:, :i]) * h[:, i_pad:i_pad + i]
    aq, a_s = R.act_quant(a, BLOCK)
    w2 = dequantize_block_fp8(experts.w2[li], experts.s2[li])[:, :i]  # [H, I]
    return R.act_dequant(aq, a_s, BLOCK) @ w2.t()


def _expert_forward_reference(x_rows: torch.Tensor, li: int, experts: LocalExperts) -> torch.Tensor:
    """One local expert on its rows -> [c, H] in x's dtype (the contract of the device paths)."""
    i = experts.inter
    if not experts.is_fp8:
        h = F.linear(x_rows, experts.w_gate_up[li])  # x's dtype
        a = (F.silu(h[:, :i].float()) * h[:, i:].float()).to(x_rows.dtype)
        return F.linear(a, experts.w_down[li])
    xd = R.act_dequant(*R.act_quant(x_rows, BLOCK), BLOCK)
    return _fp8_expert_reference(xd, li, experts).to(x_rows.dtype)


def _combine_reference(topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: LocalExperts,
                       expert_rows, out_dtype: torch.dtype) -> torch.Tensor:
    """sum_s w[t, s] * y[t, s] in fp32, slots in order (as the device combine); ``expert_rows(tok, li)`` gives
    the local expert ``li``'s output rows (out_dtype) for tokens ``tok``."""
    t, k = topk_ids.shape
    contrib = torch.zeros(t, k, experts.hidden, dtype=torch.float32, device=topk_ids.device)  # w * y per slot
    for li, ge in enumerate(experts.expert_ids):
        tok, slot = (topk_ids == ge).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        y = expert_rows(tok, li)
        contrib[tok, slot] = topk_weights[tok, slot].float()[:, None] * y.float()
    out = torch.zeros(t, experts.hidden, dtype=torch.float32, device=topk_ids.device)
    for s in range(k):  # slot order, as the device combine
        out = out + contrib[:, s]
    return out.to(out_dtype)


def grouped_moe_reference(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                          experts: LocalExperts) -> torch.Tensor:
    """Per-expert loop with the math of the device path (syncs: CPU / checking only)."""
    return _combine_reference(topk_ids, topk_weights, experts,
                              lambda tok, li: _expert_forward_reference(x[tok], li, experts), x.dtype)


def grouped_moe_quantized_reference(xq: torch.Tensor, xs: torch.Tensor, topk_ids: torch.Tensor,
                                    topk_weights: torch.Tensor, experts: LocalExperts,
                                    out_dtype: torch.dtype) -> torch.Tensor:
    """``grouped_moe_reference`` on activations already quantized by act_quant (equal to it on x, since the
    quantization is per token)."""
    xd = R.act_dequant(xq, xs, BLOCK)  # [T, H] fp32
    return _combine_reference(topk_ids, topk_weights, experts,
                              lambda tok, li: _fp8_expert_reference(xd[tok], li, experts).to(out_dtype), out_dtype)
