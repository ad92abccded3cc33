"""Shared helpers for the Triton kernels: availability, interpreter mode, device facts, input checks."""

from __future__ import annotations

import functools
import os

import torch

try:  # Triton is optional: the CPU path never needs it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAVE_TRITON = False


try:  # Gluon (Triton's explicit-layout dialect) ships with Triton >= 3.4; the Gluon kernels need it, nothing else does
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    HAVE_GLUON = True
except Exception:  # pragma: no cover - depends on the installed Triton
    gluon = None
    gl = None
    HAVE_GLUON = False


class KernelInputError(ValueError):
    """An input a kernel cannot take; the message names the argument and the fix."""


def interpret_mode() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1): used by the tests."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor, backend: str = "auto") -> bool:
    """Pick the implementation: 'triton', 'reference', or 'auto' (Triton on CUDA tensors, else reference)."""
    if backend == "reference":
        return False
    if backend == "triton":
        if not HAVE_TRITON:
            raise RuntimeError("backend='triton' asked for, but triton is not installed")
        if not (all(t.is_cuda for t in tensors) or interpret_mode()):
            raise KernelInputError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
            )
        return True
    if backend != "auto":
        raise KernelInputError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    return HAVE_TRITON and all(t.is_cuda for t in tensors)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sm_count(device: torch.device) -> int:
    """Number of SMs of a CUDA device (8 under the CPU interpreter, so persistent loops are exercised)."""
    if device.type != "cuda":
        return 8
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise KernelInputError(msg)


def check_shape(name: str, t: torch.Tensor, shape: tuple, dtype=None) -> None:
    """Exact shape check (None in ``shape`` = any size) and optional dtype check(s)."""
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
    check(ok, f"{name}: expected shape {tuple('*' if s is None else s for s in shape)}, got {tuple(t.shape)}")
    if dtype is not None:
        dts = dtype if isinstance(dtype, tuple) else (dtype,)
        check(t.dtype in dts, f"{name}: expected dtype {' or '.join(map(str, dts))}, got {t.dtype}")


# How the Gluon MoE GEMM's programs take their work items (``moe_gemm_hopper._n_programs``). Here rather than in
# moe_gemm_hopper so that grouped_moe's config can name them without importing the Gluon kernels (they load on the
# first hopper call) and without an import cycle.
MOE_SCHEDULES = ("static", "per_item", "queue")
# the threshold top-k's row kernels (``threshold_topk.ThresholdTopkConfig.select``): here so that naming them (the
# engine's flag check) imports neither Triton kernels nor Gluon
SELECT_KERNELS = ("auto", "gluon", "triton")
