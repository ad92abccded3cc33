"""Triton compiles at run time: each one timed; one after the engine's warm-up is logged and counted.

Why: Triton compiles a kernel variant the first time a launch meets a new specialization (a constexpr value,
an integer argument divisible by 16 or equal to 1, ...). A compile of the large kernels takes seconds, and
every running request waits for it. The engine's warm-up runs requests of several shapes to compile the
variants real traffic needs; whatever it missed shows up here, named, instead of as an unexplained stall
(serving a 64K prompt showed one 3.4-3.8 s inter-token gap, 2026-12-02).

``COMPILES`` is per process (each rank has its own). On CUDA the runner installs it (``install_if_asked``;
``DSASERVE_LOG_COMPILES=0`` leaves Triton's hooks alone); the engine's warm-up ends with the control op "warm"
(``mark_warm``), and ``llm.stats()`` reports ``snapshot()`` per rank under "triton_compiles". First run on a
GPU 2026-12-03: it named the compile behind that gap (the MoE routing plan, 2.16 s), since fixed.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)

_KEPT = 20  # compiles after the warm-up kept for stats (the most recent)


class CompileWatch:
    """Triton JIT hooks: ``before`` (``knobs.runtime.jit_cache_hook``) starts a compile's clock, ``after``
    (``jit_post_compile_hook``) records it. Both take Triton's hook keywords and return None (compile)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._started: dict[str, float] = {}
        self.warm = False
        self.count = 0
        self.seconds = 0.0
        self.after_warmup: list[dict] = []
        self.after_warmup_count = 0

    def before(self, *, repr: str = "?", **_) -> None:
        with self._lock:
            self._started[repr] = time.perf_counter()
        return None

    def after(self, *, repr: str = "?", fn=None, compile=None, **_) -> None:
        """Never raises: it runs inside Triton's compile path (default on; keywords default for other Tritons)."""
        try:
            self._after(repr, fn, compile)
        except Exception:                                        # noqa: BLE001  a watch must not break a compile
            log.debug("compile watch failed to record a compile", exc_info=True)
        return None

    def _after(self, repr: str, fn, compile) -> None:
        now = time.perf_counter()
        label = repr            # the repr lists argument types; the constexprs say which variant it was
        constants = compile.get("constants") if isinstance(compile, dict) else None
        if constants:
            label = f"{repr.split('(', 1)[0]} constexprs {str(constants)[:600]}"
        with self._lock:
            took = now - self._started.pop(repr, now)
            self.count += 1
            self.seconds += took
            if not self.warm:
                log.debug("Triton compiled %s in %.2f s", label, took)
                return None
            self.after_warmup_count += 1
            self.after_warmup.append({"kernel": getattr(fn, "name", label.split("[", 1)[0]), "seconds": round(took, 3),
                                      "specialization": label})
            del self.after_warmup[:-_KEPT]
        log.warning("Triton compiled a kernel variant the warm-up did not cover, in %.2f s (running requests waited "
                    "that long): %s", took, label)
        return None

    def mark_warm(self) -> None:
        with self._lock:
            self.warm = True

    def snapshot(self) -> dict:
        with self._lock:
            return {"compiles": self.count, "seconds": round(self.seconds, 3), "warm": self.warm,
                    "after_warmup": self.after_warmup_count, "recent_after_warmup": list(self.after_warmup)}


COMPILES = CompileWatch()


def install(watch: CompileWatch = COMPILES) -> bool:
    """Set Triton's JIT hooks to ``watch`` unless someone else set them; True when they are ours."""
    try:
        from triton import knobs
    except ImportError:                        # no Triton (CPU-only build): nothing compiles
        return False
    rt = knobs.runtime
    if rt.jit_cache_hook in (None, watch.before) and rt.jit_post_compile_hook in (None, watch.after):
        rt.jit_cache_hook, rt.jit_post_compile_hook = watch.before, watch.after
        return True
    return False


ENV = "DSASERVE_LOG_COMPILES"


def install_if_asked(watch: CompileWatch = COMPILES) -> bool:
    """``install`` unless the environment says no (``DSASERVE_LOG_COMPILES=0``; default on)."""
    return os.environ.get(ENV, "1") not in ("", "0") and install(watch)
