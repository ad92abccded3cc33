"""The Triton compile watch: compiles timed, the ones after the warm-up logged and counted (the "warm"
control op on every rank: tests/parallel/test_control_warm.py)."""

from __future__ import annotations

import logging
import time

from dsaserve.runtime.compile_watch import ENV, CompileWatch, install, install_if_asked


def _compile(watch: CompileWatch, name: str, spec: str) -> None:
    """What Triton does around one compile: the cache hook, then the post-compile hook, same keywords."""
    kw = dict(key=("k",), repr=f"{name}[num_warps=4]({spec})", fn=type("Info", (), {"name": name})(),
              compile={}, is_manual_warmup=False, already_compiled=False)
    assert watch.before(**kw) is None                  # None: Triton goes on and compiles
    assert watch.after(**kw) is None


def test_compiles_after_the_warmup_are_logged_and_counted(caplog):
    watch = CompileWatch()
    with caplog.at_level(logging.DEBUG, logger="dsaserve.runtime.compile_watch"):
        _compile(watch, "_a_kernel", "S: i32D")
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]   # warm-up compiles: quiet
        watch.mark_warm()
        _compile(watch, "_b_kernel", "S: i32")
    snap = watch.snapshot()
    assert snap["compiles"] == 2 and snap["warm"] and snap["after_warmup"] == 1 and snap["seconds"] >= 0
    assert [c["kernel"] for c in snap["recent_after_warmup"]] == ["_b_kernel"]
    assert "S: i32" in snap["recent_after_warmup"][0]["specialization"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "_b_kernel" in warned[0] and "warm-up did not cover" in warned[0]
    for i in range(30):                                # only the most recent are kept
        _compile(watch, f"_k{i}", "")
    assert watch.snapshot()["after_warmup"] == 31 and len(watch.snapshot()["recent_after_warmup"]) == 20


def test_the_variant_is_named_by_its_constexprs(caplog):
    """With Triton's compile details at hand the logged specialization is the kernel name + its constexprs."""
    watch = CompileWatch()
    watch.mark_warm()
    kw = dict(key=("k",), repr="_plan_kernel[num_warps=8](ids_ptr: ()", fn=type("Info", (), {"name": "_plan_kernel"})(),
              compile={"constants": {(7,): 2048, (9,): True}}, is_manual_warmup=False, already_compiled=False)
    watch.before(**kw)
    time.sleep(0.02)
    watch.after(**kw)
    assert watch.snapshot()["recent_after_warmup"][0]["seconds"] >= 0.02       # timed from its own start
    spec = watch.snapshot()["recent_after_warmup"][0]["specialization"]
    assert spec.startswith("_plan_kernel[num_warps=8] constexprs") and "2048" in spec and "True" in spec


def test_install_keeps_someone_elses_hooks():
    from triton import knobs

    rt = knobs.runtime
    saved = rt.jit_cache_hook, rt.jit_post_compile_hook
    try:
        rt.jit_cache_hook, rt.jit_post_compile_hook = None, None
        mine = CompileWatch()
        assert install(mine) and rt.jit_cache_hook == mine.before and rt.jit_post_compile_hook == mine.after
        assert install(mine)                            # again: still ours
        assert not install(CompileWatch())              # another watch does not replace it
        other = lambda **kw: None                       # noqa: E731
        rt.jit_cache_hook, rt.jit_post_compile_hook = other, None
        assert not install(CompileWatch()) and rt.jit_cache_hook is other
    finally:
        rt.jit_cache_hook, rt.jit_post_compile_hook = saved



def test_installed_unless_turned_off(monkeypatch):
    from triton import knobs

    rt = knobs.runtime
    saved = rt.jit_cache_hook, rt.jit_post_compile_hook
    try:
        rt.jit_cache_hook, rt.jit_post_compile_hook = None, None
        monkeypatch.setenv(ENV, "0")
        assert not install_if_asked(CompileWatch()) and rt.jit_cache_hook is None
        monkeypatch.delenv(ENV, raising=False)                 # default: on
        watch = CompileWatch()
        assert install_if_asked(watch) and rt.jit_post_compile_hook == watch.after
    finally:
        rt.jit_cache_hook, rt.jit_post_compile_hook = saved
